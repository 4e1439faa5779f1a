"""The projection cache with local checkpoints: reuse, identity, corruption, locking, `safelora cache`."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import Result

from safelora_cli.adapter import ADAPTER_FILE
from safelora_cli.cache import ProjectionCache, _checksum
from safelora_cli.projection import Projector
from safelora_cli.stfile import read_header

Cli = Callable[..., Result]


def run(cli: Cli, adapter: Path, out: Path, base: Path, aligned: Path, *args: object) -> dict[str, Any]:
    r = cli("project", "--adapter", adapter, "--output", out, "--json", "--base", base, "--aligned", aligned, *args)
    assert r.exit_code == 0, r.stderr
    report: dict[str, Any] = json.loads(r.stdout)
    return report


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(a / ADAPTER_FILE), load_file(b / ADAPTER_FILE)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def entries() -> list[Path]:
    return sorted(Path(os.environ["SAFELORA_CACHE"]).glob("pairs/*/*.safetensors"))


@pytest.fixture
def pair(llama_pair: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the pair, free to edit."""
    base, aligned = llama_pair
    return Path(shutil.copytree(base, tmp_path / "base")), Path(shutil.copytree(aligned, tmp_path / "aligned"))


def test_a_rerun_reads_nothing_and_writes_the_same_bytes_as_an_uncached_run(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    first = run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    again = run(cli, llama_adapter, tmp_path / "again", *llama_pair)
    uncached = run(cli, llama_adapter, tmp_path / "uncached", *llama_pair, "--no-cache")

    n = first["layer_count"]
    assert (first["cache"]["computed"], again["cache"]["served"], uncached["cache"]) == (n, n, None)
    assert first["bytes_read"] > 0 and again["bytes_read"] == 0
    assert same_tensors(tmp_path / "first", tmp_path / "again")
    assert same_tensors(tmp_path / "first", tmp_path / "uncached")
    assert [layer["similarity"] for layer in first["layers"]] == [layer["similarity"] for layer in uncached["layers"]]
    # V is kept for every shape, the wide GQA v_proj (32×64) too: C is never formed
    headers = [read_header(e) for e in entries()]
    kinds = {(h.metadata["safelora.cache.kind"], h.tensors["operator"].shape) for h in headers}
    assert kinds == {("V", (64, 64)), ("V", (32, 64))}


def test_large_modules_give_the_same_file_cached_or_not(cli: Cli, tmp_path: Path) -> None:
    """At 1024 and up MKL splits products across threads, so results depend on the thread count:
    a cached module must be applied exactly like a computed one for the bytes to match."""
    g = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (1024, 1024), "k_proj": (256, 1024)}  # square and wide
    base, aligned, lora = {}, {}, {}
    for proj, (out, inp) in shapes.items():
        key = f"model.layers.0.self_attn.{proj}"
        w = torch.randn(out, inp, generator=g) * 0.02
        base[f"{key}.weight"] = w.half()
        update = torch.randn(out, 8, generator=g) @ torch.randn(8, inp, generator=g) * 1e-2
        aligned[f"{key}.weight"] = (w + update).half()
        lora[f"base_model.model.{key}.lora_A.weight"] = torch.randn(16, inp, generator=g) * 0.01
        lora[f"base_model.model.{key}.lora_B.weight"] = torch.randn(out, 16, generator=g) * 0.01
    for name, state in (("base", base), ("aligned", aligned), ("adapter", lora)):
        (tmp_path / name).mkdir()
        file = "adapter_model.safetensors" if name == "adapter" else "model.safetensors"
        save_file(state, tmp_path / name / file, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": list(shapes)}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))

    pair = (tmp_path / "base", tmp_path / "aligned")
    reports = [
        run(cli, tmp_path / "adapter", tmp_path / out, *pair, *extra)
        for out, extra in (("cold", ()), ("warm", ()), ("uncached", ("--no-cache",)))
    ]
    assert [r["cache"] and r["cache"]["served"] for r in reports] == [0, 2, None]
    cold = (tmp_path / "cold" / ADAPTER_FILE).read_bytes()
    assert (tmp_path / "warm" / ADAPTER_FILE).read_bytes() == cold
    assert (tmp_path / "uncached" / ADAPTER_FILE).read_bytes() == cold


def test_an_edited_checkpoint_is_never_served_stale(
    cli: Cli, pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    base, aligned = pair
    before = run(cli, llama_adapter, tmp_path / "before", base, aligned)
    # Rewrite one targeted weight in place: same size, and the mtime put back as it was.
    weight = "model.layers.0.self_attn.q_proj.weight"
    shard = aligned / json.loads((aligned / "model.safetensors.index.json").read_text())["weight_map"][weight]
    entry, st = read_header(shard).tensors[weight], shard.stat()
    with shard.open("r+b") as f:
        f.seek(entry.start)
        f.write(bytes(entry.nbytes))  # zeros
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))

    after = run(cli, llama_adapter, tmp_path / "after", base, aligned)
    fresh = run(cli, llama_adapter, tmp_path / "fresh", base, aligned, "--no-cache")
    assert after["aligned"]["fingerprint"] != before["aligned"]["fingerprint"]
    assert after["cache"]["pair"] != before["cache"]["pair"] and after["cache"]["served"] == 0
    assert after["layers"] == [{**layer, "cached": False} for layer in fresh["layers"]]
    assert after["layers"][0]["similarity"] != before["layers"][0]["similarity"]


