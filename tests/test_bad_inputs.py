"""A corpus of malformed, mismatched and hostile inputs: each one costs the user nothing.

Every case below builds one bad input from fresh copies of the tiny Llama pair and adapter, runs
``safelora`` on it, and checks the same four promises: exit code 1, exactly one line on stderr that
names the file or tensor and says what to do, no traceback, and every file under the test's
directory byte-identical afterwards (no input changed, no temp file left behind).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import builders
from support.run import project_adapter
from transformers import LlamaForCausalLM

from safelora_cli.adapters import opened
from safelora_cli.adapters.digest import file_digest
from safelora_cli.adapters.lora_config import CONFIG_FILE
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.io import atomic, locks, ranges
from safelora_cli.results import Settings
from safelora_cli.sources import open_local

Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V3_WEIGHT = "model.layers.3.self_attn.v_proj.weight"


@dataclass
class Inputs:
    """Fresh, writable copies for one case; ``args`` is what the case runs (``project`` by default)."""

    root: Path
    adapter: Path
    base: Path
    aligned: Path
    monkeypatch: pytest.MonkeyPatch
    args: list[str] = field(default_factory=list)
    # checks the case adds to the shared ones, run after the command
    after: list[Callable[[], None]] = field(default_factory=list)

    @property
    def adapter_file(self) -> Path:
        return self.adapter / ADAPTER_FILE

    def project(self, *extra: str | Path) -> None:
        self.args = [
            "project",
            "--adapter",
            str(self.adapter),
            "--base",
            str(self.base),
            "--aligned",
            str(self.aligned),
        ]
        self.args += [str(e) for e in extra]

    def shard_of(self, model: Path, tensor: str) -> Path:
        index = json.loads((model / "model.safetensors.index.json").read_text())
        return model / index["weight_map"][tensor]


# --- editing safetensors files the way corruption and hostile writers would ---------------------------


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Path, header: dict[str, Any] | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, body = read_raw(path)
    edit(header)
    write_raw(path, header, body)


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None], metadata: dict[str, str]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def tensor_entries(header: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][0])


def drop_from_sharded(model: Path, tensor: str) -> None:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = model / index["weight_map"].pop(tensor)
    edit_header(shard, lambda h: h.pop(tensor))  # its bytes stay, unreferenced, as a careless tool leaves them
    index_path.write_text(json.dumps(index))


# --- the corpus ------------------------------------------------------------------------------------------

# name -> (build the bad input, substrings the one-line message must contain: what and where, then the fix)
Case = Callable[[Inputs], tuple[str, ...]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(build: Case) -> Case:
        CASES[name] = build
        return build

    return register


@case("adapter file truncated in its data")
def _(i: Inputs) -> tuple[str, ...]:
    truncate(i.adapter_file, i.adapter_file.stat().st_size - 100)
    i.project()
    return str(i.adapter_file), "truncated", "save it again"


@case("adapter file truncated inside its header")
def _(i: Inputs) -> tuple[str, ...]:
    truncate(i.adapter_file, 40)
    i.project()
    return str(i.adapter_file), "truncated", "save it again"


@case("adapter file empty")
def _(i: Inputs) -> tuple[str, ...]:
    truncate(i.adapter_file, 0)
    i.project()
    return str(i.adapter_file), "too short", "save it again"


@case("adapter header length larger than the file")
def _(i: Inputs) -> tuple[str, ...]:
    data = i.adapter_file.read_bytes()
    i.adapter_file.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    i.project()
    return str(i.adapter_file), "header length", "save it again"


@case("adapter header not JSON")
def _(i: Inputs) -> tuple[str, ...]:
    _, body = read_raw(i.adapter_file)
    write_raw(i.adapter_file, b'{"base_model.model.x": {"dtype": "F32", ' + b"\xff" * 16, body)
    i.project()
    return str(i.adapter_file), "not valid JSON", "save it again"


@case("adapter header a JSON list")
def _(i: Inputs) -> tuple[str, ...]:
    _, body = read_raw(i.adapter_file)
    write_raw(i.adapter_file, b"[1, 2, 3]", body)
    i.project()
    return str(i.adapter_file), "not a JSON object", "save it again"


@case("adapter header nested too deep to parse")
def _(i: Inputs) -> tuple[str, ...]:
    _, body = read_raw(i.adapter_file)
    write_raw(i.adapter_file, b"[" * 100_000 + b"]" * 100_000, body)
    i.project()
    return str(i.adapter_file), "not valid JSON", "save it again"


@case("adapter data offsets beyond the end of the file")
def _(i: Inputs) -> tuple[str, ...]:
    def shift_last(h: dict[str, Any]) -> None:
        last = tensor_entries(h)[-1]
        last["data_offsets"] = [o + 4096 for o in last["data_offsets"]]

    edit_header(i.adapter_file, shift_last)
    i.project()
    return str(i.adapter_file), "beyond the end of the file", "save it again"


@case("adapter tensors overlapping")
def _(i: Inputs) -> tuple[str, ...]:
    def overlap(h: dict[str, Any]) -> None:
        first, second = tensor_entries(h)[:2]
        second["data_offsets"] = list(first["data_offsets"])

    edit_header(i.adapter_file, overlap)
    i.project()
    return str(i.adapter_file), "overlaps", "save it again"


@case("adapter dtype and shape disagree with the byte count")
def _(i: Inputs) -> tuple[str, ...]:
    edit_header(i.adapter_file, lambda h: h[Q0_A].update(dtype="F16"))
    i.project()
    return str(i.adapter_file), Q0_A, "save it again"


@case("adapter tensor of an unknown dtype")
def _(i: Inputs) -> tuple[str, ...]:
    edit_header(i.adapter_file, lambda h: h[Q0_A].update(dtype="Q4_K"))
    i.project()
    return str(i.adapter_file), Q0_A, "unsupported dtype"


@case("adapter metadata not strings")
def _(i: Inputs) -> tuple[str, ...]:
    edit_header(i.adapter_file, lambda h: h.update(__metadata__={"format": ["pt"]}))
    i.project()
    return str(i.adapter_file), "__metadata__", "save it again"


@case("checkpoint shard truncated")
def _(i: Inputs) -> tuple[str, ...]:
    shard = i.shard_of(i.base, V3_WEIGHT)
    truncate(shard, shard.stat().st_size // 2)
    i.project()
    return str(shard), "truncated", "download, copy or save it again"


@case("checkpoint shard header not JSON")
def _(i: Inputs) -> tuple[str, ...]:
    shard = i.shard_of(i.aligned, V3_WEIGHT)
    _, body = read_raw(shard)
    write_raw(shard, b"not json at all", body)
    i.project()
    return str(shard), "not valid JSON", "download, copy or save it again"


@case("checkpoint index not JSON")
def _(i: Inputs) -> tuple[str, ...]:
    (i.aligned / "model.safetensors.index.json").write_text("{'weight_map': ")
    i.project()
    return "model.safetensors.index.json", "not a valid index", "download the checkpoint again"


@case("checkpoint model.safetensors is a directory")
def _(i: Inputs) -> tuple[str, ...]:
    (i.base / "model.safetensors.index.json").unlink()
    (i.base / "model.safetensors").mkdir()
    i.project()
    return str(i.base / "model.safetensors"), "is a directory", "download the checkpoint again"


@case("checkpoint missing a targeted module")
def _(i: Inputs) -> tuple[str, ...]:
    drop_from_sharded(i.base, V3_WEIGHT)
    i.project()
    return str(i.base), "model.layers.3.self_attn.v_proj", "pass the checkpoint the adapter was trained on"


@case("NaN in a checkpoint weight")
def _(i: Inputs) -> tuple[str, ...]:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[V3_WEIGHT][1, 2] = float("nan")

    edit_tensors(i.shard_of(i.aligned, V3_WEIGHT), poison, {"format": "pt"})
    i.project()
    return V3_WEIGHT, "NaN or Inf", "re-export"


@case("Inf in the adapter's lora_B")
def _(i: Inputs) -> tuple[str, ...]:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[Q0_B][0, 0] = float("inf")

    edit_tensors(i.adapter_file, poison, {"format": "pt"})
    i.project()
    return Q0_B, "NaN or Inf", "re-export"


@case("base and aligned of different sizes")
def _(i: Inputs) -> tuple[str, ...]:
    i.project()
    i.args[i.args.index("--aligned") + 1] = str(i.root / "small" / "aligned")
    return "model.layers.0.self_attn.q_proj", str(i.base), "same architecture and size"


@case("base and aligned of different architectures")
def _(i: Inputs) -> tuple[str, ...]:
    i.project()
    i.args[i.args.index("--aligned") + 1] = str(i.root / "gpt2" / "aligned")
    return "model.layers.0.self_attn.q_proj", str(i.root / "gpt2" / "aligned"), "pass the checkpoint"


@case("adapter trained on another model")
def _(i: Inputs) -> tuple[str, ...]:
    i.base, i.aligned = i.root / "small" / "base", i.root / "small" / "aligned"
    i.project()
    return "model.layers.0.self_attn.q_proj", "trained on another model", "pass the base/aligned pair"


@case("bin checkpoint whose pickle would run code")
def _(i: Inputs) -> tuple[str, ...]:
    marker = i.root / "pwned"
    state: dict[str, Any] = builders.load_state(i.aligned)
    state["payload"] = _RunsCode(marker)
    shutil.rmtree(i.aligned)
    i.aligned.mkdir()
    torch.save(state, i.aligned / "pytorch_model.bin")

    def code_did_not_run() -> None:
        assert not marker.exists(), "the pickle's code ran"

    i.after.append(code_did_not_run)
    i.project()
    return str(i.aligned / "pytorch_model.bin"), "refused to unpickle", "convert it to safetensors"


@case("adapter_config.json missing")
def _(i: Inputs) -> tuple[str, ...]:
    (i.adapter / CONFIG_FILE).unlink()
    i.project()
    return str(i.adapter / CONFIG_FILE), "missing", "or a PEFT adapter directory"


@case("adapter_config.json not JSON")
def _(i: Inputs) -> tuple[str, ...]:
    (i.adapter / CONFIG_FILE).write_text('{"r": 8, "target_modules": ["q_proj",')
    i.project()
    return str(i.adapter / CONFIG_FILE), "not valid JSON", "restore it"


@case("adapter_config.json not UTF-8")
def _(i: Inputs) -> tuple[str, ...]:
    (i.adapter / CONFIG_FILE).write_bytes(b'{"r": 8, "x": "\xff\xfe"}')
    i.project()
    return str(i.adapter / CONFIG_FILE), "not valid JSON", "restore it"


@case("adapter_config.json a directory")
def _(i: Inputs) -> tuple[str, ...]:
    (i.adapter / CONFIG_FILE).unlink()
    (i.adapter / CONFIG_FILE).mkdir()
    i.project()
    return str(i.adapter / CONFIG_FILE), "not a regular file", "pass a PEFT adapter directory"


@case("adapter config not LoRA")
def _(i: Inputs) -> tuple[str, ...]:
    config = json.loads((i.adapter / CONFIG_FILE).read_text())
    (i.adapter / CONFIG_FILE).write_text(json.dumps({**config, "peft_type": "IA3"}))
    i.project()
    return str(i.adapter / CONFIG_FILE), "IA3", "LoRA adapters only"


@case("config r disagrees with the tensors")
def _(i: Inputs) -> tuple[str, ...]:
    config = json.loads((i.adapter / CONFIG_FILE).read_text())
    (i.adapter / CONFIG_FILE).write_text(json.dumps({**config, "r": 16}))
    i.project()
    return str(i.adapter_file), "r=16", "do not belong together"


@case("config target_modules disagree with the tensors")
def _(i: Inputs) -> tuple[str, ...]:
    config = json.loads((i.adapter / CONFIG_FILE).read_text())
    (i.adapter / CONFIG_FILE).write_text(json.dumps({**config, "target_modules": ["k_proj", "o_proj"]}))
    i.project()
    return str(i.adapter_file), "target_modules", "do not belong together"


@case("config target_modules an invalid regex")
def _(i: Inputs) -> tuple[str, ...]:
    config = json.loads((i.adapter / CONFIG_FILE).read_text())
    (i.adapter / CONFIG_FILE).write_text(json.dumps({**config, "target_modules": ".*(q_proj|v_proj"}))
    i.project()
    return str(i.adapter / CONFIG_FILE), "target_modules", "restore it"


@case("config rank_pattern key an invalid regex")
def _(i: Inputs) -> tuple[str, ...]:
    config = json.loads((i.adapter / CONFIG_FILE).read_text())
    (i.adapter / CONFIG_FILE).write_text(json.dumps({**config, "rank_pattern": {"q_proj[": 8}}))
    i.project()
    return str(i.adapter / CONFIG_FILE), "rank_pattern", "restore it"


@case("LoRA weight of an integer dtype")
def _(i: Inputs) -> tuple[str, ...]:
    def quantize(t: dict[str, torch.Tensor]) -> None:
        t[Q0_B] = (t[Q0_B] * 100).to(torch.int8)

    edit_tensors(i.adapter_file, quantize, {"format": "pt"})
    i.project()
    return Q0_B, "I8; Safe LoRA computes on float16", "save the adapter"


@case("lora_A without lora_B")
def _(i: Inputs) -> tuple[str, ...]:
    edit_tensors(i.adapter_file, lambda t: t.pop(Q0_B), {"format": "pt"})
    i.project()
    return Q0_A, "no matching lora_B", "incomplete"


@case("lora_A and lora_B of different ranks")
def _(i: Inputs) -> tuple[str, ...]:
    def cut_rank(t: dict[str, torch.Tensor]) -> None:
        t[Q0_B] = t[Q0_B][:, :4].contiguous()

    edit_tensors(i.adapter_file, cut_rank, {"format": "pt"})
    i.project()
    return Q0_B, "ranks differ", "incomplete"


@case("adapter file a directory")
def _(i: Inputs) -> tuple[str, ...]:
    i.adapter_file.unlink()
    i.adapter_file.mkdir()
    i.project()
    return str(i.adapter_file), "not a regular file", "pass a PEFT adapter directory"


@case("adapter with only adapter_model.bin")
def _(i: Inputs) -> tuple[str, ...]:
    torch.save(load_file(i.adapter_file), i.adapter / "adapter_model.bin")
    i.adapter_file.unlink()
    i.project()
    return str(i.adapter), "adapter_model.bin", "safe_serialization=True"


@case("adapter path a Hub repo id")
def _(i: Inputs) -> tuple[str, ...]:
    i.project()
    i.args[i.args.index("--adapter") + 1] = "some-org/some-lora"
    return "some-org/some-lora", "adapters are local directories", "download it first"


@case("adapter path missing")
def _(i: Inputs) -> tuple[str, ...]:
    i.project()
    i.args[i.args.index("--adapter") + 1] = str(i.root / "no" / "such" / "adapter")
    return str(i.root / "no" / "such" / "adapter"), "does not exist", "or a PEFT adapter directory"


@case("adapter file a symlink, patched in place")
def _(i: Inputs) -> tuple[str, ...]:
    # Refused: os.replace would swap the link for a regular file and leave its target (often a
    # shared blob, as in the Hugging Face cache) untouched, which is rarely what anyone meant.
    real = i.root / "elsewhere" / ADAPTER_FILE
    real.parent.mkdir()
    i.adapter_file.rename(real)
    i.adapter_file.symlink_to(real)
    i.project()
    return str(i.adapter_file), "symbolic link", "--output"


@case("adapter directory read-only")
def _(i: Inputs) -> tuple[str, ...]:
    i.adapter.chmod(0o555)
    i.after.append(lambda: i.adapter.chmod(0o755))
    if os.geteuid() == 0:
        # root ignores directory permissions; fail the temp file as the kernel fails it for anyone else
        real_open = os.open
        adapter_dir = os.stat(i.adapter)

        def denied(path: Any, flags: int, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> Any:
            if flags & os.O_CREAT and dir_fd is not None and os.path.samestat(os.fstat(dir_fd), adapter_dir):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

        i.monkeypatch.setattr(atomic.os, "open", denied)
    i.project()
    return str(i.adapter), "cannot create a file", "--output"


@case("disk full while writing")
def _(i: Inputs) -> tuple[str, ...]:
    real_write = ranges.write_chunks

    def fills_up(fd: int, chunks: Iterable[Any]) -> None:
        """The disk fills up after the first chunk, as ENOSPC surfaces mid-file."""
        first, *_ = chunks
        real_write(fd, [first])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    i.monkeypatch.setattr(ranges, "write_chunks", fills_up)
    i.project("--no-backup")  # the adapter's own write fills the disk (the backup's is the next case)
    return str(i.adapter_file), "No space left on device", "--output"


@case("disk full while keeping the original")
def _(i: Inputs) -> tuple[str, ...]:
    real_write = ranges.write_all

    def fills_up(fd: int, data: bytes | memoryview) -> None:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    i.monkeypatch.setattr(ranges, "write_all", fills_up)
    i.project()
    return "No space left on device", "cannot keep the original", "adapter was not changed", "--no-backup"


@case("adapter on a filesystem without locks")
def _(i: Inputs) -> tuple[str, ...]:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    i.monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    i.project()
    return str(i.adapter), "cannot lock", "--output"


@case("provenance from a hostile writer")
def _(i: Inputs) -> tuple[str, ...]:
    settings = Settings(mode="number", num_layers=2)
    base, aligned = open_local(i.base), open_local(i.aligned)
    try:
        project_adapter(i.adapter, base, aligned, settings)
    finally:
        base.close()
        aligned.close()
    edit_header(i.adapter_file, lambda h: h["__metadata__"].update({"safelora.threshold": "{oops"}))
    i.project("--num-layers", "2")  # the same pair and settings: an edited stamp is no reason to skip the work
    return str(i.adapter_file), "nothing verifies the stamp", "--original"


@case("provenance from a hostile writer, checked")
def _(i: Inputs) -> tuple[str, ...]:
    base, aligned = open_local(i.base), open_local(i.aligned)
    try:
        project_adapter(i.adapter, base, aligned, Settings())
    finally:
        base.close()
        aligned.close()
    # the digest covers the stamp, but anyone can recompute it: a forged list with its digest, trusted
    edit_header(i.adapter_file, lambda h: h["__metadata__"].update({"safelora.projected": "7"}))
    with opened(i.adapter) as forged:
        digest = file_digest(forged)
    edit_header(i.adapter_file, lambda h: h["__metadata__"].update({"safelora.digest": digest}))
    i.args = ["check", "--adapter", str(i.adapter), "--trust-stamp"]
    return str(i.adapter_file), "safelora.projected", "original adapter"


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


# --- running the corpus ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A smaller Llama (hidden 32) and a GPT-2: same method, other shapes and names."""
    small = builders.llama_config(hidden_size=32, intermediate_size=64)
    return {
        "small": builders.save_pair(LlamaForCausalLM, small, tmp_path_factory.mktemp("small")),
        "gpt2": builders.gpt2_pair(tmp_path_factory.mktemp("gpt2")),
    }


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, ``link -> target`` or ``dir``."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = p.read_bytes()
    return out


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_costs_nothing(
    name: str,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    other_pairs: dict[str, tuple[Path, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli: Callable[..., Any],
) -> None:
    root = tmp_path / "inputs"
    i = Inputs(root, root / "adapter", root / "base", root / "aligned", monkeypatch)
    shutil.copytree(llama_adapter, i.adapter)
    shutil.copytree(llama_pair[0], i.base)
    shutil.copytree(llama_pair[1], i.aligned)
    for kind, (base, aligned) in other_pairs.items():
        shutil.copytree(base, root / kind / "base")
        shutil.copytree(aligned, root / kind / "aligned")
    expected = CASES[name](i)
    before = snapshot(root)

    result = cli(*i.args)

    for check in i.after:
        check()
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert snapshot(root) == before


def test_a_symlinked_adapter_file_is_read_and_can_be_patched_into_output(
    llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    real = tmp_path / "blobs" / ADAPTER_FILE
    real.parent.mkdir()
    (adapter_dir / ADAPTER_FILE).rename(real)
    (adapter_dir / ADAPTER_FILE).symlink_to(real)
    original = real.read_bytes()
    pair = ["--base", llama_pair[0], "--aligned", llama_pair[1]]

    assert cli("inspect", adapter_dir).exit_code == 0
    assert cli("project", "--adapter", adapter_dir, *pair, "--dry-run").exit_code == 0
    result = cli("project", "--adapter", adapter_dir, *pair, "--output", tmp_path / "out")

    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / ADAPTER_FILE).read_bytes() != original
    assert not (tmp_path / "out" / ADAPTER_FILE).is_symlink()
    assert (adapter_dir / ADAPTER_FILE).is_symlink() and real.read_bytes() == original
