"""A hostile corpus: what someone who sends safelora an adapter, a checkpoint, a path, a config or a
cache entry could do to it, and what it must cost them.

Each attack builds one hostile input in a world of its own (an adapter, a base and an aligned
checkpoint, and a ``victim`` directory standing for everything else on the machine), runs a real
``safelora`` process (forked from a server that imported torch once), and checks the same promises:

- the exit code: 1 for bad input or I/O, 2 for usage errors, 3 only from ``check``, 0 where the
  attack is defused and the run goes on;
- an error is one line starting with ``error:``, and there is never a traceback;
- no hang: the process is killed after ``TIMEOUT`` seconds, which fails the attack;
- every file that must not change is unchanged (bytes, or identity for multi-GB sparse files), and
  nothing is created outside the named output;
- peak RSS stays within ``MEMORY`` plus 4 × the largest legitimate tensor, where memory is the target.

The attacks are grouped by the class of promise they test (``CLASSES``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.fakehub import ENDLESS, FakeHub
from support.forkserver import ForkServer, Run
from typer.testing import CliRunner

from safelora_cli.adapters import opened
from safelora_cli.adapters.digest import file_digest
from safelora_cli.adapters.lora_config import CONFIG_FILE
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.cli import app
from safelora_cli.io.atomic import TMP_MARK
from safelora_cli.stores import cache_entries

TIMEOUT = 30.0
MEMORY = 512 << 20  # bytes of RSS any run may use, beyond 4 × the largest legitimate tensor
BIG = 4 << 30  # the size a sparse file claims
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
Q0_A, Q0_B = f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight"
BASE_Q0 = "model.layers.0.self_attn.q_proj.weight"

CLASSES = {
    1: "paths: one name, one object, resolved once; non-regular files; OS errors",
    2: "parsers: duplicate keys, absurd numbers, deep nesting, oversized headers, wrong types",
    3: "printing: data is never markup, control characters are escaped, output cannot fail a written run",
    4: "memory: bounded by the real work, whatever files, headers and servers claim",
    5: "tensors the method does not define",
    6: "regular expressions from adapter configs cannot stall a run",
    7: "the projection cache cannot be turned against a run",
    8: "--output copies only what belongs to the adapter",
    9: "tokens that cannot go into an HTTP header",
    10: "check judges every adapter it is given",
}


@dataclass
class World:
    """One attack's inputs and what the run may and must do to them."""

    root: Path
    logs: Path
    adapter: Path
    base: Path
    aligned: Path
    victim: Path
    sanitized: Path  # an adapter safelora projected, ready to copy
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    exit: int = 1
    output: Path | None = None  # may be created or changed
    changes: set[Path] = field(default_factory=set)  # files the run may change
    rss_tensor: int | None = None  # bytes of the largest legitimate tensor, where memory is checked
    stdout_closed: bool = False
    during: Callable[[], None] | None = None  # runs on a thread while the process runs
    checks: list[Callable[[Result], None]] = field(default_factory=list)
    cleanup: ExitStack = field(default_factory=ExitStack)  # servers the attack started

    @property
    def adapter_file(self) -> Path:
        return self.adapter / ADAPTER_FILE

    def pair(self) -> list[str]:
        return ["--base", str(self.base), "--aligned", str(self.aligned)]

    def project(self, *extra: object, adapter: object = None) -> None:
        """``safelora project`` on the adapter (or ``adapter``), JSON on stdout, nothing else printed."""
        target = self.adapter if adapter is None else adapter
        self.argv = ["project", "--adapter", str(target), *self.pair(), "--json", "--quiet", *map(str, extra)]

    def copy_adapter(self, name: str, source: Path | None = None) -> Path:
        return Path(shutil.copytree(source or self.adapter, self.root / name, symlinks=True))


@dataclass
class Result:
    status: int
    seconds: float
    maxrss: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


Attack = Callable[[World], None]
ATTACKS: dict[str, tuple[int, Attack]] = {}


def attack(klass: int, name: str) -> Callable[[Attack], Attack]:
    def register(build: Attack) -> Attack:
        assert name not in ATTACKS, name
        ATTACKS[name] = (klass, build)
        return build

    return register


# --- crafting files --------------------------------------------------------------------------------------


