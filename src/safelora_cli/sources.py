"""Where base and aligned weights come from: one tensor at a time, never a whole model.

Local checkpoints are read here; a Hub reference is recognised here and read by ``hub``, which
is imported only by runs that use the Hub.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from io import BufferedReader
from pathlib import Path
from typing import Protocol

import torch

from . import safefs, stfile, strict
from .cache import RefMemo
from .errors import SourceError, UsageError

HF_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_TRUE = {"1", "ON", "YES", "TRUE"}
_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_HEADER_SAFE = re.compile(r"[\x21-\x7e]*")  # visible ASCII; surrounding whitespace is stripped, as the Hub client does
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
INDEX_LIMIT = 64 << 20  # a 405B checkpoint's index is ~100 kB; a larger "index" is not one
_REDOWNLOAD = "download the checkpoint again"
_ZIP_MAGIC = b"PK\x03\x04"


# transformers 4.52 renamed the language model of multimodal models (Llava, Gemma 3, Qwen2-VL…)
# from ``language_model.model.*`` to ``model.language_model.*``: an adapter and a checkpoint saved
# on either side of that change name the same weight each their way.
_RENAMES = (("model.language_model.", "language_model.model."), ("language_model.model.", "model.language_model."))


# The input embedding matrix, as the architectures whose lm_head may be tied to it name it.
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _renamed(key: str) -> list[str]:
    """``key`` as the other side of transformers' multimodal rename writes it (if it is such a name)."""
    return [other + key.removeprefix(prefix) for prefix, other in _RENAMES if key.startswith(prefix)]


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
        """The checkpoint name of ``module``'s weight: exact, else a unique suffix match either way,
        else the same for the name on the other side of transformers' multimodal rename; for an
        ``lm_head`` the checkpoint does not store (tied), the input embeddings.

        Checkpoints may carry a prefix the adapter's module path lacks (``language_model.``) or
        lack one it has (original GPT-2 files: ``h.0.attn.c_attn.weight``).
        """
        key = f"{module}.weight"
        names = self.names()
        found: list[str] = []
        for candidate in (key, *_renamed(key)):
            if candidate in names:
                return candidate
            found = sorted(n for n in names if n.endswith("." + candidate) or candidate.endswith("." + n))
            if found:
                break
        if not found and module.rsplit(".", 1)[-1] == "lm_head":
            # A head tied to the input embeddings (tie_word_embeddings) is not saved: it is that matrix.
            found = sorted(n for n in names if any(n == e or n.endswith("." + e) for e in _INPUT_EMBEDDINGS))
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
            header = self._headers[path] = stfile.read_header(path, fix=_REDOWNLOAD)
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
        with safefs.open_file(path, SourceError, fix=_REDOWNLOAD) as f:
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
    f = safefs.open_file(path, SourceError, fix=_REDOWNLOAD)
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


