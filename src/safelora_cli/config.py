"""YAML configs and the shipped presets: option values for ``safelora project``."""

from __future__ import annotations

import importlib.resources
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import UsageError

PRESET_PACKAGE = "safelora_cli.configs"


def _yaml() -> ModuleType:
    """PyYAML, imported when a config or preset is read: it adds ~0.1 s to every start-up otherwise."""
    import yaml

    return yaml


def load_options(text: str, where: str, known: Collection[str]) -> dict[str, Any]:
    """Parse a YAML mapping of option names (``num_layers`` or ``num-layers``) to values.

    Unknown keys are an error that names them, so a typo never silently falls back to a default.
    """
    yaml = _yaml()
    try:
        doc = yaml.safe_load(text)
    # PyYAML's constructors fail on impossible scalars (2001-13-45, !!int 0xZZ, !!timestamp 1) with
    # plain ValueError or AttributeError, and deep nesting overflows the stack: all are bad YAML here.
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise UsageError(f"{where}: not valid YAML ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    return checked_options({} if doc is None else doc, where, known)


def checked_options(doc: object, where: str, known: Collection[str]) -> dict[str, Any]:
    """Option names normalised (``num-layers`` → ``num_layers``) and checked against ``known``."""
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise UsageError(f"{where}: expected a mapping of option names to values")
    options = {k.replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return options


def load_file(path: Path, known: Collection[str]) -> dict[str, Any]:
    """``load_options`` for a file on disk."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: cannot read config ({e.strerror})") from None
    return load_options(text, str(path), known)


@dataclass(frozen=True)
class Preset:
    """A shipped (base, aligned) pair and the setting to use with it."""

    name: str
    base: str
    aligned: str
    options: dict[str, Any]


def presets() -> dict[str, Preset]:
    """Every preset shipped in ``configs/``, by name (the file name without ``.yaml``)."""
    found = {}
    for entry in importlib.resources.files(PRESET_PACKAGE).iterdir():
        if entry.name.endswith(".yaml"):
            name = entry.name.removesuffix(".yaml")
            doc = _yaml().safe_load(entry.read_text(encoding="utf-8"))
            found[name] = Preset(name, doc["base"], doc["aligned"], doc)
    return dict(sorted(found.items()))


def preset(name: str) -> Preset:
    """The preset called ``name``; a usage error listing the choices otherwise."""
    all_presets = presets()
    if name not in all_presets:
        raise UsageError(f"--preset {name}: no such preset; choose one of {', '.join(all_presets)}")
    return all_presets[name]


def preset_for_aligned(aligned: str) -> Preset | None:
    """The preset whose aligned model is ``aligned`` (a Hub repo id), if exactly one is."""
    matches = [p for p in presets().values() if p.aligned == aligned]
    return matches[0] if len(matches) == 1 else None
