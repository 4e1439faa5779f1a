"""What every checkpoint source is, and where the Hub lives: the parts the local and Hub sources share.

A ``Source`` reads single tensors by name, never a whole model; ``parse_ref`` recognises a Hub
reference; ``Hub`` holds the Hub's settings from the environment; ``parse_index`` reads a sharded
checkpoint's index, from disk or from the Hub.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..errors import SourceError
from ..io import strict
from ..stores.refs import RefMemo

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
REDOWNLOAD = "download the checkpoint again"


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


def parse_index(raw: bytes | str, where: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name → shard file name."""
    try:
        doc = strict.loads(raw)
    except strict.InvalidJSON as e:
        raise SourceError(f"{where}: not a valid index ({e}); {REDOWNLOAD}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise SourceError(f"{where}: not a valid index (expected JSON with a 'weight_map' object); {REDOWNLOAD}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or shard in (".", "..") or "\0" in shard:
            raise SourceError(f"{where}: weight_map entry {name!r} names {shard!r}, not a file beside the index")
    return weight_map


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

        A token (the one given, HF_TOKEN) that cannot go into an HTTP header is refused here, at the
        start of every run that may use it, with a message that never shows it.
        """
        for where, value in (("the token given", token), *((name, os.environ.get(name)) for name in _TOKEN_VARIABLES)):
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
