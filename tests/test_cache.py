"""The projection cache with local checkpoints: reuse, identity, corruption, locking, `safelora cache`,
and the rules that keep a cache from being turned against a run (checksum, ownership, links, FIFOs)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import Result

from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.io.stfile import read_header
from safelora_cli.projection import Projector
from safelora_cli.stores.cache import CorruptEntry, ProjectionCache, Stored
from safelora_cli.stores.cache_entries import checksum

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

    listed = json.loads(cli("cache", "ls", "--json").stdout)["pairs"]
    assert {p["pair"] for p in listed} == {one, two}
    first = next(p for p in listed if p["pair"] == one)
    assert first["base"].startswith(f"local:{base.resolve()}@")
    assert len(first["modules"]) == 8 and first["bytes"] > 0
    assert {m["module"] for m in first["modules"]} == {layer["module"] for layer in report_one["layers"]}
    table = cli("cache", "ls", "--modules")
    assert table.exit_code == 0 and one in table.stdout and "model.layers.3.self_attn.v_proj" in table.stdout

    assert cli("cache", "rm", one[:6]).exit_code == 0
    assert [p["pair"] for p in json.loads(cli("cache", "ls", "--json").stdout)["pairs"]] == [two]
    missing = cli("cache", "rm", one[:6])
    assert missing.exit_code == 1 and "no cached pair" in missing.stderr
    assert cli("cache", "clear").exit_code == 0
    assert json.loads(cli("cache", "ls", "--json").stdout)["pairs"] == []


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
OTHER_UID = 65534  # nobody


def root() -> Path:
    return Path(os.environ["SAFELORA_CACHE"])


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
        header["__metadata__"]["safelora.cache.crc32"] = checksum(
            header["__metadata__"], "F32", header["operator"]["shape"], memoryview(data)
        )
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def doubled_norm(entry: Path) -> dict[str, str]:
    return {"norm": repr(float(read_header(entry).metadata["safelora.cache.norm"]) * 2)}


def output(out: Path) -> bytes:
    return (out / ADAPTER_FILE).read_bytes()


def snapshot(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every file and directory under ``path`` (links not followed): mode, owner, size, mtime."""
    found = {}
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        found[str(p.relative_to(path))] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns)
    return found


def chown_or_skip(path: Path) -> None:
    try:
        os.chown(path, OTHER_UID, -1, follow_symlinks=False)
    except PermissionError:
        pytest.skip("chown to another user is not permitted here")