def read_raw(path: Path) -> tuple[list[tuple[str, Any]], bytes]:
    """A safetensors file as its header's (key, value) pairs, in order, and its data section."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return list(json.loads(data[8 : 8 + n]).items()), data[8 + n :]


def write_raw(path: Path, pairs: list[tuple[str, Any]] | bytes, body: bytes = b"", size: int | None = None) -> None:
    """A safetensors file from header pairs (duplicates kept, as a hostile writer would) or raw header
    bytes; ``size`` extends it with a hole (a sparse file)."""
    if isinstance(pairs, bytes):
        raw = pairs
    else:
        raw = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + body)
        if size is not None:
            f.truncate(size)


def data_end(pairs: list[tuple[str, Any]]) -> int:
    return max(v["data_offsets"][1] for k, v in pairs if k != "__metadata__")


def edit_config(adapter: Path, **changes: Any) -> None:
    config = json.loads((adapter / CONFIG_FILE).read_text())
    (adapter / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def shard_of(model: Path, tensor: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][tensor]


def to_bin(model: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Replace a sharded safetensors checkpoint by one ``pytorch_model.bin``, edited."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model.glob("*.safetensors")):
        state.update(load_file(shard))
    edit(state)
    for f in model.glob("model*"):
        f.unlink()
    torch.save(state, model / "pytorch_model.bin")


def when_writing(directory: Path, then: Callable[[], None]) -> Callable[[], None]:
    """A ``during`` step: once the run has a temp file in ``directory`` (it is writing), call ``then``."""

    def wait() -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if any(TMP_MARK in p.name for p in directory.iterdir()):
                then()
                return
            time.sleep(0.005)

    return wait


def repoint(link: Path, target: Path) -> None:
    """Atomically make ``link`` point at ``target``."""
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    os.replace(tmp, link)


# --- 1: paths ----------------------------------------------------------------------------------------------


@attack(1, "a path that exists is never a glob")
def _(w: World) -> None:
    literal = w.copy_adapter("adapter[1]")
    w.copy_adapter("adapter1")  # what the pattern adapter[1] matches
    w.project(adapter=literal)
    w.exit = 0
    w.changes = {literal / ADAPTER_FILE}


@attack(1, "a glob is expanded only when no such path exists, and the report lists it")
def _(w: World) -> None:
    a, b = w.copy_adapter("adapters/a"), w.copy_adapter("adapters/b")
    w.project("--dry-run", adapter=w.root / "adapters" / "*")
    w.exit = 0
    w.checks.append(lambda r: _expanded(r, [a, b]))


def _expanded(r: Result, paths: list[Path]) -> None:
    docs = [json.loads(line) for line in r.stdout.splitlines()]  # JSON Lines: one object per adapter
    assert [d["adapter"] for d in docs] == [str(p) for p in paths]
    assert all(any("matched 2" in n and all(str(p) in n for p in paths) for n in d["notes"]) for d in docs)


@attack(1, "the adapter symlink re-pointed mid-run does not redirect the write")
def _(w: World) -> None:
    other = w.copy_adapter("other")
    link = w.root / "link"
    link.symlink_to(w.adapter)
    w.project(adapter=link)
    w.env["SAFELORA_TEST_WRITE_DELAY"] = "0.05"
    w.during = when_writing(w.adapter, lambda: repoint(link, other))
    w.exit = 0
    w.changes = {w.adapter_file, link}
    w.checks.append(lambda r: _projected(w.adapter))


@attack(1, "a parent directory re-pointed mid-run does not redirect the write")
def _(w: World) -> None:
    first, second = w.root / "first", w.root / "second"
    w.copy_adapter("first/adapter")
    w.copy_adapter("second/adapter")
    link = w.root / "models"
    link.symlink_to(first)
    w.project(adapter=link / "adapter")
    w.env["SAFELORA_TEST_WRITE_DELAY"] = "0.05"
    w.during = when_writing(first / "adapter", lambda: repoint(link, second))
    w.exit = 0
    w.changes = {first / "adapter" / ADAPTER_FILE, link}
    w.checks.append(lambda r: _projected(first / "adapter"))


def _projected(adapter: Path) -> None:
    with (adapter / ADAPTER_FILE).open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        assert "safelora.digest" in json.loads(f.read(n))["__metadata__"], f"{adapter} was not the one rewritten"


@attack(1, "the same adapter named three ways is processed once")
def _(w: World) -> None:
    link = w.root / "alias"
    link.symlink_to(w.adapter)
    w.argv = ["project", *w.pair(), "--json", "--quiet"]
    for name in (w.adapter, w.adapter / ".." / w.adapter.name, link):
        w.argv += ["--adapter", str(name)]
    w.exit = 0
    w.changes = {w.adapter_file}
    w.checks.append(lambda r: _once(r))


def _once(r: Result) -> None:
    doc = r.json()
    assert isinstance(doc, dict) and doc["written"], "one adapter, one report"
    assert sum("same adapter directory" in n for n in doc["notes"]) == 2


@attack(1, "adapter_model.safetensors is a FIFO")
def _(w: World) -> None:
    w.adapter_file.unlink()
    os.mkfifo(w.adapter_file)
    w.project()


@attack(1, "adapter_config.json is a FIFO")
def _(w: World) -> None:
    (w.adapter / CONFIG_FILE).unlink()
    os.mkfifo(w.adapter / CONFIG_FILE)
    w.project()


@attack(1, "adapter_model.safetensors is a socket")
def _(w: World) -> None:
    w.adapter_file.unlink()
    os.mknod(w.adapter_file, 0o600 | stat.S_IFSOCK)
    w.project()


@attack(1, "adapter_model.safetensors links to /dev/zero")
def _(w: World) -> None:
    w.adapter_file.unlink()
    w.adapter_file.symlink_to("/dev/zero")
    w.project("--dry-run")
    w.rss_tensor = 0


@attack(1, "a checkpoint shard is a FIFO")
def _(w: World) -> None:
    shard = shard_of(w.base, BASE_Q0)
    shard.unlink()
    os.mkfifo(shard)
    w.project("--dry-run")


@attack(1, "the checkpoint index is a FIFO")
def _(w: World) -> None:
    index = w.base / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    w.project("--dry-run")


@attack(1, "pytorch_model.bin is a FIFO")
def _(w: World) -> None:
    for f in w.base.glob("model*"):
        f.unlink()
    os.mkfifo(w.base / "pytorch_model.bin")
    w.project("--dry-run")


@attack(1, "--config is a FIFO")
def _(w: World) -> None:
    config = w.root / "sanitize.yaml"
    os.mkfifo(config)
    w.project("--dry-run", "--config", config)


@attack(1, "an adapter path longer than the OS allows")
def _(w: World) -> None:
    w.project(adapter=w.root / ("a" * 300) / "adapter")


@attack(1, "adapter_model.safetensors is a symlink loop")
def _(w: World) -> None:
    w.adapter_file.unlink()
    w.adapter_file.symlink_to(ADAPTER_FILE)
    w.project("--dry-run")


@attack(1, "the adapter directory is a symlink loop")
def _(w: World) -> None:
    loop = w.root / "loop"
    loop.symlink_to(loop)
    w.project(adapter=loop)


# --- 2: parsers --------------------------------------------------------------------------------------------


@attack(2, "a duplicated lora_B key points the second entry at zeros")
def _(w: World) -> None:
    pairs, body = read_raw(w.adapter_file)
    end = data_end(pairs)
    b = dict(pairs)[Q0_B]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    zeros = {**b, "data_offsets": [end, end + size]}
    write_raw(w.adapter_file, [*pairs, (Q0_B, zeros)], body + bytes(size))
    w.project()


@attack(2, "a duplicated key in adapter_config.json")
def _(w: World) -> None:
    text = (w.adapter / CONFIG_FILE).read_text().rstrip().removesuffix("}")
    (w.adapter / CONFIG_FILE).write_text(text + ', "r": 4}')
    w.project("--dry-run")


@attack(2, "a 4300-digit integer in a tensor's offsets")
def _(w: World) -> None:
    pairs, body = read_raw(w.adapter_file)
    header = json.dumps(dict(pairs)).replace(json.dumps(dict(pairs)[Q0_A]["data_offsets"]), "[0, 1" + "0" * 4300 + "]")
    write_raw(w.adapter_file, header.encode(), body)
    w.project("--dry-run")


@attack(2, "NaN in adapter_config.json")
def _(w: World) -> None:
    text = (w.adapter / CONFIG_FILE).read_text().rstrip().removesuffix("}")
    (w.adapter / CONFIG_FILE).write_text(text + ', "lora_dropout": NaN}')
    w.project("--dry-run")


@attack(2, "adapter_config.json nested 100000 deep")
def _(w: World) -> None:
    (w.adapter / CONFIG_FILE).write_text('{"r": 8, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    w.project("--dry-run")


@attack(2, "a safetensors header larger than the reference library accepts")
def _(w: World) -> None:
    n = 100_000_008
    with w.adapter_file.open("wb") as f:
        f.write(struct.pack("<Q", n) + b'{"__metadata__": {}}')
        f.truncate(8 + n + 64)
    w.project("--dry-run")
    w.rss_tensor = 0


@attack(2, "__metadata__ holds a number")
def _(w: World) -> None:
    pairs, body = read_raw(w.adapter_file)
    tensors = [kv for kv in pairs if kv[0] != "__metadata__"]
    write_raw(w.adapter_file, [("__metadata__", {"format": "pt", "safelora.threshold": 0.5}), *tensors], body)
    w.project("--dry-run")


@attack(2, "a duplicated key in the checkpoint index points a weight at another shard")
def _(w: World) -> None:
    index_path = w.base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    other = next(s for s in shards if s != index["weight_map"][BASE_Q0])
    body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in index["weight_map"].items())
    index_path.write_text('{"weight_map": {' + body + f", {json.dumps(BASE_Q0)}: {json.dumps(other)}" + "}}")
    w.project("--dry-run")


@attack(2, "bytes after the last tensor (the reference library refuses them)")
def _(w: World) -> None:
    with w.adapter_file.open("ab") as f:
        f.write(b"\0" * 64)
    w.project("--dry-run")


@attack(2, "fan_in_fan_out is the string 'false'")
def _(w: World) -> None:
    edit_config(w.adapter, fan_in_fan_out="false")
    w.project("--dry-run")


@attack(2, "provenance holds a 4300-digit integer")
def _(w: World) -> None:
    pairs, body = read_raw(w.sanitized / ADAPTER_FILE)
    meta = {**dict(pairs)["__metadata__"], "safelora.projected": "[1" + "0" * 4300 + "]"}
    write_raw(w.adapter_file, [("__metadata__", meta), *(kv for kv in pairs if kv[0] != "__metadata__")], body)
    with opened(w.adapter) as forged:  # the digest recomputed, as anyone can, and the stamp trusted
        meta["safelora.digest"] = file_digest(forged)
    write_raw(w.adapter_file, [("__metadata__", meta), *(kv for kv in pairs if kv[0] != "__metadata__")], body)
    w.argv = ["check", "--adapter", str(w.adapter), "--trust-stamp"]


# --- 3: printing -------------------------------------------------------------------------------------------


def _add_tensor(adapter: Path, name: str) -> None:
    """One more float32 1×1 tensor named ``name``."""
    pairs, body = read_raw(adapter / ADAPTER_FILE)
    end = data_end(pairs)
    entry = {"dtype": "F32", "shape": [1, 1], "data_offsets": [end, end + 4]}
    write_raw(adapter / ADAPTER_FILE, [*pairs, (name, entry)], body + bytes(4))


@attack(3, "Rich markup in a tensor name is printed as it is")
def _(w: World) -> None:
    _add_tensor(w.adapter, "base_model.model.[bold red]INJECTED[/bold red].weight")
    w.argv = ["project", "--adapter", str(w.adapter), *w.pair(), "--dry-run"]
    w.exit = 0
    w.checks.append(lambda r: _literal(r.stdout, "[bold red]INJECTED[/bold red]"))


@attack(3, "a newline in a path keeps the error on one line")
def _(w: World) -> None:
    w.project(adapter=w.root / "evil\nerror: all fine")
    w.checks.append(lambda r: _literal(r.stderr, "evil\\nerror: all fine"))


@attack(3, "a newline in a tensor name is escaped in the list of passed-through tensors")
def _(w: World) -> None:
    _add_tensor(w.adapter, "base_model.model.evil\nnote: all fine.weight")
    w.argv = ["project", "--adapter", str(w.adapter), *w.pair(), "--dry-run"]
    w.exit = 0
    w.checks.append(lambda r: _literal(r.stdout, "evil\\nnote: all fine"))


@attack(3, "a terminal escape sequence in a tensor name is escaped")
def _(w: World) -> None:
    _add_tensor(w.adapter, "base_model.model.x\x1b[2J\x1b[31m.lora_A.weight")
    w.project("--dry-run")
    w.checks.append(lambda r: _literal(r.stderr, "x\\x1b[2J\\x1b[31m"))


@attack(3, "a bidi override in a path is escaped")
def _(w: World) -> None:
    w.project(adapter=w.root / "adapter\u202etxt.exe")
    w.checks.append(lambda r: _literal(r.stderr, "adapter\\u202etxt.exe"))


@attack(3, "an unbalanced markup closing tag in a path")
def _(w: World) -> None:
    w.project(adapter=w.root / "no[/such]adapter")
    w.exit = 2  # brackets make it a pattern, and it matches nothing: a usage error, still one line
    w.checks.append(lambda r: _literal(r.stderr, "no[/such]adapter"))
    w.checks.append(lambda r: _one_error_line(r.stderr))


def _one_error_line(text: str) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text


@attack(3, "an output that fails after the rewrite is a warning, exit 0")
def _(w: World) -> None:
    w.argv = ["project", "--adapter", str(w.adapter), *w.pair()]
    w.stdout_closed = True
    w.exit = 0
    w.changes = {w.adapter_file}
    w.checks.append(lambda r: _projected(w.adapter))
    w.checks.append(lambda r: _literal(r.stderr, "warning:"))


@attack(3, "the step summary is a FIFO: no hang, a warning, exit 0")
def _(w: World) -> None:
    fifo = w.root / "summary.md"
    os.mkfifo(fifo)
    w.env["GITHUB_STEP_SUMMARY"] = str(fifo)
    w.project()
    w.exit = 0
    w.changes = {w.adapter_file}
    w.checks.append(lambda r: _projected(w.adapter))
    w.checks.append(lambda r: _literal(r.stderr, "warning: the step summary was not written"))


@attack(3, "a model card that links to a victim file is never written through; the run fails, the weights stay")
def _(w: World) -> None:
    (w.adapter / "README.md").unlink(missing_ok=True)
    (w.adapter / "README.md").symlink_to(w.victim / "secret.txt")
    w.project("--model-card")
    w.exit = 1
    w.changes = {w.adapter_file}
    w.checks.append(lambda r: _projected(w.adapter))
    w.checks.append(lambda r: _literal(r.stderr, f"{w.adapter / 'README.md'}: is a symbolic link"))


@attack(3, "a plot path that links to a victim file is never written through")
def _(w: World) -> None:
    chart = w.root / "chart.png"
    chart.symlink_to(w.victim / "secret.txt")
    w.project("--plot", chart)
    w.exit = 0
    w.changes = {w.adapter_file}
    w.checks.append(lambda r: _projected(w.adapter))
    w.checks.append(lambda r: _literal(r.stderr, "warning: the plot"))


def _literal(text: str, fragment: str) -> None:
    assert fragment in text, f"{fragment!r} not in {text!r}"
    assert not any(c in text for c in "\x1b\u202e\r"), f"raw control characters in {text!r}"


# --- 4: memory ---------------------------------------------------------------------------------------------


def _sparse_pass_through(adapter: Path) -> None:
    """A 4 GiB ``modules_to_save`` tensor that is one hole: the file is 4 GiB, the disk holds kilobytes."""
    pairs, body = read_raw(adapter / ADAPTER_FILE)
    end = data_end(pairs)
    big = {"dtype": "F32", "shape": [BIG // 4 // 1024, 1024], "data_offsets": [end, end + BIG]}
    head = [*pairs, ("base_model.model.lm_head.modules_to_save.default.weight", big)]
    write_raw(adapter / ADAPTER_FILE, head, body)
    with (adapter / ADAPTER_FILE).open("r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size + BIG)


@attack(4, "a sparse 4 GiB adapter is rewritten in place without reading it into memory")
def _(w: World) -> None:
    _sparse_pass_through(w.adapter)
    w.project()
    w.exit = 0
    w.changes = {w.adapter_file}
    w.rss_tensor = 64 * 64 * 4
    w.checks.append(lambda r: _still_sparse(w.adapter_file))


def _still_sparse(path: Path) -> None:
    st = path.stat()
    assert st.st_size > BIG and st.st_blocks * 512 < 64 << 20, "the rewrite filled the hole with zeros"


@attack(4, "a sparse 4 GiB adapter is checked without reading it into memory")
def _(w: World) -> None:
    _sparse_pass_through(w.adapter)
    w.argv = ["check", "--adapter", str(w.adapter)]
    w.exit = 3
    w.rss_tensor = 64 * 64 * 4


@attack(4, "a LoRA rank of 60000 on a 64x64 module")
def _(w: World) -> None:
    g = torch.Generator().manual_seed(0)
    r = 60_000
    tensors = {Q0_A: torch.randn(r, 64, generator=g), Q0_B: torch.randn(64, r, generator=g)}
    save_file(tensors, w.adapter_file, metadata={"format": "pt"})
    edit_config(w.adapter, r=r, target_modules=["q_proj"], rank_pattern={}, layers_to_transform=None)
    w.project("--dry-run")
    w.exit = 0
    w.rss_tensor = r * 64 * 4


@attack(4, "a LoRA tensor claims 2 GiB of a sparse file and the module is 64 wide")
def _(w: World) -> None:
    pairs, body = read_raw(w.adapter_file)
    end = data_end(pairs)
    fat = {"dtype": "F32", "shape": [8, 1 << 26], "data_offsets": [end, end + (8 << 28)]}
    pairs = [(k, v) for k, v in pairs if k != Q0_A] + [(Q0_A, fat)]
    write_raw(w.adapter_file, pairs, body)
    with w.adapter_file.open("r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size + (8 << 28))
    w.project("--dry-run")
    w.rss_tensor = 64 * 64 * 4


@attack(4, "a header claims a tensor far beyond the end of the file")
def _(w: World) -> None:
    pairs, body = read_raw(w.adapter_file)
    end = data_end(pairs)
    huge = {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [end, end + (4 << 40)]}
    write_raw(w.adapter_file, [*pairs, ("base_model.model.lm_head.weight", huge)], body)
    w.project("--dry-run")
    w.rss_tensor = 0


def _fake_hub(w: World) -> FakeHub:
    """A local Hub serving the world's base and aligned checkpoints as org/base and org/aligned."""
    root = w.logs.parent / "hub"
    for repo, files in (("base", w.base), ("aligned", w.aligned)):
        (root / "org" / repo).mkdir(parents=True)
        (root / "org" / repo / "main").symlink_to(files)
    hub = w.cleanup.enter_context(FakeHub(root))
    w.env["HF_ENDPOINT"] = hub.url
    return hub