def test_corrupt_and_truncated_entries_are_reported_and_recomputed(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    first = run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    flipped, truncated, garbled = entries()[:3]
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0x01  # one bit of the operator: only the CRC can tell
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    garbled.write_bytes(b"\xff" * 16 + garbled.read_bytes()[16:])

    second = run(cli, llama_adapter, tmp_path / "second", *llama_pair)
    third = run(cli, llama_adapter, tmp_path / "third", *llama_pair)

    n = first["layer_count"]
    assert (second["cache"]["served"], second["cache"]["computed"]) == (n - 3, 3)
    corrupt = [note for note in second["notes"] if "was corrupt" in note]
    assert len(corrupt) == 3 and any("CRC-32" in note for note in corrupt)
    assert any("truncated" in note for note in corrupt)
    assert third["cache"]["served"] == n
    assert same_tensors(tmp_path / "first", tmp_path / "second")
    assert same_tensors(tmp_path / "first", tmp_path / "third")


def test_cache_ls_rm_and_clear(cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path) -> None:
    base, aligned = llama_pair
    report_one = run(cli, llama_adapter, tmp_path / "one", base, aligned)
    one = report_one["cache"]["pair"]
    two = run(cli, llama_adapter, tmp_path / "two", aligned, base)["cache"]["pair"]  # reversed: another pair

    listed = json.loads(cli("cache", "ls", "--json").stdout)
    assert {p["pair"] for p in listed} == {one, two}
    first = next(p for p in listed if p["pair"] == one)
    assert first["base"].startswith(f"local:{base.resolve()}@")
    assert len(first["modules"]) == 8 and first["bytes"] > 0
    assert {m["module"] for m in first["modules"]} == {layer["module"] for layer in report_one["layers"]}
    table = cli("cache", "ls", "--modules")
    assert table.exit_code == 0 and one in table.stdout and "model.layers.3.self_attn.v_proj" in table.stdout

    assert cli("cache", "rm", one[:6]).exit_code == 0
    assert [p["pair"] for p in json.loads(cli("cache", "ls", "--json").stdout)] == [two]
    missing = cli("cache", "rm", one[:6])
    assert missing.exit_code == 1 and "no cached pair" in missing.stderr
    assert cli("cache", "clear").exit_code == 0
    assert json.loads(cli("cache", "ls", "--json").stdout) == []


def test_cache_paths_never_leave_the_cache_dir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    pair = ProjectionCache(root).pair("hub:../../../etc@x", "local:/etc/passwd@y")
    projector = Projector()
    op = projector.operator(torch.zeros(4, 8), torch.ones(4, 8))
    with pair.locked(lambda: None):
        pair.store("../../escape/../x", False, "a", "b", op)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(root / "pairs" / pair.key) for p in written)
    names = {p.name for p in written} - {".lock", "pair.json"}
    assert names and all(len(n) == 32 + len(".safetensors") and n.endswith(".safetensors") for n in names)
    assert [(m, type(stored).__name__) for m, stored in pair.load_all(["../../escape/../x"], False)] == [
        ("../../escape/../x", "Stored")
    ]


