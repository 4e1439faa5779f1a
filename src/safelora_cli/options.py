"""The options of a run (``project``): their defaults, their checks, and the layering of a config and
a preset under the values given, written once for the API, the command line and the integrations.

Adding an option is one field of ``Options`` (and its check in ``Options.checked``), plus its flag
in ``cli/project.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from . import config
from .errors import SafeLoraError, UsageError

StrPath = str | os.PathLike[str]
Precision = Literal["float32", "float64"]
Device = Literal["auto", "cpu", "cuda"]

PRECISIONS: tuple[Precision, ...] = ("float32", "float64")
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
DEFAULT_THRESHOLD = 0.5
MAX_CONNECTIONS = 64
# Threshold and number of layers are one choice (the mode): setting either one in a layer replaces
# both from the layers below it.
MODE_KEYS = ("threshold", "num_layers")
# Keys a config may hold for the command line alone (its input and presentation): accepted by the
# API, and ignored, so one file serves both.
COMMAND_LINE_ONLY = ("adapter", "json", "quiet", "summary", "plot", "sort", "projected_only")
# Config keys the command line spells as negative flags: ``no_cache: true`` is ``cache=False``.
NEGATED = {"no_cache": "cache", "no_backup": "backup"}
_NOT_AN_OPTION = "not_an_option"
_BOOLS = ("dry_run", "cache", "backup", "force", "allow_dora", "model_card", "allow_checkpoint")


@dataclass(frozen=True)
class Options:
    """How ``project`` runs: the checkpoint pair, the mode, where the result goes, and how it is computed."""

    base: StrPath | None = None
    aligned: StrPath | None = None
    base_revision: str | None = None
    aligned_revision: str | None = None
    threshold: float | None = None
    num_layers: int | None = None
    output: StrPath | None = None
    dry_run: bool = False
    precision: Precision = "float32"
    device: Device = "auto"
    cache: bool = True
    backup: bool = True
    force: bool = False
    allow_dora: bool = False
    model_card: bool = False
    token: str | None = None
    connections: int = 8
    sign_key: StrPath | None = None  # a PEM private key: sign what is written (default: SAFELORA_SIGN_KEY)
    allow_checkpoint: bool = False
    # Where each value a config file gave came from (``FILE:LINE``, by option name): not an option,
    # but what lets an error about one of them name the line to fix (``locate``).
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False, metadata={_NOT_AN_OPTION: True})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option's name, as the API takes it."""
        return tuple(f.name for f in fields(cls) if not f.metadata.get(_NOT_AN_OPTION))

    @classmethod
    def check_names(cls, what: str, given: Mapping[str, Any]) -> None:
        """Keyword arguments meant as options: an unknown name is a ``TypeError``, as Python's own."""
        for name in given:
            if name not in cls.names():
                raise TypeError(f"{what}() got an unexpected keyword argument {name!r}")

    @property
    def threshold_or_default(self) -> float:
        """τ in threshold mode (the default when none is set)."""
        return DEFAULT_THRESHOLD if self.threshold is None else float(self.threshold)

    def checked(self) -> Options:
        """These options, checked (``UsageError`` names the option), with paths as strings."""
        threshold, num_layers = self.threshold, self.num_layers
        if threshold is not None and num_layers is not None:
            raise UsageError(
                "give a threshold or a number of layers (num_layers), not both", concerns=("num_layers", "threshold")
            )
        if threshold is not None and (type(threshold) not in (int, float) or not -1.0 <= threshold <= 1.0):
            raise UsageError(f"threshold {threshold!r}: give a number from -1 to 1", concerns=("threshold",))
        if num_layers is not None and (type(num_layers) is not int or num_layers < 1):
            raise UsageError(
                f"num_layers {num_layers!r}: give a whole number of modules, at least 1", concerns=("num_layers",)
            )
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}", concerns=("precision",)
            )
        if self.device not in DEVICES:
            raise UsageError(f"device {self.device!r}: choose one of {', '.join(DEVICES)}", concerns=("device",))
        for key in _BOOLS:
            if not isinstance(getattr(self, key), bool):
                raise UsageError(f"{key} {getattr(self, key)!r}: give true or false", concerns=(key,))
        connections = self.connections
        if type(connections) is not int or not 1 <= connections <= MAX_CONNECTIONS:
            raise UsageError(
                f"connections {connections!r}: give a number from 1 to {MAX_CONNECTIONS}", concerns=("connections",)
            )
        return replace(
            self,
            base=None if self.base is None else os.fspath(self.base),
            aligned=None if self.aligned is None else os.fspath(self.aligned),
        )

    @property
    def output_path(self) -> Path | None:
        return None if self.output is None else Path(self.output)

    def locate(self, error: SafeLoraError) -> None:
        """Name the config file and line in ``error`` when a value it is about came from there
        (``FILE:LINE: `` before its message); a value given otherwise is named as it was."""
        origin = next((self.origins[key] for key in error.concerns if key in self.origins), None)
        if origin is not None:
            error.args = (f"{origin}: {error}",)
            error.option = None  # the value is the file's, not a flag's


