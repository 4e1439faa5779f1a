"""One (base, aligned) pair's entries: read ahead on a thread, written on another, under the pair's lock."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import cast

import torch

from ..errors import CacheError, FormatError
from ..io import atomic, locks, safefs, stfile
from ..projection import Operator
from . import cache_entries as entries
from . import ownership
from .cache_entries import FORMAT, CorruptEntry, Stored
from .digests import DigestMemo


def _pair_file(name: str) -> bool | None:
    """How a run uses ``name`` in a pair's directory (see ``ownership.Rule.contents``)."""
    if name in ("pair.json", ".lock"):
        return True
    return False if name.endswith(".safetensors") else None


class PairCache:
    """The entries of one (base, aligned) pair; ``load_all`` needs no lock, ``store`` runs under ``locked``.

    A pair that breaks the ownership rule (``problem``) is not used: nothing is read, locked or
    written, and the reason is the first of ``warnings``.
    """

    def __init__(self, cache: entries.CacheRoot, base: str, aligned: str) -> None:
        self.base, self.aligned = base, aligned
        self.key = entries.hash_key(FORMAT, base, aligned, length=16)
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
        return self._cache.problem() or entries.RULE.checked(
            lambda: entries.RULE.contents(self.dir, _pair_file), self.dir
        )

    def _refused(self) -> bool:
        problem = self.problem()
        if problem is not None and problem not in self.warnings:
            self._writable = False
            self.warnings.append(problem)
        return problem is not None

    def digests(self) -> DigestMemo:
        """The memo of checkpoint digests beside the pairs (``digests.py``), under the cache's rule."""
        return DigestMemo(self._cache.root, entries.RULE, self._cache.problem())

    def _entry_path(self, module: str, transpose: bool) -> Path:
        return self.dir / f"{entries.hash_key(module, str(int(transpose)), length=32)}.safetensors"

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
            st = entries.lstat(path)
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
                kind, norm, out, inp = entries.check_meta(header, module, transpose)
                if limit is not None and out * inp > limit:
                    raise FormatError(f"it claims a {out}×{inp} operator, more than the module's {limit} values")
                entry = header.tensors[entries.TENSOR]
                if len(buffers[slot]) < entry.nbytes:
                    buffers[slot] = bytearray(entry.nbytes)
                data = stfile.read_tensor(f, entry, str(path), buffers[slot])
            except FormatError as e:
                raise CorruptEntry(str(e).removeprefix(f"{path}: ")) from None
            except OSError as e:
                raise CorruptEntry(f"cannot read ({e.strerror})") from None
        checksum = entries.checksum(
            header.metadata, entry.dtype, entry.shape, memoryview(buffers[slot])[: entry.nbytes]
        )
        if checksum != header.metadata[entries.CHECKSUM]:
            raise CorruptEntry("its metadata or data do not match its CRC-32")
        keys = header.metadata.get(entries.META + "base_key"), header.metadata.get(entries.META + "aligned_key")
        if not all(keys):
            raise CorruptEntry("metadata is missing or malformed")
        return Stored(kind, data, norm, out, inp, str(keys[0]), str(keys[1]))

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
            entries.META + "format": FORMAT,
            entries.META + "module": module,
            entries.META + "transpose": str(int(transpose)),
            entries.META + "kind": op.kind,
            entries.META + "norm": repr(op.norm),
            entries.META + "out": str(op.out_features),
            entries.META + "in": str(op.in_features),
            entries.META + "base_key": base_key,
            entries.META + "aligned_key": aligned_key,
        }
        self._pending[slot] = self._writer.submit(self._write, self._entry_path(module, transpose), staged, meta)

    def _write(self, path: Path, matrix: torch.Tensor, meta: dict[str, str]) -> None:
        data = entries.memory(matrix)
        meta[entries.CHECKSUM] = entries.checksum(meta, "F32", tuple(matrix.shape), data)
        # serialize only takes the data's length and hands the data itself to the writer.
        blob = stfile.Blob("F32", tuple(matrix.shape), cast(bytes, data))
        try:
            atomic.write_unsynced(
                path, stfile.serialize({entries.TENSOR: blob}, meta), ownership.FILE_MODE, entries.TMP
            )
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
        # `cache rm` may remove the pair while we wait: then the new lock file is locked.
        return locks.hold_file(self.dir / ".lock", ownership.FILE_MODE, on_wait, ownership.mkdirs)

    def _prepare(self) -> None:
        """Under the lock: drop temp files of killed runs, write the manifest once."""
        for tmp in self.dir.glob(f"{entries.TMP}*"):
            tmp.unlink(missing_ok=True)
        manifest = self.dir / "pair.json"
        if not os.path.lexists(manifest):
            doc = {"format": FORMAT, "base": self.base, "aligned": self.aligned, "created": time.time()}
            atomic.write_unsynced(manifest, [json.dumps(doc, indent=2).encode()], ownership.FILE_MODE, entries.TMP)