def _hub_ignoring_ranges(w: World, target: str) -> None:
    hub = _fake_hub(w)
    hub.fault("full", target=target)  # 200 and a body that claims 50 GB and never ends
    w.argv = ["project", "--adapter", str(w.adapter), "--base", "org/base", "--aligned", "org/aligned", "--json"]
    w.rss_tensor = 64 * 64 * 4
    w.checks.append(lambda r: _unread(hub))


def _unread(hub: FakeHub) -> None:
    assert hub.bogus_sent < ENDLESS // 1000, f"{hub.bogus_sent} bytes of the endless body were read"


@attack(4, "a Hub that answers the header range with the whole file")
def _(w: World) -> None:
    _hub_ignoring_ranges(w, "header")


@attack(4, "a Hub that answers a tensor range with the whole file")
def _(w: World) -> None:
    _hub_ignoring_ranges(w, "data")


# --- 6: regular expressions from adapter configs ----------------------------------------------------------

BACKTRACKS = r"(?:[\w.]|[\w.]{2}|[\w.]{3})*\d"  # seconds of backtracking on a name without a final digit


@attack(6, "target_modules that backtracks for minutes")
def _(w: World) -> None:
    edit_config(w.adapter, target_modules=BACKTRACKS)
    w.project("--dry-run")
    w.checks.append(lambda r: _literal(r.stderr, "target_modules"))


