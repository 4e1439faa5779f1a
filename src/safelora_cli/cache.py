"""The projection cache: each module's operator per (base, aligned) pair, shared by every run.

Layout under the root (``SAFELORA_CACHE``, else ``$XDG_CACHE_HOME/safelora``, else ``~/.cache/safelora``):

    pairs/<pair key>/pair.json                which checkpoints: repo id + commit sha, or path + fingerprint
    pairs/<pair key>/<entry key>.safetensors  one module's operator (V, float32) and its metadata
    pairs/<pair key>/.lock                    flock'd by the run that computes missing entries
    refs/<key>.json                           the last commit seen for each Hub branch or tag

Every file name is a hash, so no repo id or path can make a name that leaves the root. Entries are
written to a temp file and renamed into place, so a reader sees a whole entry or none, and each
carries a CRC-32 of everything a run takes from it (its metadata, shape and data), so a corrupt one
is detected and recomputed instead of served. That check is also why entries are not fsync'd: an
entry torn by a power loss fails it and is recomputed, while an fsync per entry would make a first
run wait for gigabytes to reach the disk.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from . import stfile
from .errors import CacheError, FormatError
from .projection import Operator, OperatorKind

FORMAT = "3"  # bump when what an entry means changes; old pairs then simply stop matching
_META = "safelora.cache."
_CHECKSUM = _META + "crc32"
_TENSOR = "operator"
_TMP = ".tmp-"
_KINDS: dict[str, OperatorKind] = {"V": "V", "zero": "zero"}


def cache_root() -> Path:
    """Where the cache lives: ``SAFELORA_CACHE``, else the XDG cache directory's ``safelora``."""
    env = os.environ.get("SAFELORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "safelora"


def _hash(*parts: str, length: int) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


class CorruptEntry(Exception):
    """A cache entry exists but cannot be trusted; the message says why."""


@dataclass(frozen=True)
class Stored:
    """One entry as read and verified: ``data`` views a reused buffer, valid until the next entry."""

    kind: OperatorKind
    data: torch.Tensor
    norm: float
    out_features: int
    in_features: int


@dataclass(frozen=True)
class EntrySummary:
    module: str  # "?" when the entry is unreadable
    kind: str
    shape: tuple[int, ...]
    nbytes: int  # the file's size
    problem: str | None


@dataclass(frozen=True)
class PairSummary:
    key: str
    base: str
    aligned: str
    path: Path
    entries: list[EntrySummary]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


class PairCache:
    """The entries of one (base, aligned) pair; ``load_all`` needs no lock, ``store`` runs under ``locked``."""

    def __init__(self, root: Path, base: str, aligned: str) -> None:
        self.base, self.aligned = base, aligned
        self.key = _hash(FORMAT, base, aligned, length=16)
        self.dir = root / "pairs" / self.key
        self.warnings: list[str] = []
        self._writable = True
        self._writer: ThreadPoolExecutor | None = None  # set while ``locked``
        self._staging: list[torch.Tensor] = [torch.empty(0), torch.empty(0)]
        self._pending: list[Future[None] | None] = [None, None]
        self._stored = 0

    def _entry_path(self, module: str, transpose: bool) -> Path:
        return self.dir / f"{_hash(module, str(int(transpose)), length=32)}.safetensors"

    def load_all(self, modules: Sequence[str], transpose: bool) -> Iterator[tuple[str, Stored | CorruptEntry | None]]:
        """Each module's entry (None when not cached, ``CorruptEntry`` when it cannot be trusted).

        A thread reads and verifies entry i+1 while the caller uses entry i, in two buffers that
        are reused: the caller must be done with an entry's ``data`` before asking for the next.
        """
        buffers = [bytearray(), bytearray()]

        def read(i: int) -> Stored | CorruptEntry | None:
            try:
                return self._read(modules[i], transpose, buffers, i % 2)
            except CorruptEntry as e:
                return e

        if not modules:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="safelora-cache") as pool:
            pending = pool.submit(read, 0)
            for i, module in enumerate(modules):
                result = pending.result()
                if i + 1 < len(modules):
                    pending = pool.submit(read, i + 1)
                yield module, result

    def _read(self, module: str, transpose: bool, buffers: list[bytearray], slot: int) -> Stored | None:
        path = self._entry_path(module, transpose)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CorruptEntry(f"cannot read ({e.strerror})") from None
        with f:
            try:
                size = os.fstat(f.fileno()).st_size
                header = stfile.header_of(f, str(path), size)
                kind, norm, out, inp = _check_meta(header, module, transpose)
                entry = header.tensors[_TENSOR]
                if len(buffers[slot]) < entry.nbytes:
                    buffers[slot] = bytearray(entry.nbytes)
                data = stfile.read_tensor(f, entry, str(path), buffers[slot])
            except FormatError as e:
                raise CorruptEntry(str(e).removeprefix(f"{path}: ")) from None
            except OSError as e:
                raise CorruptEntry(f"cannot read ({e.strerror})") from None
        checksum = _checksum(header.metadata, entry.dtype, entry.shape, memoryview(buffers[slot])[: entry.nbytes])
        if checksum != header.metadata[_CHECKSUM]:
            raise CorruptEntry("its metadata or data do not match its CRC-32")
        return Stored(kind, data, norm, out, inp)

    def store(self, module: str, transpose: bool, base_key: str, aligned_key: str, op: Operator) -> None:
        """Write one entry atomically, on a thread: the run goes on to the next module meanwhile.

        ``op`` is copied first (its matrix lives in a reused workspace). A failure (disk full,
        permissions) becomes a warning. Only under ``locked``, which waits for the writes.
        """
        if self._writer is None:
            raise RuntimeError("PairCache.store outside PairCache.locked")
        if not self._writable:
            return
        if op.matrix.dtype != torch.float32:
            raise ValueError("the projection cache holds float32 operators only")
        slot = self._stored % 2
        self._stored += 1
        previous = self._pending[slot]
        if previous is not None:
            previous.result()  # its staging buffer is about to be reused
        n = op.matrix.numel()
        if self._staging[slot].numel() < n:
            self._staging[slot] = torch.empty(n, dtype=torch.float32)
        staged = self._staging[slot][:n].view(op.matrix.shape)
        staged.copy_(op.matrix)
        meta = {
            _META + "format": FORMAT,
            _META + "module": module,
            _META + "transpose": str(int(transpose)),
            _META + "kind": op.kind,
            _META + "norm": repr(op.norm),
            _META + "out": str(op.out_features),
            _META + "in": str(op.in_features),
            _META + "base_key": base_key,
            _META + "aligned_key": aligned_key,
        }
        self._pending[slot] = self._writer.submit(self._write, self._entry_path(module, transpose), staged, meta)

    def _write(self, path: Path, matrix: torch.Tensor, meta: dict[str, str]) -> None:
        data = _memory(matrix)
        meta[_CHECKSUM] = _checksum(meta, "F32", tuple(matrix.shape), data)
        # serialize only takes the data's length and hands the data itself to the writer.
        blob = stfile.Blob("F32", tuple(matrix.shape), cast(bytes, data))
        try:
            _write_atomic(path, stfile.serialize({_TENSOR: blob}, meta))
        except OSError as e:
            self._unwritable(e)

    def _unwritable(self, e: OSError) -> None:
        self._writable = False
        self.warnings.append(
            f"projection cache: cannot write to {self.dir} ({e.strerror}); this run's operators are not "
            "cached. Free space or fix permissions, or point SAFELORA_CACHE elsewhere"
        )

    @contextmanager
    def locked(self, on_wait: Callable[[], None]) -> Iterator[None]:
        """Hold the pair's lock: one run computes missing entries while the others wait, then load them.

        ``on_wait`` is called once if another run holds the lock. A cache that cannot be written
        runs without the lock (and without storing), with a warning.
        """
        fd = None
        try:
            fd = self._acquire(on_wait)
            self._prepare()
        except OSError as e:
            self._unwritable(e)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="safelora-cache-write") as self._writer:
                yield
            for pending in self._pending:  # re-raise what a write thread hit, if anything
                if pending is not None:
                    pending.result()
        finally:
            self._writer, self._pending = None, [None, None]
            if fd is not None:
                os.close(fd)  # releases the flock, once every entry is written

    def _acquire(self, on_wait: Callable[[], None]) -> int:
        lock = self.dir / ".lock"
        waited = False
        while True:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not waited:
                        on_wait()
                        waited = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # `cache rm` may have removed the pair while we waited: then lock the new file.
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _prepare(self) -> None:
        """Under the lock: drop temp files of killed runs, write the manifest once."""
        for tmp in self.dir.glob(f"{_TMP}*"):
            tmp.unlink(missing_ok=True)
        manifest = self.dir / "pair.json"
        if not manifest.exists():
            doc = {"format": FORMAT, "base": self.base, "aligned": self.aligned, "created": time.time()}
            _write_atomic(manifest, [json.dumps(doc, indent=2).encode()])


