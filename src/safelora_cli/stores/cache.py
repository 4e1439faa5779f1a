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

A checksum stops corruption, not someone who writes a matching one. That is the ownership rule's
job, the rule ssh applies to its keys: the cache is used only when the root and everything in it
that a run uses belong to the effective user and no one else may write them, and when no one else
may replace a directory on the way to the root (see ``ProjectionCache.problem``). Everything the
cache creates is created mode 0700 (directories) or 0600 (files), whatever the umask.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import CacheError, FormatError, SafeLoraError
from ..io import safefs, stfile, strict
from ..projection import Operator, OperatorKind
from . import ownership

FORMAT = "3"  # bump when what an entry means changes; old pairs then simply stop matching
_META = "safelora.cache."
_CHECKSUM = _META + "crc32"
_TENSOR = "operator"
_TMP = ".tmp-"
_KINDS: dict[str, OperatorKind] = {"V": "V", "zero": "zero"}
_MAX_JSON = 1 << 20  # pair.json and refs/*.json hold a few hundred bytes when safelora wrote them


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


_RULE = ownership.Rule("projection cache not used: ", "SAFELORA_CACHE", "the cache", "what the cache serves")
_lstat = ownership.lstat


def _pair_file(name: str) -> bool | None:
    """How a run uses ``name`` in a pair's directory (see ``ownership.Rule.contents``)."""
    if name in ("pair.json", ".lock"):
        return True
    return False if name.endswith(".safetensors") else None


def _refs_file(name: str) -> bool | None:
    """How a run uses ``name`` in ``refs/`` (see ``ownership.Rule.contents``)."""
    return True if name.endswith(".json") else None


def _read_small(path: Path, error: type[SafeLoraError]) -> bytes:
    """A small JSON file of the cache, never through a link, never blocking; ``error`` if it cannot be."""
    with safefs.open_file(path, error, follow=False) as f:
        try:
            data = f.read(_MAX_JSON + 1)
        except OSError as e:
            raise error(safefs.os_error(path, e)) from None
    if len(data) > _MAX_JSON:
        raise error(f"{path}: more than {_MAX_JSON} bytes")
    return data


def _checksum(meta: Mapping[str, str], dtype: str, shape: Sequence[int], data: memoryview) -> str:
    """CRC-32 of an entry's metadata (all of it but this checksum), dtype, shape and data.

    The threat is corruption, not forgery (the ownership rule's job), and an entry of hundreds of MB
    is checked on every warm run: zlib's CRC-32 runs at about twice SHA-256's speed.
    """
    fields = sorted((k, v) for k, v in meta.items() if k != _CHECKSUM)
    described = json.dumps([fields, dtype, list(shape)], separators=(",", ":"), ensure_ascii=True)
    return f"{zlib.crc32(data, zlib.crc32(described.encode('ascii'))):08x}"