@attack(6, "a rank_pattern key that unrolls to a billion states")
def _(w: World) -> None:
    edit_config(w.adapter, rank_pattern={"q_proj{999999999}": 4})
    w.project("--dry-run")
    w.rss_tensor = 0
    w.checks.append(lambda r: _literal(r.stderr, "rank_pattern key"))


@attack(6, "an alpha_pattern key that backtracks")
def _(w: World) -> None:
    edit_config(w.adapter, alpha_pattern={BACKTRACKS: 4})
    w.project("--dry-run")
    w.checks.append(lambda r: _literal(r.stderr, "alpha_pattern key"))


@attack(6, "a layers_pattern that backtracks")
def _(w: World) -> None:
    edit_config(w.adapter, layers_pattern=BACKTRACKS, layers_to_transform=[0, 1, 2, 3])
    w.project("--dry-run")
    w.checks.append(lambda r: _literal(r.stderr, "layers_pattern"))


@attack(6, "forty rank_pattern keys that each finish but together would not")
def _(w: World) -> None:
    edit_config(w.adapter, rank_pattern={"(?:)" * i + r"(?:[\w.]|[\w.][\w.])*\d": 8 for i in range(40)})
    w.project("--dry-run")


# --- 7: the projection cache ---------------------------------------------------------------------------------


