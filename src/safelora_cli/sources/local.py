"""Local checkpoints: a directory with ``model.safetensors``, sharded safetensors and their index, or
``pytorch_model.bin`` (+ index), or a single ``.safetensors`` file. Every file is opened through
``safefs`` (regular files only), and ``.bin`` files are unpickled only with ``weights_only=True``.

As a source kind, local claims an existing path, and opens whatever no kind claims, so that a path
that is not there is named as such.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import stat
from collections.abc import Collection
from functools import cached_property
from io import BufferedReader
from pathlib import Path

import torch

from ..errors import SourceError, UsageError
from ..io import safefs, stfile
from .base import (
    BIN_INDEX,
    BIN_SINGLE,
    INDEX_LIMIT,
    REDOWNLOAD,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    Source,
    parse_index,
)
from .registry import Register, Request, SourceKind

_ZIP_MAGIC = b"PK\x03\x04"


class SafetensorsSource(Source):
    """A directory with ``model.safetensors`` or sharded safetensors plus their index."""

    def __init__(
        self,
        label: str,
        weight_map: dict[str, Path],
        files: list[Path],
        headers: dict[Path, stfile.Header] | None = None,
    ) -> None:
        super().__init__(label)
        self._weight_map = weight_map
        self._files = files
        self._headers = dict(headers or {})
        self._handles: dict[Path, BufferedReader] = {}

    def names(self) -> Collection[str]:
        return self._weight_map.keys()

    def _entry(self, name: str) -> tuple[Path, stfile.TensorEntry]:
        path = self._weight_map[name]
        header = self._headers.get(path)
        if header is None:
            header = self._headers[path] = stfile.read_header(path, fix=REDOWNLOAD)
        entry = header.tensors.get(name)
        if entry is None:
            raise SourceError(
                f"{path}: the index maps {name!r} to this shard but the shard does not hold it; "
                "the index and shards are out of step"
            )
        return path, entry

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1].shape

    def nbytes(self, name: str) -> int:
        return self._entry(name)[1].nbytes

    def read(self, name: str, buf: bytearray | None = None) -> torch.Tensor:
        path, entry = self._entry(name)
        if entry.dtype not in stfile.COMPUTE_DTYPES:
            raise SourceError(
                f"{path}: {name} is {entry.dtype}; Safe LoRA computes on float16, bfloat16, float32 or float64 "
                "weights: pass an unquantized checkpoint"
            )
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open_shard(path)
        t = stfile.read_tensor(f, entry, str(path), buf)
        self.bytes_read += entry.nbytes
        return t

    def fingerprint(self) -> str:
        return _stat_fingerprint(self._files)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class TorchBinSource(Source):
    """``pytorch_model.bin`` (+ index): unpickled only with ``weights_only=True``, memory-mapped."""

    def __init__(self, label: str, weight_map: dict[str, Path] | None, files: list[Path]) -> None:
        super().__init__(label)
        self._files = files
        self._given_map = weight_map
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}

    @cached_property
    def _weight_map(self) -> dict[str, Path]:
        if self._given_map is not None:
            return self._given_map
        return dict.fromkeys(self._load(self._files[0]), self._files[0])

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        state = self._loaded.get(path)
        if state is not None:
            return state
        with safefs.open_file(path, SourceError, fix=REDOWNLOAD) as f:
            try:
                # Only the zip format (torch >= 1.6) can be memory-mapped; older files are read whole.
                # torch.load opens the path again: the descriptor's own path names the very file
                # checked above, whatever happens to ``path`` meanwhile.
                zipped = os.pread(f.fileno(), 4, 0) == _ZIP_MAGIC
                obj = torch.load(
                    f"/proc/self/fd/{f.fileno()}" if os.path.isdir("/proc/self/fd") else path,
                    map_location="cpu",
                    weights_only=True,
                    mmap=zipped,
                )
            except pickle.UnpicklingError as e:
                raise SourceError(
                    f"{path}: refused to unpickle ({str(e).splitlines()[0][:160]}); only plain tensor "
                    "checkpoints are loaded, convert it to safetensors"
                ) from None
            except (RuntimeError, OSError, EOFError, ValueError) as e:
                raise SourceError(f"{path}: not a readable PyTorch checkpoint ({e.__class__.__name__})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise SourceError(f"{path}: expected a dict of tensors (a state dict)")
        self._loaded[path] = obj
        return obj

    def names(self) -> Collection[str]:
        return self._weight_map.keys()

    def _tensor(self, name: str) -> torch.Tensor:
        path = self._weight_map[name]
        state = self._load(path)
        if name not in state:
            raise SourceError(f"{path}: the index maps {name!r} to this file but it does not hold it")
        t = state[name]
        if t.layout != torch.strided or t.device.type != "cpu":
            where = f"a {t.device.type} tensor" if t.device.type != "cpu" else f"a {t.layout} tensor"
            raise SourceError(
                f"{path}: {name} is {where}, not a dense one; Safe LoRA reads dense weights, re-save the checkpoint"
            )
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def nbytes(self, name: str) -> int:
        t = self._tensor(name)
        return t.numel() * t.element_size()

    def read(self, name: str, buf: bytearray | None = None) -> torch.Tensor:
        t = self._tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def fingerprint(self) -> str:
        return _stat_fingerprint(self._files)

    def close(self) -> None:
        self._loaded.clear()


def open_shard(path: Path) -> BufferedReader:
    """A shard opened for tensor reads, each one long run of bytes (a regular file; see ``safefs``)."""
    f = safefs.open_file(path, SourceError, fix=REDOWNLOAD)
    if hasattr(os, "posix_fadvise"):
        # A doubled readahead window read the 7B benchmark's tensors ~1.5× faster from a cold page cache.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return f


def _stat_fingerprint(files: list[Path]) -> str:
    """Hash of each weight file's name, size, inode, mtime and ctime: changes whenever a file is written.

    ctime is set by the kernel on every write or replacement and cannot be set back (unlike mtime:
    ``cp -p``, ``touch -r``), so an edited checkpoint never matches an old fingerprint. Hashing the
    weights themselves would cost a full read of both checkpoints on every run.
    """
    h = hashlib.sha256()
    for p in sorted(files):
        try:
            st = p.stat()
        except OSError as e:
            raise SourceError(safefs.os_error(p, e)) from None
        h.update(f"{p.name}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_index(path: Path) -> dict[str, Path]:
    raw, _ = safefs.read_small(path, SourceError, INDEX_LIMIT, fix=REDOWNLOAD)
    out: dict[str, Path] = {}
    checked: set[str] = set()
    for name, shard in parse_index(raw, str(path)).items():
        shard_path = path.parent / shard
        if shard not in checked:
            try:
                st = os.stat(shard_path)
            except FileNotFoundError:
                raise SourceError(
                    f"{shard_path}: listed in {path.name} but missing; download the complete checkpoint"
                ) from None
            except OSError as e:
                raise SourceError(safefs.os_error(shard_path, e)) from None
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{shard_path}: is {safefs.kind(st.st_mode)}, not a regular file; {REDOWNLOAD}")
            checked.add(shard)
        out[name] = shard_path
    return out


_SHARD_NAME = re.compile(r".+-\d{1,6}-of-\d{1,6}\.(?:safetensors|bin)")


def open_local(path: Path) -> Source:
    """Open a local checkpoint directory (or a single ``.safetensors`` file).

    Its label is the absolute path, so provenance names the same checkpoint from any working directory.
    """
    label = str(path.absolute())
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such directory; pass a model directory or a Hub repo id (org/name)") from None
    except OSError as e:
        raise SourceError(safefs.os_error(path, e)) from None
    if stat.S_ISREG(st.st_mode) and _one_shard(path):
        raise SourceError(
            f"{path}: one shard of the checkpoint in {path.absolute().parent}, which holds the other weights; "
            "pass the directory"
        )
    if stat.S_ISREG(st.st_mode) and path.suffix == ".safetensors":
        return _single_safetensors(label, path)
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{path}: not a directory; pass a model directory or a .safetensors file")
    if _lexists(path / SAFETENSORS_INDEX):
        weight_map = _read_index(path / SAFETENSORS_INDEX)
        return SafetensorsSource(label, weight_map, sorted(set(weight_map.values())))
    if _lexists(path / SAFETENSORS_SINGLE):
        return _single_safetensors(label, path / SAFETENSORS_SINGLE)
    if _lexists(path / BIN_INDEX):
        weight_map = _read_index(path / BIN_INDEX)
        return TorchBinSource(label, weight_map, sorted(set(weight_map.values())))
    if _lexists(path / BIN_SINGLE):
        return TorchBinSource(label, None, [path / BIN_SINGLE])
    raise SourceError(
        f"{path}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}; pass a model directory"
    )


def register_sources(register: Register) -> None:
    """Register the local kind: an existing path, and the fallback for any spec no kind claims."""
    register(
        SourceKind(
            name="local",
            settings=type(None),
            defaults=lambda: None,
            open=_open,
            claims=os.path.lexists,
            fallback=True,
        )
    )


def _open(request: Request, settings: None) -> Source:
    if request.revision is not None:
        raise UsageError(
            f"{request.role} revision {request.revision}: {request.spec} is a local path; revisions apply to Hub repos",
            concerns=(f"{request.role}_revision", request.role),
        )
    return open_local(Path(request.spec))


def _one_shard(path: Path) -> bool:
    """Whether the file ``path`` is one shard of a sharded checkpoint: named as shards are, or beside
    an index (a shard alone holds only some of the weights)."""
    return bool(_SHARD_NAME.fullmatch(path.name)) or any(
        _lexists(path.parent / index) for index in (SAFETENSORS_INDEX, BIN_INDEX)
    )


def _lexists(path: Path) -> bool:
    """Whether a directory entry exists (a dangling link too: opening it then says what is wrong)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise SourceError(safefs.os_error(path, e)) from None
    return True


def _single_safetensors(label: str, path: Path) -> SafetensorsSource:
    header = stfile.read_header(path, fix=REDOWNLOAD)
    return SafetensorsSource(label, dict.fromkeys(header.tensors, path), [path], {path: header})
