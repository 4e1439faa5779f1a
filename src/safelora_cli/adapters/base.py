"""What every adapter format gives the run: ``Adapter`` as read, and the ``AdapterFormat`` protocol.

A format reads an adapter location into one shape: a ``LoraConfig``, and modules whose A is r×in
and B is out×r (as PEFT stores them; a format that stores them transposed converts on read, in
``tensor``, and back on write). The run works on that shape alone; where the bytes live, how the
file is laid out and how provenance is stamped into it are the format's business.

A location is the directory an adapter is opened through, once: every read and the rewrite go
through its descriptor (``safefs.Directory``). A directory format (PEFT, MLX-LM) is that directory;
a single-file format (a GGUF LoRA file) is a ``location.FileLocation``: the directory holding the
file, and the file's name, which ``detect`` reads the content of.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..errors import AdapterError
from ..io import safefs, stfile, strict

if TYPE_CHECKING:
    import torch

    from .lora_config import LoraConfig

PROVENANCE_PREFIX = "safelora."
# Reads the base model's config.json (None: it has none); called only by a format that needs it.
BaseConfig = Callable[[], Mapping[str, object] | None]  # every key of safelora's stamp starts so, in every format


@dataclass(frozen=True)
class LoraModule:
    """One targeted module: its keys in the adapter file and what the config says of it."""

    module: str  # PEFT prefix removed, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    rank: int
    layer: int | None
    out_features: int  # the weight the module adapts is out_features×in_features
    in_features: int


class Weights(NamedTuple):
    """A weights file as a format reads it: its header, the modules to project, the keys passed
    through (with why), and whether it is a DoRA adapter."""

    header: stfile.Header
    modules: list[LoraModule]
    skipped: list[tuple[str, str]]
    dora: bool


@dataclass(frozen=True)
class Adapter:
    """An adapter as read: its config and header in memory, its weights file open.

    Tensors are read from the open file when asked for (``tensor``), and a rewrite copies the
    untouched ones from it range by range: memory follows the LoRA weights the run uses, not what
    the file's size or header claims. Close it (``close``) when done.
    """

    format: AdapterFormat = field(repr=False)
    path: Path
    file: Path  # the weights file, as messages name it
    dir: safefs.Directory = field(repr=False)
    config: LoraConfig
    config_bytes: bytes = field(repr=False)  # the config as read: an ``--output`` copy writes these
    config_mode: int
    header: stfile.Header
    handle: BufferedReader = field(repr=False)  # where the tensors are read from
    stat: os.stat_result = field(repr=False)  # of the weights file as opened: a rewrite checks it is still there
    modules: list[LoraModule]
    skipped: list[tuple[str, str]]
    dora: bool
    warnings: list[str]
    source: Path | None = None  # the file the tensors come from, when not the adapter's own (a kept original)

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor (A r×in, B out×r), read from the weights file into memory of its own."""
        return self.format.tensor(self, key)

    def with_weights(self, handle: BufferedReader, source: Path) -> Adapter:
        """This adapter with its tensors read from ``handle`` (a kept original) instead of its own file.

        Its directory, config and ``stat`` stay: a rewrite still replaces the adapter's own file, and
        only if that file is still the one read. Takes ``handle`` over (``close`` closes it).
        """
        try:
            header, modules, skipped, dora = self.format.weights(handle, source, self.config)
        except BaseException:
            handle.close()
            raise
        self.close()
        return replace(self, header=header, handle=handle, modules=modules, skipped=skipped, dora=dora, source=source)

    def provenance(self) -> dict[str, str]:
        """The ``safelora.*`` stamp a previous run left, if any."""
        return self.format.provenance(self)

    def provenance_value(self, name: str, default: str, types: tuple[type, ...]) -> Any:
        """The JSON value a previous run recorded under ``safelora.<name>`` (``default`` if absent)."""
        key = PROVENANCE_PREFIX + name
        try:
            value = strict.loads(self.provenance().get(key, default))
        except strict.InvalidJSON:
            value = None
            types = ()
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise AdapterError(
                f"{self.file}: provenance {key} is not what safelora writes; the metadata was edited by hand "
                "or by another tool. Start from the original adapter"
            )
        return value

    def close(self) -> None:
        self.handle.close()


class AdapterFormat(Protocol):
    """One way LoRA adapters are stored on disk. PEFT is the first (``peft.PEFT``); another
    registers through ``adapters.register``, as PEFT does."""

    name: str
    # What to pass, for messages ("pass a PEFT adapter directory"), and what that holds
    # ("adapter_config.json + adapter_model.safetensors"), for the message when no format is found.
    expects: str
    holds: str
    # The config fields that change what the adapter does to the model (a different value: another adapter).
    effect_fields: frozenset[str]

    def covered_config(self, adapter: Adapter) -> bytes:
        """The config as the stamp digest covers it (canonical bytes): every field that can change what
        the adapter does, defaults filled in, only a documented inert list left out."""
        ...

    def detect(self, location: safefs.Directory) -> bool:
        """Whether ``location`` holds an adapter of this format, by what is there (not by its name)."""
        ...

    def lacks(self, location: safefs.Directory) -> str:
        """What ``location`` lacks to be of this format, as a message starts (``<path>: missing``)."""
        ...

    def read_config(self, location: safefs.Directory) -> LoraConfig:
        """Only the adapter's config (for defaults taken from it)."""
        ...

    def load(self, location: safefs.Directory, base_config: BaseConfig | None = None) -> Adapter:
        """Read and check the adapter: its config and its weights' header; no tensor is read yet.

        ``base_config`` reads the base model's ``config.json`` when the run has a base: a format whose
        file does not say which modules it adapts (GGUF) calls it and names them from it."""
        ...

    def weights(self, handle: BufferedReader, file: Path, config: LoraConfig | None) -> Weights:
        """The weights file open as ``handle`` (named ``file`` in messages), as ``config`` interprets it."""
        ...

    def tensor(self, adapter: Adapter, key: str) -> torch.Tensor:
        """One tensor of ``adapter``, A as r×in and B as out×r whatever the file holds."""
        ...

    def encode(self, adapter: Adapter, key: str, tensor: torch.Tensor) -> bytes:
        """A replacement for ``key`` (in the orientation ``tensor`` gives, in the dtype it read as) as
        the file stores it: what is written, and what the stamp digest covers."""
        ...

    def provenance(self, adapter: Adapter) -> dict[str, str]:
        """safelora's stamp as a previous run wrote it into the adapter (``safelora.*`` keys)."""
        ...

    def check_output(self, adapter: Adapter, output: Path, *, overwrite: bool) -> None:
        """What ``write`` refuses about ``output`` before writing a byte (a link, the adapter itself, a
        taken place unless ``overwrite``), so that a dry run exits as the run would."""
        ...

    def write(
        self,
        adapter: Adapter,
        replacements: Mapping[str, torch.Tensor],
        provenance: Mapping[str, str],
        output: Path | None,
        *,
        overwrite_output: bool = False,
        notes: list[str] | None = None,
    ) -> Path:
        """Write ``replacements`` (in the orientation ``tensor`` gives) and the ``provenance`` stamp:
        in place, atomically, or as a whole adapter at ``output``; untouched tensors are copied as
        byte ranges. Returns the file written."""
        ...

    def kept_files(self, adapter: Adapter) -> tuple[str, ...]:
        """The files (in ``adapter.dir``) an in-place write replaces: what a backup must keep."""
        ...

    def attested_files(self, adapter: Adapter) -> tuple[str, ...]:
        """The files (in ``adapter.dir``) that make up what the adapter does: what an attestation covers."""
        ...
