"""What every checkpoint source is: the parts the local and Hub sources share.

A ``Source`` reads single tensors by name, never a whole model; ``parse_index`` reads a sharded
checkpoint's index, from disk or from the Hub; a ``Transfer`` is how a remote source reports progress.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from ..errors import SourceError
from ..io import safefs, strict
from . import identity

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
INDEX_LIMIT = 64 << 20  # a 405B checkpoint's index is ~100 kB; a larger "index" is not one
REDOWNLOAD = "download the checkpoint again"
CONFIG_JSON = "config.json"


# transformers 4.52 renamed the language model of multimodal models (Llava, Gemma 3, Qwen2-VL…)
# from ``language_model.model.*`` to ``model.language_model.*``: an adapter and a checkpoint saved
# on either side of that change name the same weight each their way.
_RENAMES = (("model.language_model.", "language_model.model."), ("language_model.model.", "model.language_model."))


# The input embedding matrix, as the architectures whose lm_head may be tied to it name it.
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def parse_config(raw: bytes, where: str) -> dict[str, object]:
    """A ``config.json`` as an object; ``SourceError`` for anything else."""
    try:
        value = strict.loads(raw)
    except strict.InvalidJSON as e:
        raise SourceError(f"{where}: not valid JSON ({e}); {REDOWNLOAD}") from None
    if not isinstance(value, dict):
        raise SourceError(f"{where}: not a JSON object; {REDOWNLOAD}")
    return value


def _renamed(key: str) -> list[str]:
    """``key`` as the other side of transformers' multimodal rename writes it (if it is such a name)."""
    return [other + key.removeprefix(prefix) for prefix, other in _RENAMES if key.startswith(prefix)]


class DigestStore(Protocol):
    """A memo of content digests by file stat (``stores.digests.DigestMemo``): load and save never raise."""

    def load(self, identity: str) -> dict[str, str]: ...

    def save(self, identity: str, tensors: Mapping[str, str]) -> None: ...


class Source(ABC):
    """A checkpoint we can read single tensors from, by name."""

    def __init__(self, label: str, revision: str | None = None) -> None:
        self.label = label
        self.revision = revision
        self.bytes_read = 0  # tensor bytes read
        self.bytes_downloaded = 0  # bytes received over the network (headers and indexes included)
        self.given = label  # the spec as the user gave it (``open_source`` sets it): what reports name
        # Content identity: tensor name → digest (``identity.tensor_digest``) of each tensor known so far,
        # hashed as the run streams it, or filled in from a memo by whoever opened the source.
        self.digests: dict[str, str] = {}
        self.memo: DigestStore | None = None  # where digests are kept between runs (set by whoever opens it)
        self._model_config: tuple[Mapping[str, object] | None] | None = None  # (config.json,) once read

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

    def public_name(self) -> str:
        """How published files name the checkpoint: a local one by its directory's (or file's) base name."""
        return Path(self.label).name or self.label

    def digest(self, names: Sequence[str]) -> dict[str, str]:
        """The content digest of each of ``names``: known ones as they are, then the memo's (another
        run may have added them since), the others read (once) and hashed, and remembered."""
        missing = identity.wanted(names, self.digests)
        if missing and self.memo is not None:
            self.digests.update(self.memo.load(self.cache_identity()))
            missing = identity.wanted(names, self.digests)
        if missing:
            self.plan(missing)
            for name in missing:
                self.digests[name] = identity.tensor_digest(self.read(name))
            self.remember()
        return {name: self.digests[name] for name in names}

    def remember(self) -> None:
        """Keep the digests known so far in the memo, if the source has one."""
        if self.memo is not None:
            self.memo.save(self.cache_identity(), self.digests)

    def model_config(self) -> Mapping[str, object] | None:
        """The checkpoint's ``config.json`` (strict JSON, an object), or None when it has none: what a
        format that names modules by the model's class (GGUF) needs. Read once, when first asked."""
        if self._model_config is None:
            self._model_config = (self.read_model_config(),)
        return self._model_config[0]

    def read_model_config(self) -> Mapping[str, object] | None:
        """``model_config`` as read: a local checkpoint's sits in its directory; the Hub source reads the repo's."""
        path = Path(self.label) / CONFIG_JSON
        if not os.path.isdir(self.label) or not os.path.lexists(path):
            return None
        return parse_config(safefs.read_small(path, SourceError, INDEX_LIMIT, fix=REDOWNLOAD)[0], str(path))

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


class Transfer(Protocol):
    """How a remote source reports progress and warnings (the CLI draws a Rich progress bar)."""

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