def _warm(w: World) -> Path:
    """Fill this test's projection cache for the world's pair; return the pair's directory."""
    result = CliRunner().invoke(app, ["project", "--adapter", str(w.adapter), *w.pair(), "--dry-run"])
    assert result.exit_code == 0, result.output
    [pair] = (Path(os.environ["SAFELORA_CACHE"]) / "pairs").iterdir()
    return pair


def _uncached(w: World) -> Path:
    """What the run must write, computed without the cache, outside the world."""
    reference = w.logs.parent / "uncached"
    result = CliRunner().invoke(
        app, ["project", "--adapter", str(w.adapter), *w.pair(), "--no-cache", "--output", str(reference)]
    )
    assert result.exit_code == 0, result.output
    return reference / ADAPTER_FILE


def _cache_attack(w: World, tamper: Callable[[Path], None], note: str) -> None:
    pair = _warm(w)
    want = _uncached(w)
    tamper(pair)
    out = w.root / "out"
    w.project("--output", out)
    w.exit, w.output = 0, out
    w.checks.append(lambda r: _same_output(out, want))
    w.checks.append(lambda r: _noted(r, note))


def _same_output(out: Path, want: Path) -> None:
    assert (out / ADAPTER_FILE).read_bytes() == want.read_bytes(), "the cache changed the output"