def _memory(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes without a copy (valid while ``t`` lives): an operator is up to
    hundreds of megabytes, and copying it to ``bytes`` first cost more than writing it."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


def _checksum(meta: Mapping[str, str], dtype: str, shape: Sequence[int], data: memoryview) -> str:
    """CRC-32 of an entry's metadata (all of it but this checksum), dtype, shape and data.

    The threat is corruption, not forgery (the ownership rule's job), and an entry of hundreds of MB
    is checked on every warm run: zlib's CRC-32 runs at about twice SHA-256's speed.
    """
    fields = sorted((k, v) for k, v in meta.items() if k != _CHECKSUM)
    described = json.dumps([fields, dtype, list(shape)], separators=(",", ":"), ensure_ascii=True)
    return f"{zlib.crc32(data, zlib.crc32(described.encode('ascii'))):08x}"


def _check_meta(header: stfile.Header, module: str, transpose: bool) -> tuple[OperatorKind, float, int, int]:
    """An entry's kind, ‖V‖, out and in, after checking they describe ``module``'s tensor."""
    meta = header.metadata
    entry = header.tensors.get(_TENSOR)
    try:
        kind = _KINDS[meta[_META + "kind"]]
        norm, out, inp = float(meta[_META + "norm"]), int(meta[_META + "out"]), int(meta[_META + "in"])
        same = (meta[_META + "module"], meta[_META + "transpose"]) == (module, str(int(transpose)))
    except (KeyError, ValueError):
        raise FormatError("metadata is missing or malformed") from None
    if _CHECKSUM not in meta:
        raise FormatError("metadata is missing or malformed")
    if meta.get(_META + "format") != FORMAT or not same:
        raise FormatError("it belongs to another module or format")
    shape = {"V": (out, inp), "zero": (0, 0)}[kind]
    if entry is None or entry.dtype != "F32" or entry.shape != shape or len(header.tensors) != 1:
        raise FormatError(f"expected one F32 tensor of shape {list(shape)}")
    if not (norm > 0 if kind != "zero" else norm == 0) or norm == float("inf"):
        raise FormatError(f"invalid norm {norm!r}")
    return kind, norm, out, inp


def _write_atomic(target: Path, chunks: Sequence[stfile.Data]) -> None:
    """Temp file beside ``target``, then rename: readers see all or nothing (no fsync, see above)."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=target.parent)
    try:
        try:
            stfile.write_chunks(fd, chunks)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RefMemo:
    """The commit each Hub branch or tag last resolved to, so HF_HUB_OFFLINE=1 runs can name the pair."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "refs"

    def _path(self, endpoint: str, repo_id: str) -> Path:
        return self.dir / f"{_hash(endpoint, repo_id, length=32)}.json"

    def _read(self, endpoint: str, repo_id: str) -> dict[str, str]:
        try:
            doc = json.loads(self._path(endpoint, repo_id).read_text(encoding="utf-8"))
            refs = doc["refs"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return {k: v for k, v in refs.items() if isinstance(k, str) and isinstance(v, str)}

    def get(self, endpoint: str, repo_id: str, revision: str) -> str | None:
        return self._read(endpoint, repo_id).get(revision)

    def put(self, endpoint: str, repo_id: str, revision: str, sha: str) -> None:
        """Best effort: the memo only helps offline runs, so a failed write is not an error."""
        refs = self._read(endpoint, repo_id)
        if refs.get(revision) == sha:
            return
        refs[revision] = sha
        doc = {"endpoint": endpoint, "repo": repo_id, "refs": refs}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self._path(endpoint, repo_id), [json.dumps(doc, indent=2).encode()])
        except OSError:
            pass


class ProjectionCache:
    """The cache root: pairs to run with, and what ``safelora cache`` lists and removes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_root()
        self.refs = RefMemo(self.root)

    def pair(self, base_identity: str, aligned_identity: str) -> PairCache:
        return PairCache(self.root, base_identity, aligned_identity)

    def pairs(self) -> list[PairSummary]:
        """Every cached pair with its entries, read from manifests and entry headers only."""
        pairs_dir = self.root / "pairs"
        if not pairs_dir.is_dir():
            return []
        return [_summary(d) for d in sorted(pairs_dir.iterdir()) if d.is_dir()]

    def find(self, prefix: str) -> PairSummary:
        """The one pair whose key starts with ``prefix`` (as ``safelora cache ls`` prints it)."""
        found = [p for p in self.pairs() if prefix and p.key.startswith(prefix.lower())]
        if len(found) != 1:
            what = "no cached pair" if not found else f"{len(found)} cached pairs"
            raise CacheError(f"{what} with a key starting with {prefix!r}; `safelora cache ls` lists the keys")
        return found[0]

    def remove(self, prefix: str) -> PairSummary:
        """Delete one pair; refused while a run holds its lock."""
        pair = self.find(prefix)
        _remove_pair(pair.path)
        return pair

    def clear(self) -> tuple[list[PairSummary], list[str]]:
        """Delete every pair and the refs memo; returns the pairs removed and the messages of those kept.

        A pair that a running safelora holds locked is kept (and named), not waited for.
        """
        removed, kept = [], []
        for pair in self.pairs():
            try:
                _remove_pair(pair.path)
            except CacheError as e:
                kept.append(str(e))
            else:
                removed.append(pair)
        shutil.rmtree(self.refs.dir, ignore_errors=True)
        return removed, kept


def _remove_pair(path: Path) -> None:
    try:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CacheError(f"{path}: cannot remove ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CacheError(
                    f"{path.name}: a safelora run is computing this pair right now; remove it when that run ends"
                ) from None
            raise
        shutil.rmtree(path)
    except OSError as e:
        raise CacheError(f"{path}: cannot remove ({e.strerror})") from None
    finally:
        os.close(fd)


def _summary(path: Path) -> PairSummary:
    try:
        doc = json.loads((path / "pair.json").read_text(encoding="utf-8"))
        base, aligned = str(doc["base"]), str(doc["aligned"])
    except (OSError, ValueError, KeyError, TypeError):
        base = aligned = "?"
    entries = []
    for f in sorted(path.glob("*.safetensors")):
        try:
            size = f.stat().st_size
            header = stfile.read_header(f)
            meta = header.metadata
            op = header.tensors[_TENSOR]
            entries.append(EntrySummary(meta[_META + "module"], meta[_META + "kind"], op.shape, size, None))
        except (OSError, FormatError, KeyError) as e:
            problem = str(e) if isinstance(e, FormatError) else "unreadable"
            entries.append(EntrySummary("?", "?", (), f.stat().st_size if f.exists() else 0, problem))
    entries.sort(key=lambda e: e.module)
    return PairSummary(path.name, base, aligned, path, entries)