class PairCache:
    """The entries of one (base, aligned) pair; ``load_all`` needs no lock, ``store`` runs under ``locked``.

    A pair that breaks the ownership rule (``problem``) is not used: nothing is read, locked or
    written, and the reason is the first of ``warnings``.
    """

    def __init__(self, cache: ProjectionCache, base: str, aligned: str) -> None:
        self.base, self.aligned = base, aligned
        self.key = _hash(FORMAT, base, aligned, length=16)
        self.dir = cache.root / "pairs" / self.key
        self.warnings: list[str] = []
        self._cache = cache
        self._writable = True
        self._writer: ThreadPoolExecutor | None = None  # set while ``locked``
        self._staging: list[torch.Tensor] = [torch.empty(0), torch.empty(0)]
        self._pending: list[Future[None] | None] = [None, None]
        self._stored = 0

    def problem(self) -> str | None:
        """Why this pair must not be used (the cache's ``problem``, or its own directory's), or None.

        The pair's directory, ``pair.json``, ``.lock`` and every entry that is a regular file must
        belong to the effective user and be writable by no one else. An entry that is a link or not
        a regular file is not a reason: it is never opened, and counts as corrupt.
        """
        return self._rule

    @cached_property
    def _rule(self) -> str | None:  # checked once, on first use
        return self._cache.problem() or _RULE.checked(lambda: _RULE.contents(self.dir, _pair_file), self.dir)

    def _refused(self) -> bool:
        problem = self.problem()
        if problem is not None and problem not in self.warnings:
            self._writable = False
            self.warnings.append(problem)
        return problem is not None

    def _entry_path(self, module: str, transpose: bool) -> Path:
        return self.dir / f"{_hash(module, str(int(transpose)), length=32)}.safetensors"

    def load_all(
        self, modules: Sequence[str], transpose: bool, limits: Sequence[int] | None = None
    ) -> Iterator[tuple[str, Stored | CorruptEntry | None]]:
        """Each module's entry (None when not cached, ``CorruptEntry`` when it cannot be trusted).

        ``limits[i]``, when given, is the most values module i's operator can have (out × in of its
        weight): an entry that claims more is corrupt, and no buffer is sized from its claim. A
        thread reads and verifies entry i+1 while the caller uses entry i, in two buffers that are
        reused: the caller must be done with an entry's ``data`` before asking for the next.
        """
        if limits is not None and len(limits) != len(modules):
            raise ValueError("load_all: one limit per module")
        if self._refused():
            yield from ((module, None) for module in modules)
            return
        buffers = [bytearray(), bytearray()]

        def read(i: int) -> Stored | CorruptEntry | None:
            try:
                return self._read(modules[i], transpose, buffers, i % 2, None if limits is None else limits[i])
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

    def _read(
        self, module: str, transpose: bool, buffers: list[bytearray], slot: int, limit: int | None
    ) -> Stored | None:
        path = self._entry_path(module, transpose)
        try:
            st = _lstat(path)
        except OSError as e:
            raise CorruptEntry(f"cannot read ({e.strerror})") from None
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise CorruptEntry("it is a symbolic link, not a regular file: entries are never followed")
        if not stat.S_ISREG(st.st_mode):
            # Not damage a run can repair by rewriting the entry: someone put it there.
            raise CacheError(
                f"{path}: is {safefs.kind(st.st_mode)}, not a regular file; remove it, or the pair "
                f"(safelora cache rm {self.key})"
            )
        try:
            f = safefs.open_file(path, CacheError, follow=False)
        except CacheError as e:
            raise CorruptEntry(str(e).removeprefix(f"{path}: ")) from None
        with f:
            try:
                size = os.fstat(f.fileno()).st_size
                header = stfile.header_of(f, str(path), size)
                kind, norm, out, inp = _check_meta(header, module, transpose)
                if limit is not None and out * inp > limit:
                    raise FormatError(f"it claims a {out}×{inp} operator, more than the module's {limit} values")
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
        runs without the lock (and without storing), with a warning; one that breaks the ownership
        rule too (its warning says why).
        """
        fd = None
        if not self._refused():
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
            ownership.mkdirs(self.dir)
            fd = _open_lock(lock)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not waited:
                        on_wait()
                        waited = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # `cache rm` may have removed the pair while we waited: then lock the new file.
                if os.fstat(fd).st_ino == os.lstat(lock).st_ino:
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
        if not os.path.lexists(manifest):
            doc = {"format": FORMAT, "base": self.base, "aligned": self.aligned, "created": time.time()}
            _write_atomic(manifest, [json.dumps(doc, indent=2).encode()])


def _open_lock(lock: Path) -> int:
    """Open (or create, mode 0600) a pair's lock file. Anything but a regular file is refused (EINVAL)
    before it is opened, and a link is never followed (ELOOP): such a lock no run can hold."""
    st = _lstat(lock)
    if st is None or stat.S_ISREG(st.st_mode):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, ownership.FILE_MODE)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return fd
        os.close(fd)
    raise OSError(errno.EINVAL, f"{lock.name} is {safefs.kind(st.st_mode)}, not a regular file")


def _memory(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes without a copy (valid while ``t`` lives): an operator is up to
    hundreds of megabytes, and copying it to ``bytes`` first cost more than writing it."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


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
    """Temp file (mode 0600) beside ``target``, then rename: readers see all or nothing (no fsync, see above)."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=target.parent)
    try:
        try:
            os.fchmod(fd, ownership.FILE_MODE)
            stfile.write_chunks(fd, chunks)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RefMemo:
    """The commit each Hub branch or tag last resolved to, so HF_HUB_OFFLINE=1 runs can name the pair.

    Not used (nothing read, nothing written) while the cache breaks the ownership rule.
    """

    def __init__(self, cache: ProjectionCache) -> None:
        self.dir = cache.root / "refs"
        self._cache = cache

    def _path(self, endpoint: str, repo_id: str) -> Path:
        return self.dir / f"{_hash(endpoint, repo_id, length=32)}.json"

    def _read(self, endpoint: str, repo_id: str) -> dict[str, str]:
        try:
            doc = strict.loads(_read_small(self._path(endpoint, repo_id), CacheError))
            refs = doc["refs"]
            return {k: v for k, v in refs.items() if isinstance(k, str) and isinstance(v, str)}
        except (CacheError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def get(self, endpoint: str, repo_id: str, revision: str) -> str | None:
        if self._cache.problem() is not None:
            return None
        return self._read(endpoint, repo_id).get(revision)

    def put(self, endpoint: str, repo_id: str, revision: str, sha: str) -> None:
        """Best effort: the memo only helps offline runs, so a failed write is not an error."""
        if self._cache.problem() is not None:
            return
        refs = self._read(endpoint, repo_id)
        if refs.get(revision) == sha:
            return
        refs[revision] = sha
        doc = {"endpoint": endpoint, "repo": repo_id, "refs": refs}
        try:
            ownership.mkdirs(self.dir)
            _write_atomic(self._path(endpoint, repo_id), [json.dumps(doc, indent=2).encode()])
        except OSError:
            pass


class ProjectionCache:
    """The cache root: pairs to run with, and what ``safelora cache`` lists and removes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_root()
        self.refs = RefMemo(self)

    def problem(self) -> str | None:
        """Why a run must not use this cache, as a one-line warning that names the path and the fix; or None.

        The ownership rule, as ssh applies it to its keys: the root, ``pairs/``, ``refs/`` and the
        files in ``refs/`` must belong to the effective user and be writable by no one else; every
        directory and link on the way to the root must belong to that user or to root, and such a
        directory must be writable by no one else unless it has the sticky bit (as /tmp). A pair's
        own directory and files are checked by ``PairCache.problem``. What does not exist yet
        passes: safelora creates it, mode 0700 or 0600.
        """
        return self._rule

    @cached_property
    def _rule(self) -> str | None:  # checked once, on first use
        return (
            _RULE.checked(lambda: _RULE.root(self.root), self.root)
            or _RULE.checked(lambda: _RULE.contents(self.root / "pairs"), self.root / "pairs")
            or _RULE.checked(lambda: _RULE.contents(self.refs.dir, _refs_file), self.refs.dir)
        )

    def pair(self, base_identity: str, aligned_identity: str) -> PairCache:
        return PairCache(self, base_identity, aligned_identity)

    def _pairs_dir(self) -> Path | None:
        """``pairs/`` when it is a directory (a link there is never followed)."""
        path = self.root / "pairs"
        try:
            st = _lstat(path)
        except OSError as e:
            raise CacheError(safefs.os_error(path, e)) from None
        return path if st is not None and stat.S_ISDIR(st.st_mode) else None

    def pairs(self) -> list[PairSummary]:
        """Every cached pair with its entries, read from manifests and entry headers only.

        A pair is a directory in ``pairs/``; links and other files there are not followed or listed.
        """
        pairs_dir = self._pairs_dir()
        if pairs_dir is None:
            return []
        return [_summary(pairs_dir / name) for name in _names(pairs_dir) if _is_dir(pairs_dir / name)]

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

        A pair that a running safelora holds locked is kept (and named), not waited for. Links and
        other stray files in the cache are removed themselves, never what they point to.
        """
        removed, kept = [], []
        for pair in self.pairs():
            try:
                _remove_pair(pair.path)
            except CacheError as e:
                kept.append(str(e))
            else:
                removed.append(pair)
        pairs_dir = self._pairs_dir()
        if pairs_dir is None:
            strays = [self.root / "pairs"]
        else:
            strays = [pairs_dir / name for name in _names(pairs_dir) if not _is_dir(pairs_dir / name)]
        for path in [*strays, self.refs.dir]:
            try:
                _remove(path)
            except OSError as e:
                kept.append(safefs.os_error(path, e))
        return removed, kept


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError as e:
        raise CacheError(safefs.os_error(directory, e)) from None


def _is_dir(path: Path) -> bool:
    """Whether ``path`` itself is a directory (not a link to one)."""
    try:
        st = _lstat(path)
    except OSError:
        return False
    return st is not None and stat.S_ISDIR(st.st_mode)


def _remove(path: Path) -> None:
    """Remove what is at ``path``, if anything: a directory whole (``rmtree`` follows no link inside
    it), anything else (a link, a FIFO) by unlinking the name, never what it points to."""
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_pair(path: Path) -> None:
    """Delete a pair's directory under its lock; a lock that is not a regular file cannot be held by a run."""
    try:
        fd: int | None = _open_lock(path / ".lock")
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EINVAL):  # a lock no run can hold: remove without it
            raise CacheError(f"{path}: cannot remove ({e.strerror})") from None
        fd = None
    try:
        if fd is not None:
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
        if fd is not None:
            os.close(fd)