def _noted(r: Result, note: str) -> None:
    assert any(note in n for n in r.json()["notes"]), r.stdout


def _entry(pair: Path) -> Path:
    return sorted(pair.glob("*.safetensors"))[0]


def _forge(entry: Path, norm_factor: float, *, checksum: bool) -> None:
    """Scale an entry's recorded ‖V‖ (every projected lora_B with it), with or without a matching CRC."""
    pairs, body = read_raw(entry)
    header = dict(pairs)
    meta = header["__metadata__"]
    meta["safelora.cache.norm"] = repr(float(meta["safelora.cache.norm"]) * norm_factor)
    if checksum:
        shape = header["operator"]["shape"]
        meta["safelora.cache.crc32"] = cache_entries.checksum(meta, "F32", shape, memoryview(body))
    write_raw(entry, list(header.items()), body)


@attack(7, "a cache entry whose norm was edited")
def _(w: World) -> None:
    _cache_attack(w, lambda pair: _forge(_entry(pair), 0.001, checksum=False), "was corrupt")


@attack(7, "a forged entry in a cache another user owns")
def _(w: World) -> None:
    def tamper(pair: Path) -> None:
        _forge(_entry(pair), 0.001, checksum=True)
        os.chown(pair, 65534, 65534)

    _cache_attack(w, tamper, "belongs to uid 65534")


@attack(7, "a forged entry in a cache its group can write")
def _(w: World) -> None:
    def tamper(pair: Path) -> None:
        _forge(_entry(pair), 0.001, checksum=True)
        root = pair.parent.parent
        root.chmod(root.stat().st_mode | 0o020)

    _cache_attack(w, tamper, "writable by its group")


@attack(7, "a cache entry that is a FIFO")
def _(w: World) -> None:
    entry = _entry(_warm(w))
    entry.unlink()
    os.mkfifo(entry)
    w.project("--output", w.root / "out")


@attack(7, "a cache entry that links to a forged file elsewhere")
def _(w: World) -> None:
    def tamper(pair: Path) -> None:
        entry = _entry(pair)
        forged = w.victim / "forged.safetensors"
        shutil.copy(entry, forged)
        _forge(forged, 0.001, checksum=True)
        entry.unlink()
        entry.symlink_to(forged)

    _cache_attack(w, tamper, "was corrupt")


# --- 5: tensors the method does not define -----------------------------------------------------------------


@attack(5, "lora_A with 0 input features")
def _(w: World) -> None:
    edit_tensors(w.adapter_file, lambda t: t.update({Q0_A: torch.zeros(8, 0)}))
    w.project("--dry-run")


@attack(5, "lora_B with 0 output features")
def _(w: World) -> None:
    edit_tensors(w.adapter_file, lambda t: t.update({Q0_B: torch.zeros(0, 8)}))
    w.project("--dry-run")


@attack(5, "lora_B in float8")
def _(w: World) -> None:
    edit_tensors(w.adapter_file, lambda t: t.update({Q0_B: t[Q0_B].to(torch.float8_e4m3fn)}))
    w.project("--dry-run")


@attack(5, "a checkpoint weight in float8")
def _(w: World) -> None:
    shard = shard_of(w.base, BASE_Q0)
    edit_tensors(shard, lambda t: t.update({BASE_Q0: t[BASE_Q0].to(torch.float8_e5m2)}))
    w.project("--dry-run")


@attack(5, "a complex checkpoint weight in a .bin")
def _(w: World) -> None:
    to_bin(w.base, lambda s: s.update({BASE_Q0: s[BASE_Q0].to(torch.complex64)}))
    w.project("--dry-run")


@attack(5, "a sparse tensor in a .bin")
def _(w: World) -> None:
    to_bin(w.base, lambda s: s.update({BASE_Q0: s[BASE_Q0].to_sparse()}))
    w.project("--dry-run")