def known_keys() -> set[str]:
    """Every key a config or preset may hold."""
    return {*Options.names(), *NEGATED, *COMMAND_LINE_ONLY}


@dataclass(frozen=True)
class Layered:
    """What ``layered`` found: the run's options, and the values a config or preset gave the keys
    only the command line uses (``COMMAND_LINE_ONLY``), for it to apply where no flag was given."""

    options: Options
    command_line: dict[str, Any]


def layered(
    explicit: Mapping[str, Any],
    *,
    preset: str | None = None,
    config_doc: StrPath | Mapping[str, Any] | None = None,
    check: config.ValueCheck | None = None,
    parse: Callable[[str, Any], Any] | None = None,
) -> Layered:
    """The options set ``explicit``ly, over the config's, over the preset's, over the defaults.

    Each layer holds config keys (``no_cache``, ``json``…). ``config_doc`` is a YAML file or a
    mapping of the same keys; ``check`` vets each value of a file (the refusal names its file, line
    and key), and ``parse`` turns each value of the config and the preset into the option's own
    (the command line's parsing). The options are not checked here: ``Options.checked`` is.
    """
    layers: list[tuple[dict[str, Any], dict[str, str]]] = [(_api_names(dict(explicit), "the command line"), {})]
    if config_doc is not None:
        if isinstance(config_doc, Mapping):
            found = config.checked_options(dict(config_doc), "config", known_keys())
            layers.append((_api_names(_parsed(found, parse), "config"), {}))
        else:
            where = os.fspath(config_doc)
            found, lines = config.located_file(Path(where), known_keys(), check, exclusive=(MODE_KEYS,))
            at = {NEGATED.get(key, key): f"{where}:{line}" for key, line in lines.items()}
            layers.append((_api_names(_parsed(found, parse), where, lines), at))
    if preset is not None:
        chosen = config.checked_options(config.preset(preset).options, f"preset {preset}", known_keys())
        layers.append((_api_names(_parsed(chosen, parse), preset), {}))
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer, at in layers:  # the highest first: a key once set stays
        mode_set = bool(set(MODE_KEYS) & set(merged))
        for key, value in layer.items():
            if key in merged or (key in MODE_KEYS and mode_set):
                continue
            merged[key] = value
            if key in at:
                origins[key] = at[key]
    ours = {k: v for k, v in merged.items() if k not in COMMAND_LINE_ONLY}
    return Layered(Options(**ours, origins=origins), {k: v for k, v in merged.items() if k in COMMAND_LINE_ONLY})


def _parsed(options: dict[str, Any], parse: Callable[[str, Any], Any] | None) -> dict[str, Any]:
    return options if parse is None else {k: parse(k, v) for k, v in options.items()}


def _api_names(options: dict[str, Any], where: str, lines: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Config keys as the API names them (``no_cache: true`` → ``cache=False``); ``lines``, the line
    of each key in the file ``where``."""
    out = {}
    for key, value in options.items():
        if key in NEGATED:
            if not isinstance(value, bool):
                line = None if lines is None else lines.get(key)
                raise UsageError(f"{where}{'' if line is None else f':{line}'}: {key} must be true or false")
            out[NEGATED[key]] = not value
        else:
            out[key] = value
    return out


def explicit_of(given: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments that differ from their defaults: those a config or preset may not override."""
    defaults = Options()
    return {k: v for k, v in given.items() if v != getattr(defaults, k, None)}