def test_a_second_writer_waits_for_the_lock(tmp_path: Path) -> None:
    cache = ProjectionCache(tmp_path)
    holder, waiter = cache.pair("hub:a/b@1", "hub:c/d@2"), cache.pair("hub:a/b@1", "hub:c/d@2")
    waited, order = threading.Event(), []
    acquired = threading.Event()

    def hold() -> None:
        with holder.locked(lambda: None):
            acquired.set()
            waited.wait(timeout=10)
            order.append("holder done")

    t = threading.Thread(target=hold)
    t.start()
    acquired.wait(timeout=10)
    with waiter.locked(waited.set):
        order.append("waiter in")
    t.join()
    assert order == ["holder done", "waiter in"]


def test_an_unwritable_cache_warns_and_the_run_goes_on(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("SAFELORA_CACHE", str(blocker / "cache"))
    report = run(cli, llama_adapter, tmp_path / "out", *llama_pair)
    assert report["cache"]["computed"] == report["layer_count"]
    assert any("projection cache: cannot write" in note for note in report["notes"])


def test_float64_runs_do_not_use_the_float32_cache(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    report = run(cli, llama_adapter, tmp_path / "out", *llama_pair, "--precision", "float64")
    assert report["cache"] is None and any("float64" in note for note in report["notes"])
    assert entries() == []


# A cache that cannot be turned against a run.

MODULE = "model.layers.0.self_attn.q_proj"  # 64×64


def entry_for(module: str) -> Path:
    return next(e for e in entries() if read_header(e).metadata["safelora.cache.module"] == module)


def edit_entry(path: Path, meta: dict[str, str], shape: list[int] | None = None, *, forge: bool = False) -> None:
    """Rewrite an entry's header (metadata fields, optionally the tensor's shape), its data kept. With
    ``forge`` the checksum is made to match, as anyone who can write the cache could."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update({f"safelora.cache.{k}": v for k, v in meta.items()})
    if shape is not None:
        header["operator"]["shape"] = shape
    data = raw[8 + n :]
    if forge:
        header["__metadata__"]["safelora.cache.crc32"] = _checksum(
            header["__metadata__"], "F32", header["operator"]["shape"], memoryview(data)
        )
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def doubled_norm(entry: Path) -> dict[str, str]:
    return {"norm": repr(float(read_header(entry).metadata["safelora.cache.norm"]) * 2)}


def output(out: Path) -> bytes:
    return (out / ADAPTER_FILE).read_bytes()


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("norm", lambda e: edit_entry(e, doubled_norm(e))),
        ("kind", lambda e: edit_entry(e, {"kind": "zero"})),
        ("out", lambda e: edit_entry(e, {"out": "32"})),
        ("in", lambda e: edit_entry(e, {"in": "32"})),
        ("module", lambda e: edit_entry(e, {"module": "model.layers.1.self_attn.q_proj"})),
        ("transpose", lambda e: edit_entry(e, {"transpose": "1"})),
        ("base_key", lambda e: edit_entry(e, {"base_key": "model.layers.1.self_attn.q_proj.weight"})),
        ("format", lambda e: edit_entry(e, {"format": "0"})),
        ("out, in and shape together", lambda e: edit_entry(e, {"out": "32", "in": "128"}, [32, 128])),
    ],
)
def test_an_edited_metadata_field_is_reported_and_recomputed(
    field: str,
    edit: Callable[[Path], None],
    cli: Cli,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
) -> None:
    first = run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    edit(entry_for(MODULE))

    second = run(cli, llama_adapter, tmp_path / "second", *llama_pair)
    third = run(cli, llama_adapter, tmp_path / "third", *llama_pair)
    run(cli, llama_adapter, tmp_path / "uncached", *llama_pair, "--no-cache")

    n = first["layer_count"]
    assert (second["cache"]["served"], second["cache"]["computed"]) == (n - 1, 1)
    [note] = [note for note in second["notes"] if "was corrupt" in note]
    assert MODULE in note
    assert output(tmp_path / "second") == output(tmp_path / "uncached")
    assert third["cache"]["served"] == n  # the entry was rewritten whole


def test_the_checksum_does_not_stop_someone_who_can_write_the_cache(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    """The limit the README states: a forged entry with a matching checksum is served. Only the
    ownership rule keeps others from writing one."""
    first = run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    entry = entry_for(MODULE)
    edit_entry(entry, doubled_norm(entry), forge=True)
    forged = run(cli, llama_adapter, tmp_path / "forged", *llama_pair)
    assert forged["cache"]["served"] == first["layer_count"]
    assert output(tmp_path / "forged") != output(tmp_path / "first")