def parse_index(raw: bytes | str, where: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name → shard file name."""
    try:
        doc = strict.loads(raw)
    except strict.InvalidJSON as e:
        raise SourceError(f"{where}: not a valid index ({e}); {_REDOWNLOAD}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise SourceError(f"{where}: not a valid index (expected JSON with a 'weight_map' object); {_REDOWNLOAD}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or shard in (".", "..") or "\0" in shard:
            raise SourceError(f"{where}: weight_map entry {name!r} names {shard!r}, not a file beside the index")
    return weight_map


def _read_index(path: Path) -> dict[str, Path]:
    raw, _ = safefs.read_small(path, SourceError, INDEX_LIMIT, fix=_REDOWNLOAD)
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
                raise SourceError(f"{shard_path}: is {safefs.kind(st.st_mode)}, not a regular file; {_REDOWNLOAD}")
            checked.add(shard)
        out[name] = shard_path
    return out


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
    header = stfile.read_header(path, fix=_REDOWNLOAD)
    return SafetensorsSource(label, dict.fromkeys(header.tensors, path), [path], {path: header})


@dataclass(frozen=True)
class HubRef:
    """``org/name`` with an optional branch, tag or commit sha."""

    repo_id: str
    revision: str | None


def parse_ref(text: str) -> HubRef | None:
    """``org/name`` or ``org/name@revision`` as a ``HubRef``; None when ``text`` is not one."""
    repo_id, at, revision = text.partition("@")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or (at and not revision):
        return None
    return HubRef(repo_id, revision or None)


def hf_cache_dir() -> Path:
    """The Hugging Face cache, as huggingface_hub finds it: HF_HUB_CACHE, HF_HOME/hub, XDG, ~/.cache."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


@dataclass(frozen=True)
class Hub:
    """Where and how to reach the Hub. Read from the environment when a run starts (not at import)."""

    endpoint: str
    token: str | None = field(repr=False)  # --token; ``hub.open_hub`` falls back to HF_TOKEN, then the login
    hf_cache: Path
    offline: bool
    refs: RefMemo | None  # safelora's record of branch → commit, for offline runs; None with --no-cache

    @classmethod
    def from_env(cls, token: str | None, refs: RefMemo | None) -> Hub:
        """HF_ENDPOINT, HF_HUB_OFFLINE and the Hugging Face cache, and the --token given (if any).

        A token (--token, HF_TOKEN) that cannot go into an HTTP header is refused here, at the start
        of every run that may use it, with a message that never shows it.
        """
        for where, value in (("--token", token), *((name, os.environ.get(name)) for name in _TOKEN_VARIABLES)):
            if value is not None and not _HEADER_SAFE.fullmatch(value.strip()):
                raise SourceError(
                    f"{where}: the token holds characters an HTTP header cannot carry (control characters, "
                    "spaces or non-ASCII); pass the token exactly as the Hub shows it"
                )
        return cls(
            endpoint=(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            token=token,
            hf_cache=hf_cache_dir(),
            offline=os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE,
            refs=refs,
        )

    def repo_cache(self, repo_id: str) -> Path:
        """The repo's folder in the Hugging Face cache (``refs/``, ``snapshots/``)."""
        return self.hf_cache / f"models--{repo_id.replace('/', '--')}"

    def snapshot(self, repo_id: str, sha: str) -> Path:
        return self.repo_cache(repo_id) / "snapshots" / sha


class Transfer(Protocol):
    """How a Hub source reports progress and warnings (the CLI draws a Rich progress bar)."""

    def task(self, label: str, total: int) -> Callable[[int], None]:
        """Start a byte counter of ``total`` bytes; returns the function that advances it."""

    def warn(self, message: str) -> None:
        """Tell the user now (e.g. before a large download)."""


class QuietTransfer:
    """A ``Transfer`` that shows nothing: for uses that download no weights (``safelora check``)."""

    def task(self, label: str, total: int) -> Callable[[int], None]:
        return lambda n: None

    def warn(self, message: str) -> None:
        pass


def open_source(
    spec: str,
    revision: str | None,
    *,
    flag: str,
    hub: Hub,
    transfer: Transfer,
    notes: list[str],
    connections: int = 8,
) -> Source:
    """A local checkpoint or a Hub repo, from what the user typed.

    ``hf://org/name`` is always the Hub; an existing local path is always local (as in transformers);
    otherwise ``org/name[@revision]`` is the Hub. The report names which one was used.
    """
    forced = spec.startswith(HF_PREFIX)
    ref = parse_ref(spec.removeprefix(HF_PREFIX))
    if not forced and (ref is None or os.path.lexists(spec)):
        if revision is not None:
            raise UsageError(f"{flag}-revision: {spec} is a local path; revisions apply to Hub repos")
        return open_local(Path(spec))
    if ref is None:
        raise SourceError(f"{spec}: not a Hub repo id; write org/name or org/name@revision")
    if ref.revision is not None and revision is not None and ref.revision != revision:
        raise UsageError(f"{flag}: revision given twice ({spec} and {flag}-revision {revision}); give one")
    # huggingface_hub and its HTTP stack cost ~0.25 s to import: only runs that use the Hub pay it.
    from .hub import open_hub

    source = open_hub(HubRef(ref.repo_id, ref.revision or revision), hub, transfer, connections)
    notes.append(f"{flag} {ref.repo_id}@{source.requested} is commit {source.sha}")
    return source
