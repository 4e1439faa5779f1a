"""LoRA adapters on disk: the formats safelora reads and writes, found by what a location holds.

Every format registers through ``register``, PEFT too (below): a new one is a module with an
``AdapterFormat`` and one ``register`` call here. ``load_adapter`` asks each format, in the order
registered, whether the location is one of its own (``detect``) and lets the first that says yes
read it; the run then works through ``Adapter`` and ``Adapter.format`` alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import AdapterError
from ..io import safefs
from . import checkpoint, specs
from .base import PROVENANCE_PREFIX, Adapter, AdapterFormat, BaseConfig, LoraModule
from .digest import file_digest
from .gguf import GGUF
from .location import FileLocation, open_location, rewrite_lock
from .lora_config import LoraConfig
from .mlx import MLX
from .peft import PEFT
from .specs import Named

__all__ = [
    "PROVENANCE_PREFIX",
    "Adapter",
    "AdapterFormat",
    "LoraConfig",
    "LoraModule",
    "Named",
    "expand",
    "file_digest",
    "format_of",
    "formats",
    "load_adapter",
    "open_adapter",
    "open_all",
    "opened",
    "read_config",
    "register",
    "rewrite_lock",
]

_FORMATS: list[AdapterFormat] = []


def register(fmt: AdapterFormat) -> None:
    """Make ``fmt`` one of the formats adapters are read as (after those registered before it)."""
    _FORMATS.append(fmt)


def formats() -> tuple[AdapterFormat, ...]:
    """The formats registered, in the order they are asked."""
    return tuple(_FORMATS)


def _expects() -> str:
    return " or ".join(f.expects for f in _FORMATS)


def format_of(location: safefs.Directory) -> AdapterFormat:
    """The first registered format that finds its adapter at ``location``; ``AdapterError`` (one line
    that says what each format looked for and what is supported) when none does."""
    for fmt in _FORMATS:
        if fmt.detect(location):
            return fmt
    instead = checkpoint.not_an_adapter(location)
    if instead is not None:
        raise AdapterError(instead)
    lacks = "; ".join(dict.fromkeys(f.lacks(location) for f in _FORMATS))
    supported = " or ".join(f"{f.expects} ({f.holds})" for f in _FORMATS)
    raise AdapterError(f"{lacks}; pass {supported}")


def open_adapter(path: Path) -> safefs.Directory:
    """Open the adapter location ``path`` once; every later read and the rewrite go through it."""
    return open_location(path, _expects())


def load_adapter(location: safefs.Directory, base_config: BaseConfig | None = None) -> Adapter:
    """Read and check the adapter at ``location`` in its format; raises ``AdapterError`` naming the
    file or tensor. Reads the config and the weights' header; no tensor is read until asked for.
    ``base_config``: reads the base model's ``config.json``, for a format that names its modules from it."""
    return format_of(location).load(location, base_config)


def read_config(location: safefs.Directory) -> LoraConfig:
    """Only the adapter's config (for defaults taken from it)."""
    return format_of(location).read_config(location)


@contextmanager
def opened(path: Path) -> Iterator[Adapter]:
    """``load_adapter`` on a path, with the location and the weights file closed afterwards."""
    with open_adapter(path) as location:
        adapter = load_adapter(location)
        try:
            yield adapter
        finally:
            adapter.close()


def _claims(path: Path) -> bool:
    """Whether a format finds its adapter in the file ``path`` by what it holds (a GGUF LoRA file's
    magic): what a pattern's match that is no directory must be to be taken. A FIFO, a device or a
    file that cannot be read is claimed by none; nothing is opened but regular files, for reading."""
    try:
        with FileLocation(path, AdapterError, fix=f"pass {_expects()}") as location:
            return any(fmt.detect(location) for fmt in _FORMATS)
    except AdapterError:
        return False


def expand(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str | None]]:
    """The adapter paths ``paths`` name, patterns expanded (see ``specs.expand``), without opening them."""
    return specs.expand(paths, _claims)


@contextmanager
def open_all(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[specs.Named]]:
    """Expand and open every adapter once (see ``specs.open_all``); closed on exit."""
    with specs.open_all(paths, open_adapter, _claims) as named:
        yield named


# MLX-LM first: its config is an adapter_config.json too, which PEFT claims whatever it holds.
register(MLX)
register(PEFT)
register(GGUF)
