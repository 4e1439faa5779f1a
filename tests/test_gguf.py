"""GGUF LoRA files: projected in place and to --output, stamped, checked, restored byte for byte; hostile
files refused in one line with nothing written. The files here are written with the ``gguf`` package's
own writer (the reference comparison with llama.cpp's converter is ``test_gguf_reference``)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file
from support import builders
from support.fakehub import FakeHub
from support.keys import write_key
from typer.testing import Result

from safelora_cli.errors import FormatError
from safelora_cli.io import ggufile

SizeOf = gguf.GGML_QUANT_SIZES


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    peft_dir: Path,
    *,
    arch: str = "llama",
    a_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    b_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
) -> Path:
    """The PEFT adapter as llama.cpp names and orders it (q/k rows permuted, 4 heads, 2 for k), its
    lora_a tensors stored as ``a_type`` and its lora_b as ``b_type`` (the gguf package's quants)."""
    state = load_file(str(peft_dir / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.add_array("general.tags", ["lora", "kept as it was"])
    parts = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for key, t in sorted(state.items()):
        layer = int(key.split(".layers.")[1].split(".")[0])
        proj = key.split(".self_attn.")[1].split(".")[0]
        ab = "a" if ".lora_A." in key else "b"
        data = t.numpy()
        if ab == "b" and proj in ("q_proj", "k_proj"):
            data = _permute(data, 4 if proj == "q_proj" else 2)
        kind = a_type if ab == "a" else b_type
        stored = gguf.quants.quantize(np.ascontiguousarray(data), kind)
        writer.add_tensor(f"blk.{layer}.{parts[proj]}.weight.lora_{ab}", stored, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(llama_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, aligned = llama_pair
    peft = builders.make_adapter(
        aligned, tmp_path_factory.mktemp("peft") / "a", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    return write_gguf(tmp_path_factory.mktemp("gguf") / "adapter.gguf", peft)


def _layout(path: Path) -> ggufile.Layout:
    with path.open("rb") as f:
        return ggufile.read_layout(f, path.stat().st_size, str(path), SizeOf)


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    layout = _layout(path)
    data = path.read_bytes()
    return {
        t.name: data[layout.data_start + t.offset : layout.data_start + t.offset + t.nbytes] for t in layout.tensors
    }


def _pair(llama_pair: tuple[Path, Path]) -> list[object]:
    base, aligned = llama_pair
    return ["--base", base, "--aligned", aligned, "--threshold", "0.99"]


def test_in_place_stamps_keeps_the_rest_byte_for_byte_and_restores(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model-lora.gguf"
    target.write_bytes(gguf_file.read_bytes())
    done = cli("project", *_pair(llama_pair), "--adapter", target)
    assert done.exit_code == 0, done.stderr
    before, after = _tensor_bytes(gguf_file), _tensor_bytes(target)
    assert before.keys() == after.keys()
    for name in before:
        assert (before[name] == after[name]) == name.endswith(".lora_a"), name
    old, new = _layout(gguf_file), _layout(target)
    assert [kv.raw for kv in old.kvs] == [kv.raw for kv in new.kvs if not kv.key.startswith("safelora.")]
    assert [t.raw for t in old.tensors] == [t.raw for t in new.tensors]
    stamp = {kv.key: kv.value for kv in new.kvs if kv.key.startswith("safelora.")}
    assert stamp["safelora.stamp_version"] == "2" and len(str(stamp["safelora.digest"])) == 64
    assert cli("check", target).exit_code == 0
    assert cli("restore", target).exit_code == 0
    assert target.read_bytes() == gguf_file.read_bytes()


def test_an_edited_tensor_fails_check(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "a.gguf"
    target.write_bytes(gguf_file.read_bytes())
    assert cli("project", *_pair(llama_pair), "--adapter", target).exit_code == 0
    layout = _layout(target)
    a = next(t for t in layout.tensors if t.name.endswith(".lora_a"))
    data = bytearray(target.read_bytes())
    data[layout.data_start + a.offset] ^= 0x40
    target.write_bytes(bytes(data))
    assert cli("check", target).exit_code == 3


def test_output_file_leaves_the_source_and_refuses_to_overwrite(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in.gguf"
    source.write_bytes(gguf_file.read_bytes())
    out = tmp_path / "out" / "sanitized.gguf"
    assert cli("project", *_pair(llama_pair), "--adapter", source, "--output", out).exit_code == 0
    assert source.read_bytes() == gguf_file.read_bytes()
    assert cli("check", out).exit_code == 0
    written = out.read_bytes()
    again = cli("project", *_pair(llama_pair), "--adapter", source, "--output", out)
    assert again.exit_code == 1 and out.read_bytes() == written
    same = cli("project", *_pair(llama_pair), "--adapter", source, "--output", source, "--force")
    assert same.exit_code == 1 and source.read_bytes() == gguf_file.read_bytes()


def test_a_base_class_outside_the_table_is_refused_naming_what_is_supported(
    cli: Callable[..., Result], gguf_file: Path, tmp_path: Path
) -> None:
    base, aligned = builders.gpt2_pair(tmp_path / "gpt2")
    target = tmp_path / "a.gguf"
    target.write_bytes(gguf_file.read_bytes())
    done = cli("project", "--base", base, "--aligned", aligned, "--adapter", target)
    assert done.exit_code == 1
    line = done.stderr.strip()
    assert "\n" not in line and "GPT2LMHeadModel" in line and "llama from LlamaForCausalLM" in line
    assert target.read_bytes() == gguf_file.read_bytes()


def test_without_the_gguf_package_a_gguf_input_is_a_usage_error_with_the_install_line(
    cli: Callable[..., Result], gguf_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    done = cli("inspect", gguf_file)
    assert done.exit_code == 2
    assert "pip install 'safelora[gguf]'" in done.stderr and done.stderr.count("\n") == 1


# -- hostile files ------------------------------------------------------------------------------------


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _header(n_tensors: int, n_kv: int, body: bytes, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv) + body


_KVS = _kv_str("general.architecture", "llama") + _kv_str("general.type", "adapter")


def _tensor(name: str, dims: tuple[int, ...], offset: int) -> bytes:
    return (
        _s(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", 0, offset)
    )


def _one_tensor(offset: int = 0, name: str = "blk.0.attn_v.weight.lora_a") -> bytes:
    head = _header(1, 2, _KVS + _tensor(name, (64, 8), offset))
    return head + bytes(-len(head) % 32) + bytes(64 * 8 * 4 + offset)


HOSTILE: dict[str, tuple[bytes, str]] = {
    "bad magic": (_header(0, 0, b"", magic=b"GGML"), "no GGUF magic"),
    "version 1": (_header(0, 0, b"", version=1), "version 1"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "truncated": (_one_tensor()[:-10], "truncated"),
    "2^63 tensors": (_header(2**63, 0, b""), "claims 9223372036854775808 tensors"),
    "2^63 pairs": (_header(0, 2**63, b""), "claims 9223372036854775808 key/value pairs"),
    "2^63-byte string": (
        _header(0, 1, _s("general.name") + struct.pack("<IQ", 8, 2**63) + b"x" * 64),
        "claims 9223372036854775808 bytes",
    ),
    "misaligned offset": (_one_tensor(offset=4), "not a multiple of 32"),
    "duplicate tensors": (
        _header(2, 2, _KVS + _tensor("t.lora_a", (32,), 0) + _tensor("t.lora_a", (32,), 128)) + bytes(512),
        "appears twice",
    ),
    "duplicate keys": (_header(0, 2, _kv_str("a", "x") + _kv_str("a", "y")), "appears twice"),
    "deep arrays": (
        _header(0, 1, _s("general.tags") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 64),
        "array of arrays",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_gguf_is_refused_in_one_line_and_nothing_is_written(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    data, why = HOSTILE[case]
    target = tmp_path / "hostile.gguf"
    target.write_bytes(data)
    for args in (("inspect", target), ("project", *_pair(llama_pair), "--adapter", target)):
        done = cli(*args)
        assert done.exit_code == 1, (case, done.stderr)
        line = done.stderr.strip()
        assert "\n" not in line and why in line, (case, line)
    assert target.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.gguf"]


def test_check_with_the_original_recomputes_a_gguf(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, tmp_path: Path
) -> None:
    """Verified by recomputation, not the local record: the original GGUF projected again must reproduce it."""
    out = tmp_path / "sanitized.gguf"
    assert cli("project", *_pair(llama_pair), "--adapter", gguf_file, "--output", out).exit_code == 0
    base, aligned = llama_pair
    pair = ["--base", base, "--aligned", aligned]
    done = cli("check", out, *pair, "--original", gguf_file, "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["verified_by"] == "recomputation"
    edited = bytearray(out.read_bytes())
    layout = _layout(out)
    b = next(t for t in layout.tensors if t.name == "blk.0.attn_q.weight.lora_b")
    edited[layout.data_start + b.offset + 3] ^= 0x10
    forged = tmp_path / "forged.gguf"
    forged.write_bytes(bytes(edited))
    assert cli("check", forged, *pair, "--original", gguf_file).exit_code == 3


@pytest.mark.parametrize("case", ["2^63 tensors", "2^63 pairs", "2^63-byte string", "deep arrays"])
def test_absurd_counts_are_refused_before_anything_is_allocated(tmp_path: Path, case: str) -> None:
    """The header's claims are checked against the file's size first: memory follows the file, not its counts."""
    import tracemalloc

    target = tmp_path / "hostile.gguf"
    target.write_bytes(HOSTILE[case][0])
    tracemalloc.start()
    try:
        with target.open("rb") as f, pytest.raises(FormatError):
            ggufile.read_layout(f, target.stat().st_size, str(target), SizeOf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_a_huge_array_claim_in_a_small_file_is_refused(tmp_path: Path) -> None:
    body = _s("general.tags") + struct.pack("<IIQ", 9, 8, 2**40) + _s("x") * 4
    target = tmp_path / "a.gguf"
    target.write_bytes(_header(0, 1, body))
    with target.open("rb") as f, pytest.raises(FormatError, match="claims 1099511627776 elements"):
        ggufile.read_layout(f, target.stat().st_size, str(target), SizeOf)


def test_ctrl_c_says_a_gguf_is_unchanged(
    cli: Callable[..., Result],
    llama_pair: tuple[Path, Path],
    gguf_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safelora_cli.run import pipeline

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "project_adapters", interrupted)
    target = tmp_path / "a.gguf"
    target.write_bytes(gguf_file.read_bytes())
    done = cli("project", *_pair(llama_pair), "--adapter", target)
    assert done.exit_code == 130
    assert done.stderr == f"interrupted; unchanged: {target}\n"


def test_a_batch_mixes_formats_and_two_files_of_one_directory_are_two_adapters(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "one.gguf", tmp_path / "two.gguf"
    for target in (first, second):
        target.write_bytes(gguf_file.read_bytes())
    adapters = ["--adapter", first, "--adapter", second, "--adapter", adapter_dir]
    done = cli("project", *_pair(llama_pair), *adapters, "--json")
    assert done.exit_code == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["adapter"] for r in reports] == [str(first), str(second), str(adapter_dir)]
    assert first.read_bytes() == second.read_bytes() != gguf_file.read_bytes()
    for target in (first, second, adapter_dir):
        assert cli("check", target).exit_code == 0


def test_a_batch_output_directory_takes_each_gguf_file_by_its_name(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "one.gguf", tmp_path / "two.gguf"
    for target in (first, second):
        target.write_bytes(gguf_file.read_bytes())
    out = tmp_path / "out"
    done = cli("project", *_pair(llama_pair), first, second, adapter_dir, "--output", out)
    assert done.exit_code == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["one.gguf", "two.gguf", adapter_dir.name])
    assert first.read_bytes() == gguf_file.read_bytes()  # the sources stay as they were
    for target in (out / "one.gguf", out / "two.gguf", out / adapter_dir.name):
        assert cli("check", target).exit_code == 0


def test_a_signed_gguf_file_has_its_attestation_named_after_it(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, tmp_path: Path
) -> None:
    """Two GGUF adapters of one directory: each its own FILE.gguf.intoto.json, verified by the key."""
    private, public, keyid = write_key(tmp_path / "keys")
    first, second = tmp_path / "one.gguf", tmp_path / "two.gguf"
    for target in (first, second):
        target.write_bytes(gguf_file.read_bytes())
    done = cli("project", *_pair(llama_pair), first, second, "--sign-key", private)
    assert done.exit_code == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.intoto.json")) == ["one.gguf.intoto.json", "two.gguf.intoto.json"]
    verdict = cli("check", first, "--public-key", public, "--json")
    assert verdict.exit_code == 0, verdict.stderr
    assert json.loads(verdict.stdout)["signed_by"] == keyid
    assert cli("restore", first).exit_code == 0  # what it attested is gone, and so is the attestation
    assert not (tmp_path / "one.gguf.intoto.json").exists() and (tmp_path / "two.gguf.intoto.json").exists()
    assert cli("project", *_pair(llama_pair), first).exit_code == 0  # unsigned now
    assert cli("check", first, "--public-key", public).exit_code == 3
    signed = cli("sign", first, "--sign-key", private)  # verified by the local record, then signed
    assert signed.exit_code == 0, signed.stderr
    assert cli("check", first, "--public-key", public).exit_code == 0


_T = gguf.GGMLQuantizationType
_TYPES = {"F32": (_T.F32, _T.F32), "F16": (_T.F16, _T.F16), "BF16": (_T.BF16, _T.BF16), "Q8_0": (_T.Q8_0, _T.F16)}


@pytest.mark.parametrize("types", sorted(_TYPES))
def test_force_restores_an_edited_gguf_of_each_type_and_refuses_another_lora_a(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, tmp_path: Path, types: str
) -> None:
    """restore --force compares lora_a as the format reads it (Q8_0 dequantized), not as safetensors
    dtypes: an edited lora_b is forced back to the original; a file whose lora_a is not the backup's,
    though its stamp names that backup, is refused whatever the force."""
    a_type, b_type = _TYPES[types]
    peft = builders.make_adapter(
        llama_pair[1], tmp_path / "peft", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    original = write_gguf(tmp_path / "original.gguf", peft, a_type=a_type, b_type=b_type).read_bytes()
    target = tmp_path / f"{types}.gguf"
    target.write_bytes(original)
    assert cli("project", *_pair(llama_pair), "--adapter", target).exit_code == 0
    projected = target.read_bytes()
    layout = _layout(target)
    a = next(t for t in layout.tensors if t.name.endswith(".lora_a"))
    b = next(t for t in layout.tensors if t.name.endswith(".lora_b"))

    def edited(tensor: ggufile.TensorInfo) -> bytes:
        data = bytearray(projected)
        data[layout.data_start + tensor.offset + 1] ^= 0x40
        return bytes(data)

    other = tmp_path / "other.gguf"  # another adapter's lora_a under this stamp
    other.write_bytes(edited(a))
    refused = cli("restore", other, "--force")
    assert refused.exit_code == 1 and "other lora_A tensors" in refused.stderr, refused.stderr
    assert other.read_bytes() == edited(a)

    target.write_bytes(edited(b))
    assert "changed since" in cli("restore", target).stderr
    assert target.read_bytes() == edited(b)
    forced = cli("restore", target, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert target.read_bytes() == original


def test_a_glob_matches_gguf_files_and_leaves_out_files_no_format_claims(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    """'runs/*' takes adapter directories and the files a format claims by content (GGUF magic, not the
    name: one is named .bin); README.md, a .gguf-named text file and a FIFO beside them are left out,
    named in a note, and never opened for writing."""
    runs = tmp_path / "runs"
    runs.mkdir()
    first, second = runs / "one.gguf", runs / "two.bin"
    for target in (first, second):
        target.write_bytes(gguf_file.read_bytes())
    directory = Path(shutil.copytree(adapter_dir, runs / "peft"))
    (runs / "README.md").write_text("# runs\n")
    (runs / "fake.gguf").write_text("not a GGUF\n")
    os.mkfifo(runs / "pipe")
    done = cli("project", *_pair(llama_pair), "--adapter", runs / "*", "--json")
    assert done.exit_code == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["adapter"] for r in reports] == [str(first), str(directory), str(second)]
    assert "README.md" in done.stderr and "fake.gguf" in done.stderr and "pipe" in done.stderr
    assert (runs / "README.md").read_text() == "# runs\n" and (runs / "fake.gguf").read_text() == "not a GGUF\n"
    for target in (first, second, directory):
        assert cli("check", target).exit_code == 0
    inside = cli("check", directory / "*")  # a directory format's files are no adapters of their own
    assert inside.exit_code == 2 and "adapter_model.safetensors" in inside.stderr, inside.stderr


def test_a_gguf_glob_writes_each_file_by_its_name_and_one_matching_no_adapter_is_a_usage_error(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], gguf_file: Path, tmp_path: Path
) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name in ("one.gguf", "two.gguf"):
        (adapters / name).write_bytes(gguf_file.read_bytes())
    (adapters / "notes.txt").write_text("trained on 2 GPUs\n")
    out = tmp_path / "out"
    done = cli("project", *_pair(llama_pair), "--adapter", adapters / "*.gguf", "--output", out)
    assert done.exit_code == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["one.gguf", "two.gguf"]
    for target in (out / "one.gguf", out / "two.gguf"):
        assert cli("check", target).exit_code == 0
    none = cli("project", *_pair(llama_pair), "--adapter", adapters / "*.txt")
    assert none.exit_code == 2 and "matches no adapter" in none.stderr and "notes.txt" in none.stderr
    literal = adapters / "x[12].gguf"  # a path that exists is taken literally, never as a pattern
    literal.write_bytes(gguf_file.read_bytes())
    (adapters / "x1.gguf").write_bytes(gguf_file.read_bytes())
    once = cli("project", *_pair(llama_pair), "--adapter", literal, "--json")
    assert once.exit_code == 0, once.stderr
    assert [json.loads(line)["adapter"] for line in once.stdout.splitlines()] == [str(literal)]
    assert (adapters / "x1.gguf").read_bytes() == gguf_file.read_bytes()


def test_a_gguf_projected_with_the_pair_on_the_hub_is_the_one_projected_locally(
    cli: Callable[..., Result],
    llama_pair: tuple[Path, Path],
    gguf_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The base's config.json (its class and head counts: attn_q/attn_k's row order) read from a Hub
    repo: every tensor and pair but the stamp's source names as with the local pair, and the same
    content identity, so the local pair verifies it."""
    root = tmp_path / "hub"
    for repo, files in (("base", llama_pair[0]), ("aligned", llama_pair[1])):
        (root / "org" / repo).mkdir(parents=True)
        (root / "org" / repo / "main").symlink_to(files)
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    local, remote = tmp_path / "local.gguf", tmp_path / "remote.gguf"
    assert cli("project", *_pair(llama_pair), "--adapter", gguf_file, "--output", local).exit_code == 0
    with FakeHub(root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        pair = ["--base", "org/base", "--aligned", "org/aligned", "--threshold", "0.99"]
        done = cli("project", *pair, "--adapter", gguf_file, "--output", remote)
        assert done.exit_code == 0, done.stderr
        asked = [path for _, path in hub.requests if path.endswith("/config.json")]
        assert any(path.startswith("/org/base/resolve/") for path in asked), hub.requests
    assert _tensor_bytes(remote) == _tensor_bytes(local) != _tensor_bytes(gguf_file)
    ours, theirs = _layout(local), _layout(remote)
    assert [t.raw for t in ours.tensors] == [t.raw for t in theirs.tensors]
    kept = {kv.key: kv.raw for kv in ours.kvs}
    differ = sorted(kv.key for kv in theirs.kvs if kept.get(kv.key) != kv.raw)
    assert differ == ["safelora.aligned", "safelora.base", "safelora.digest"], differ
    assert theirs.value("safelora.base") == f"org/base@{FakeHub.sha('org/base', 'main')}"
    assert cli("check", remote, *_pair(llama_pair)[:4]).exit_code == 0