@attack(5, "a meta tensor in a .bin")
def _(w: World) -> None:
    to_bin(w.base, lambda s: s.update({BASE_Q0: torch.empty(s[BASE_Q0].shape, device="meta")}))
    w.project("--dry-run")


# --- 8: --output -------------------------------------------------------------------------------------------


@attack(8, "an --output reused with --force holds a symlink to a victim file")
def _(w: World) -> None:
    out = w.root / "out"
    out.mkdir()
    (out / CONFIG_FILE).symlink_to(w.victim / "secret.txt")
    w.project("--force", "--output", out)
    w.exit, w.output = 0, out
    w.checks.append(lambda r: _regular_copy(out / CONFIG_FILE, w.adapter / CONFIG_FILE))


def _regular_copy(copy: Path, original: Path) -> None:
    assert not copy.is_symlink() and copy.read_bytes() == original.read_bytes()


@attack(8, "an adapter file links to a victim file outside the directory")
def _(w: World) -> None:
    (w.adapter / "notes.txt").symlink_to(w.victim / "secret.txt")
    w.project("--output", w.root / "out")
    w.exit, w.output = 0, w.root / "out"
    w.checks.append(lambda r: _skipped(r, w.root / "out", "notes.txt"))


def _skipped(r: Result, out: Path, name: str) -> None:
    assert not os.path.lexists(out / name), f"{name} was copied into --output"
    assert any(name in n and "skipped" in n for n in r.json()["notes"]), r.stdout


@attack(8, "an adapter subdirectory links to a victim directory")
def _(w: World) -> None:
    (w.adapter / "extras").symlink_to(w.victim / "dir")
    w.project("--output", w.root / "out")
    w.exit, w.output = 0, w.root / "out"
    w.checks.append(lambda r: _skipped(r, w.root / "out", "extras"))


@attack(8, "an adapter file is a symlink loop")
def _(w: World) -> None:
    (w.adapter / "card.md").symlink_to("card.md")
    w.project("--output", w.root / "out")
    w.exit, w.output = 0, w.root / "out"
    w.checks.append(lambda r: _skipped(r, w.root / "out", "card.md"))


@attack(8, "an adapter holds a FIFO beside its files")
def _(w: World) -> None:
    os.mkfifo(w.adapter / "training.log")
    w.project("--output", w.root / "out")
    w.exit, w.output = 0, w.root / "out"
    w.checks.append(lambda r: _skipped(r, w.root / "out", "training.log"))


@attack(8, "a link to a file inside the adapter is copied as a file")
def _(w: World) -> None:
    (w.adapter / "docs").mkdir()
    (w.adapter / "docs" / "card.md").write_text("# card\n")
    (w.adapter / "MODEL_CARD.md").symlink_to("docs/card.md")
    w.project("--output", w.root / "out")
    w.exit, w.output = 0, w.root / "out"
    w.checks.append(lambda r: _regular_copy(w.root / "out" / "MODEL_CARD.md", w.adapter / "docs" / "card.md"))


@attack(8, "a Hugging Face cache snapshot's links into blobs/ are followed")
def _(w: World) -> None:
    repo = w.root / "hub" / "models--org--adapter"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in (CONFIG_FILE, ADAPTER_FILE, "README.md"):
        src = w.adapter / name if name != "README.md" else None
        data = src.read_bytes() if src else b"# an adapter\n"
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    w.project("--output", w.root / "out", adapter=snapshot)
    w.exit, w.output = 0, w.root / "out"
    w.checks.append(lambda r: _regular_copy(w.root / "out" / "README.md", snapshot / "README.md"))


@attack(8, "--output is a symlink to a victim directory")
def _(w: World) -> None:
    out = w.root / "out"
    out.symlink_to(w.victim / "dir")
    w.project("--output", out)


@attack(8, "demo --keep into a directory that holds files")
def _(w: World) -> None:
    w.argv = ["demo", "--keep", str(w.victim)]


# --- 9: tokens ---------------------------------------------------------------------------------------------

TOKEN = "hf_SECRETSECRETSECRET"


def _no_token(r: Result) -> None:
    assert "SECRET" not in r.stdout + r.stderr


@attack(9, "--token with a newline that would inject a header")
def _(w: World) -> None:
    w.project("--dry-run", "--token", f"{TOKEN}\nX-Injected: 1")
    w.checks.append(_no_token)


@attack(9, "HF_TOKEN with CR LF")
def _(w: World) -> None:
    w.project("--dry-run")
    w.env["HF_TOKEN"] = f"{TOKEN}\r\nHost: elsewhere"
    w.checks.append(_no_token)


@attack(9, "--token with non-ASCII characters")
def _(w: World) -> None:
    w.project("--dry-run", "--token", f"{TOKEN}ü")
    w.checks.append(_no_token)


@attack(9, "HF_TOKEN with a space inside")
def _(w: World) -> None:
    w.project("--dry-run")
    w.env["HF_TOKEN"] = f"{TOKEN} {TOKEN}"
    w.checks.append(_no_token)


# --- 10: check ---------------------------------------------------------------------------------------------


def _check(w: World, *adapters: Path) -> None:
    # The sanitized adapter was written under another store (no local record here): trust its stamp,
    # so these cases judge the batch, not the verification (tests/test_stamp.py attacks that).
    w.argv = ["check", *(a for p in adapters for a in ("--adapter", str(p))), "--trust-stamp"]