def _summary(path: Path) -> PairSummary:
    try:
        doc: Any = strict.loads(_read_small(path / "pair.json", CacheError))
        base, aligned = doc["base"], doc["aligned"]
        if not (isinstance(base, str) and isinstance(aligned, str)):
            raise TypeError
    except (CacheError, ValueError, KeyError, TypeError):
        base = aligned = "?"
    try:
        names = _names(path)
    except CacheError:
        names = []  # listed as a pair without entries: `cache rm` and `clear` still remove it
    entries = [_entry_summary(path / name) for name in names if name.endswith(".safetensors")]
    entries.sort(key=lambda e: e.module)
    return PairSummary(path.name, base, aligned, path, entries)


def _entry_summary(path: Path) -> EntrySummary:
    """One entry as its header describes it; a link or other non-regular file is named, never opened."""
    try:
        st = _lstat(path)
    except OSError as e:
        return EntrySummary("?", "?", (), 0, safefs.os_error(path, e))
    if st is None:
        return EntrySummary("?", "?", (), 0, "removed while listed")
    if not stat.S_ISREG(st.st_mode):
        return EntrySummary("?", "?", (), 0, f"{path}: is {safefs.kind(st.st_mode)}, not a regular file")
    try:
        with safefs.open_file(path, FormatError, follow=False) as f:
            header = stfile.header_of(f, str(path), os.fstat(f.fileno()).st_size)
        meta, op = header.metadata, header.tensors[_TENSOR]
        return EntrySummary(meta[_META + "module"], meta[_META + "kind"], op.shape, st.st_size, None)
    except FormatError as e:
        return EntrySummary("?", "?", (), st.st_size, str(e))
    except (OSError, KeyError):
        return EntrySummary("?", "?", (), st.st_size, "unreadable")