def safelora(*args: object) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, under a timeout: a FIFO opened for reading would block it forever."""
    cmd = [sys.executable, "-m", "safelora_cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


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


def _group_writable_root() -> Path:
    root().chmod(0o770)
    return root()


def _world_writable_pair_dir() -> Path:
    pair_dir = entries()[0].parent
    pair_dir.chmod(0o707)
    return pair_dir


def _group_writable_lock() -> Path:
    lock = entries()[0].parent / ".lock"
    lock.chmod(0o660)
    return lock


def _entry_of_another_user() -> Path:
    entry = entry_for("model.layers.2.self_attn.v_proj")
    chown_or_skip(entry)
    return entry


def _pair_dir_of_another_user() -> Path:
    pair_dir = entries()[0].parent
    chown_or_skip(pair_dir)
    return pair_dir


def _pairs_of_another_user() -> Path:
    chown_or_skip(root() / "pairs")
    return root() / "pairs"


@pytest.mark.parametrize(
    ("unsafe", "says"),
    [
        (_group_writable_root, "is writable by its group"),
        (_world_writable_pair_dir, "is writable by other users"),
        (_group_writable_lock, "is writable by its group"),
        (_entry_of_another_user, f"belongs to uid {OTHER_UID}"),
        (_pair_dir_of_another_user, f"belongs to uid {OTHER_UID}"),
        (_pairs_of_another_user, f"belongs to uid {OTHER_UID}"),
    ],
)
def test_a_cache_others_can_write_is_neither_read_nor_written(
    unsafe: Callable[[], Path],
    says: str,
    cli: Cli,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
) -> None:
    run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    entry = entry_for(MODULE)
    edit_entry(entry, doubled_norm(entry), forge=True)  # what another user could plant
    path = unsafe()
    before = snapshot(root())

    report = run(cli, llama_adapter, tmp_path / "second", *llama_pair)
    run(cli, llama_adapter, tmp_path / "uncached", *llama_pair, "--no-cache")

    [warning] = [note for note in report["notes"] if "projection cache not used" in note]
    assert f"{path} {says}" in warning
    assert "chmod go-w" in warning if "writable" in says else "of your own" in warning
    assert not any(layer["cached"] for layer in report["layers"])
    assert output(tmp_path / "second") == output(tmp_path / "uncached")
    assert snapshot(root()) == before  # nothing written, no lock taken


def test_a_first_run_under_umask_002_makes_a_cache_it_can_use(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    umask = os.umask(0o002)
    try:
        first = run(cli, llama_adapter, tmp_path / "first", *llama_pair)
        again = run(cli, llama_adapter, tmp_path / "again", *llama_pair)
    finally:
        os.umask(umask)
    assert again["cache"]["served"] == first["layer_count"]
    assert not any("not used" in note for note in first["notes"] + again["notes"])
    made = [root().parent, root(), *root().rglob("*")]  # root().parent too: safelora made it
    # 4 directories, .lock, pair.json and the entries; digests/ and its two memos (base, aligned)
    assert len(made) == 6 + first["layer_count"] + 3
    assert all(stat.S_IMODE(p.lstat().st_mode) == (0o700 if p.is_dir() else 0o600) for p in made)


def test_a_fifo_entry_is_never_opened(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    """A FIFO where an entry belongs is one line and exit 1, like any non-regular file the tool
    expects to read: no run repairs it by itself, someone put it there."""
    run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    entry = entry_for(MODULE)
    entry.unlink()
    os.mkfifo(entry, 0o600)

    p = safelora("project", "--adapter", llama_adapter, "--output", tmp_path / "second", "--json",
                 "--base", llama_pair[0], "--aligned", llama_pair[1])  # fmt: skip
    assert p.returncode == 1, p.stderr
    [line] = p.stderr.strip().splitlines()
    assert line.startswith(f"error: {entry}: is a FIFO, not a regular file; remove it") and "cache rm" in line
    assert not (tmp_path / "second").exists()
    assert stat.S_ISFIFO(entry.lstat().st_mode)


def test_a_symlinked_entry_is_never_followed(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    entry = entry_for(MODULE)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(entry, outside)
    edit_entry(outside, doubled_norm(outside), forge=True)  # served if the link were followed
    planted = outside.read_bytes()
    entry.unlink()
    entry.symlink_to(outside)

    report = run(cli, llama_adapter, tmp_path / "second", *llama_pair)
    run(cli, llama_adapter, tmp_path / "uncached", *llama_pair, "--no-cache")
    [note] = [note for note in report["notes"] if "was corrupt" in note]
    assert MODULE in note and "a symbolic link, not a regular file" in note
    assert output(tmp_path / "second") == output(tmp_path / "uncached")
    assert outside.read_bytes() == planted  # the link was replaced, not written through
    assert stat.S_ISREG(entry.lstat().st_mode)


def _outside(tmp_path: Path, name: str) -> Path:
    """A directory outside the cache that looks like a pair, with a file in it."""
    d = tmp_path / "elsewhere" / name
    (d / "sub").mkdir(parents=True)
    (d / "pair.json").write_text(json.dumps({"base": "b", "aligned": "a"}))
    (d / "sub" / "keep.txt").write_text("mine")
    return d


def test_cache_clear_never_deletes_through_a_link(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    pair_dir = entries()[0].parent
    (root() / "pairs" / "0123456789abcdef").symlink_to(_outside(tmp_path, "a"), target_is_directory=True)
    (pair_dir / "0123.safetensors").symlink_to(_outside(tmp_path, "b"), target_is_directory=True)
    (pair_dir / ".lock").unlink()
    (pair_dir / ".lock").symlink_to(_outside(tmp_path, "c") / "pair.json")
    (root() / "refs").symlink_to(_outside(tmp_path, "d"), target_is_directory=True)
    before = snapshot(tmp_path / "elsewhere")

    listed = json.loads(cli("cache", "ls", "--json").stdout)["pairs"]
    assert [p["pair"] for p in listed] == [pair_dir.name]
    cleared = cli("cache", "clear")
    assert cleared.exit_code == 0, cleared.stderr
    assert snapshot(tmp_path / "elsewhere") == before
    assert sorted(p.name for p in root().iterdir()) == ["pairs"] and not any((root() / "pairs").iterdir())


def test_cache_clear_when_pairs_itself_is_a_link(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    shutil.rmtree(root() / "pairs")
    outside = _outside(tmp_path, "pairs")
    (outside / "fedcba9876543210").mkdir()
    (root() / "pairs").symlink_to(outside, target_is_directory=True)
    before = snapshot(tmp_path / "elsewhere")

    assert json.loads(cli("cache", "ls", "--json").stdout)["pairs"] == []
    assert cli("cache", "rm", "fedcba").exit_code == 1
    assert cli("cache", "clear").exit_code == 0
    assert snapshot(tmp_path / "elsewhere") == before
    assert not os.path.lexists(root() / "pairs")
    report = run(cli, llama_adapter, tmp_path / "again", *llama_pair)  # the cache is usable again
    assert report["cache"]["computed"] == report["layer_count"]
    assert not any("not used" in note for note in report["notes"])


def test_cache_ls_and_clear_survive_fifos_and_bad_manifests(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    run(cli, llama_adapter, tmp_path / "first", *llama_pair)
    pair_dir = entries()[0].parent
    entry = entry_for(MODULE)
    entry.unlink()
    os.mkfifo(entry, 0o600)
    (pair_dir / "pair.json").unlink()
    os.mkfifo(pair_dir / "pair.json", 0o600)
    manifests = {
        "1" * 16: b'{"base": "x", "aligned": "y", ' + b'"pad": "' + b"x" * (2 << 20) + b'"}',  # 2 MB
        "2" * 16: b'{"base": "x", "aligned": "y", "base": "z"}',  # duplicate key
        "3" * 16: b"[" * 100_000,  # deep nesting
        "4" * 16: b'{"base": 1, "aligned": null}',
    }
    for key, manifest in manifests.items():
        (root() / "pairs" / key).mkdir(mode=0o700)
        (root() / "pairs" / key / "pair.json").write_bytes(manifest)

    ls = safelora("cache", "ls", "--json")
    assert ls.returncode == 0, ls.stderr
    listed = {p["pair"]: p for p in json.loads(ls.stdout)["pairs"]}
    assert set(listed) == {pair_dir.name, *manifests}
    assert all((listed[key]["base"], listed[key]["aligned"]) == ("?", "?") for key in [pair_dir.name, *manifests])
    problems = [m["problem"] for m in listed[pair_dir.name]["modules"] if m["problem"]]
    assert len(problems) == 1 and "a FIFO, not a regular file" in problems[0]
    assert safelora("cache", "ls", "--modules").returncode == 0
    cleared = safelora("cache", "clear")
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cli("cache", "ls", "--json").stdout)["pairs"] == []


def test_the_ownership_rule_for_the_directories_on_the_way_to_the_cache(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename the cache away and put theirs in its place
    problem = ProjectionCache(shared / "cache").problem()
    assert problem is not None and f"{shared} (a directory on the way to the cache) is writable by" in problem
    shared.chmod(0o1777)  # sticky, as /tmp: no one may rename what is not theirs
    assert ProjectionCache(shared / "cache").problem() is None

    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(mine, target_is_directory=True)
    assert ProjectionCache(link / "cache").problem() is None  # followed: the cache is mine/cache
    assert ProjectionCache(tmp_path / "mine" / ".." / "link" / "cache").problem() is None
    chown_or_skip(link)
    problem = ProjectionCache(link / "cache").problem()
    assert problem is not None and f"{link} (a link on the way to the cache) belongs to uid {OTHER_UID}" in problem
    chown_or_skip(mine)
    problem = ProjectionCache(tmp_path / "mine" / "cache").problem()
    assert problem is not None and f"{mine} (a directory on the way" in problem


def test_the_ownership_rule_inside_the_cache(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache = ProjectionCache(cache_dir)
    assert cache.problem() is None  # nothing yet: safelora creates it right
    cache.refs.put("https://hub", "org/name", "main", "a" * 40)
    assert ProjectionCache(cache_dir).refs.get("https://hub", "org/name", "main") == "a" * 40
    [memo] = (cache_dir / "refs").iterdir()
    assert stat.S_IMODE(memo.stat().st_mode) == 0o600 and stat.S_IMODE(cache_dir.stat().st_mode) == 0o700

    memo.chmod(0o620)
    problem = ProjectionCache(cache_dir).problem()
    assert problem == (
        f"projection cache not used: {memo} is writable by its group, who could change what the cache serves; "
        f"run `chmod go-w {memo}`, or point SAFELORA_CACHE elsewhere"
    )
    refused = ProjectionCache(cache_dir)
    assert refused.refs.get("https://hub", "org/name", "main") is None  # the memo is not read
    refused.refs.put("https://hub", "org/other", "main", "b" * 40)
    assert len(list((cache_dir / "refs").iterdir())) == 1  # nor written
    memo.chmod(0o600)

    memo.unlink()
    os.mkfifo(memo, 0o600)
    problem = ProjectionCache(cache_dir).problem()
    assert problem is not None and f"{memo} is a FIFO, not a regular file" in problem
    memo.unlink()

    pair = ProjectionCache(cache_dir).pair("hub:a@1", "hub:b@2")
    pair.dir.mkdir(parents=True, mode=0o700)
    (pair.dir / ".lock").symlink_to(tmp_path / "elsewhere")
    problem = pair.problem()
    assert problem is not None and f"{pair.dir / '.lock'} is a symbolic link, not a regular file" in problem
    op = Projector().operator(torch.zeros(4, 8), torch.ones(4, 8))
    with pair.locked(lambda: None):
        pair.store("m", False, "a", "b", op)
    assert [type(stored) for _, stored in pair.load_all(["m"], False)] == [type(None)]
    assert pair.warnings == [problem] and sorted(p.name for p in pair.dir.iterdir()) == [".lock"]
    assert not os.path.lexists(tmp_path / "elsewhere")


def test_the_refs_memo_is_read_as_strict_json(tmp_path: Path) -> None:
    cache = ProjectionCache(tmp_path / "cache")
    cache.refs.put("https://hub", "org/name", "main", "a" * 40)
    [memo] = (tmp_path / "cache" / "refs").iterdir()
    memo.write_text('{"refs": {"main": "' + "a" * 40 + '"}, "refs": {"main": "' + "b" * 40 + '"}}')
    assert ProjectionCache(tmp_path / "cache").refs.get("https://hub", "org/name", "main") is None


def test_an_entry_larger_than_its_module_is_not_read(tmp_path: Path) -> None:
    pair = ProjectionCache(tmp_path / "cache").pair("hub:a@1", "hub:b@2")
    op = Projector().operator(torch.zeros(4, 8), torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    with pair.locked(lambda: None):
        pair.store("m", False, "a", "b", op)
    [(_, small)] = pair.load_all(["m"], False, [31])
    assert isinstance(small, CorruptEntry) and "claims a 4×8 operator, more than the module's 31 values" in str(small)
    [(_, fits)] = pair.load_all(["m"], False, [32])
    assert isinstance(fits, Stored) and fits.data.shape == (4, 8)