@attack(10, "check: the first adapter modified, the last sanitized")
def _(w: World) -> None:
    modified = w.copy_adapter("modified", w.sanitized)
    edit_tensors_keep_meta(modified / ADAPTER_FILE)
    _check(w, modified, w.copy_adapter("fine", w.sanitized))
    w.exit = 3


def edit_tensors_keep_meta(path: Path) -> None:
    """Change one value of lora_B and keep the provenance, as a careless re-save would."""
    pairs, body = read_raw(path)
    start = dict(pairs)[Q0_B]["data_offsets"][0]
    data = bytearray(body)
    data[start : start + 4] = struct.pack("<f", 1.0)
    write_raw(path, pairs, bytes(data))


@attack(10, "check: one never sanitized among sanitized ones")
def _(w: World) -> None:
    _check(w, w.copy_adapter("a", w.sanitized), w.adapter, w.copy_adapter("b", w.sanitized))
    w.exit = 3


@attack(10, "check: a glob with one corrupt adapter")
def _(w: World) -> None:
    w.copy_adapter("gate/a", w.sanitized)
    bad = w.copy_adapter("gate/b", w.sanitized)
    (bad / ADAPTER_FILE).write_bytes(b"not safetensors")
    w.argv = ["check", "--adapter", str(w.root / "gate" / "*")]


@attack(10, "check: a missing adapter before one never sanitized")
def _(w: World) -> None:
    _check(w, w.root / "missing", w.adapter)


@attack(10, "check: the same sanitized adapter twice")
def _(w: World) -> None:
    fine = w.copy_adapter("fine", w.sanitized)
    _check(w, fine, fine / ".." / "fine")
    w.exit = 0


# --- running the corpus ------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` without following links or opening special files: file bytes (or,
    above 16 MiB, size and identity), ``-> target`` for links, the kind of anything else."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            key = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[key] = f"-> {os.readlink(p)}"
            elif stat.S_ISDIR(st.st_mode):
                out[key] = "dir"
            elif not stat.S_ISREG(st.st_mode):
                out[key] = f"special {stat.S_IFMT(st.st_mode)}"
            elif st.st_size > 16 << 20:
                out[key] = (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            else:
                out[key] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def forkserver() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def sanitized(llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the adapter projected by safelora: what ``check`` passes."""
    adapter = Path(shutil.copytree(llama_adapter, tmp_path_factory.mktemp("sanitized") / "adapter"))
    result = CliRunner().invoke(
        app, ["project", "--adapter", str(adapter), "--base", str(llama_pair[0]), "--aligned", str(llama_pair[1])]
    )
    assert result.exit_code == 0, result.output
    return adapter


def test_the_corpus_covers_every_class() -> None:
    per_class = {k: sum(c == k for c, _ in ATTACKS.values()) for k in CLASSES}
    assert set(CLASSES) == set(range(1, 11)) and all(n >= 4 for n in per_class.values()), per_class
    assert len(ATTACKS) >= 60


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack(
    name: str,
    forkserver: ForkServer,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    sanitized: Path,
    tmp_path: Path,
) -> None:
    root = tmp_path / "world"
    w = World(
        root=root,
        logs=tmp_path / "logs",
        adapter=root / "adapter",
        base=root / "base",
        aligned=root / "aligned",
        victim=root / "victim",
        sanitized=sanitized,
    )
    shutil.copytree(llama_adapter, w.adapter)
    shutil.copytree(llama_pair[0], w.base)
    shutil.copytree(llama_pair[1], w.aligned)
    (w.victim / "dir").mkdir(parents=True)
    (w.victim / "secret.txt").write_text("the only copy\n")
    (w.victim / "dir" / "keep.txt").write_text("mine\n")
    w.logs.mkdir()
    _, build = ATTACKS[name]
    build(w)
    before = snapshot(root)

    with w.cleanup:
        result = run(forkserver, w)

    assert result.status != -signal.SIGKILL, f"still running after {TIMEOUT} s"
    assert result.status == w.exit, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    if w.exit == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    after = snapshot(root)
    allowed = {str(p.relative_to(root)) for p in w.changes}
    out = str(w.output.relative_to(root)) if w.output else None
    for key in sorted(before.keys() | after.keys()):
        if key in allowed or (out and (key == out or key.startswith(out + os.sep))):
            continue
        assert key in after, f"{key} was removed"
        assert key in before, f"{key} was created outside the output"
        assert before[key] == after[key], f"{key} changed"
    if w.rss_tensor is not None:
        assert result.maxrss <= MEMORY + 4 * w.rss_tensor, f"peak RSS {result.maxrss >> 20} MiB"
    for check in w.checks:
        check(result)


def run(server: ForkServer, w: World) -> Result:
    out, err = w.logs / "stdout", w.logs / "stderr"
    runner = threading.Thread(target=w.during) if w.during else None
    if runner is not None:
        runner.start()
    outcome = server.run([Run(w.argv, None if w.stdout_closed else out, err, kill_at=TIMEOUT)], w.env)
    if runner is not None:
        runner.join(TIMEOUT)
    return Result(
        outcome.status[0],
        outcome.seconds[0],
        outcome.maxrss[0],
        "" if w.stdout_closed else out.read_text(errors="replace"),
        err.read_text(errors="replace"),
    )
