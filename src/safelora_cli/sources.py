"""Where base and aligned weights come from: one tensor at a time, never a whole model."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from functools import cached_property
from io import BufferedReader
from pathlib import Path

import torch

from . import stfile
from .errors import SourceError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class Source(ABC):
    """A checkpoint we can read single tensors from, by name."""

    def __init__(self, label: str, revision: str | None = None) -> None:
        self.label = label
        self.revision = revision
        self.bytes_read = 0  # tensor bytes read
        self.bytes_downloaded = 0  # bytes received over the network (headers and indexes included)

    @abstractmethod
    def names(self) -> Collection[str]:
        """Every tensor name in the checkpoint (from the index or header; reads no tensor data)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of one tensor, without reading it."""

    @abstractmethod
    def nbytes(self, name: str) -> int:
        """The size of one tensor's data, without reading it."""

    @abstractmethod
    def read(self, name: str, buf: bytearray | None = None) -> torch.Tensor:
        """Read one tensor; safetensors sources fill ``buf`` when it is large enough."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short identity of the checkpoint's content, for provenance and cache keys."""

    @abstractmethod
    def close(self) -> None:
        """Release open files."""

    def plan(self, names: Sequence[str]) -> None:  # noqa: B027 - an optional hook: local files need no plan
        """Announce the tensors about to be read, in reading order (lets the Hub source coalesce)."""

    def cache_identity(self) -> str:
        """What the projection cache keys this checkpoint by: its resolved path and fingerprint."""
        return f"local:{Path(self.label).resolve()}@{self.fingerprint()}"

    def resolve(self, module: str) -> str:
        """The checkpoint name of ``module``'s weight: exact, else a unique suffix match either way.

        Checkpoints may carry a prefix the adapter's module path lacks (``language_model.``) or
        lack one it has (original GPT-2 files: ``h.0.attn.c_attn.weight``).
        """
        key = f"{module}.weight"
        names = self.names()
        if key in names:
            return key
        found = sorted(n for n in names if n.endswith("." + key) or key.endswith("." + n))
        if len(found) == 1:
            return found[0]
        if not found:
            raise SourceError(
                f"{self.label}: no weight for module {module!r} (looked for {key!r} and names sharing "
                "its suffix); pass the checkpoint the adapter was trained on"
            )
        raise SourceError(
            f"{self.label}: module {module!r} matches several weights ({', '.join(found[:3])}); "
            "the checkpoint's names are ambiguous for this adapter"
        )


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
            header = self._headers[path] = stfile.read_header(path)
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
        try:
            # Only the zip format (torch >= 1.6) can be memory-mapped; older files are read whole.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
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
        return state[name]

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
    """A shard opened for tensor reads, each one long run of bytes."""
    f = path.open("rb")
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
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:16]


def parse_index(raw: bytes | str, where: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name → shard file name."""
    try:
        doc = json.loads(raw)
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError):
        raise SourceError(
            f"{where}: not a valid index (expected JSON with a 'weight_map' object); download the checkpoint again"
        ) from None
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise SourceError(f"{where}: weight_map entry {name!r} names {shard!r}, not a file beside the index")
    return weight_map


def _read_index(path: Path) -> dict[str, Path]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None
    out: dict[str, Path] = {}
    for name, shard in parse_index(raw, str(path)).items():
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise SourceError(f"{shard_path}: listed in {path.name} but missing; download the complete checkpoint")
        out[name] = shard_path
    return out


def open_local(path: Path) -> Source:
    """Open a local checkpoint directory (or a single ``.safetensors`` file).

    Its label is the absolute path, so provenance names the same checkpoint from any working directory.
    """
    label = str(path.absolute())
    if path.is_file() and path.suffix == ".safetensors":
        return _single_safetensors(label, path)
    if not path.exists():
        raise SourceError(f"{path}: no such directory; pass a model directory or a Hub repo id (org/name)")
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory; pass a model directory or a .safetensors file")
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = _read_index(path / SAFETENSORS_INDEX)
        return SafetensorsSource(label, weight_map, sorted(set(weight_map.values())))
    if (path / SAFETENSORS_SINGLE).exists():
        return _single_safetensors(label, path / SAFETENSORS_SINGLE)
    if (path / BIN_INDEX).is_file():
        weight_map = _read_index(path / BIN_INDEX)
        return TorchBinSource(label, weight_map, sorted(set(weight_map.values())))
    if (path / BIN_SINGLE).exists():
        return TorchBinSource(label, None, [path / BIN_SINGLE])
    raise SourceError(
        f"{path}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}; pass a model directory"
    )


def _single_safetensors(label: str, path: Path) -> SafetensorsSource:
    header = stfile.read_header(path)
    return SafetensorsSource(label, dict.fromkeys(header.tensors, path), [path], {path: header})
