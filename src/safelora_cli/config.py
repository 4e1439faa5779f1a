"""YAML configs and the shipped presets: option values for ``safelora project``.

A config is a flat mapping of option names to values, and that is all it may be. The YAML reader is
PyYAML's safe one, made stricter: a duplicate key, an anchor or alias (no alias bombs), an explicit
tag (``!!binary``, ``!!python/…``), a merge key (``<<``), nesting deeper than ``MAX_DEPTH``, an
integer outside [-2**63, 2**64) and ``.nan``/``.inf`` are each refused with the file and the line.
Dates stay the text they were written as. What a value means is left to the options' own parsing.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ConfigError, ConfigFileError, UsageError
from .io import safefs

PRESET_PACKAGE = "safelora_cli.configs"
MAX_BYTES = 1 << 20  # a config is a few lines; anything larger is not one
MAX_DEPTH = 8  # mapping → list of adapters → scalar is 3; room to spare, none for a recursion bomb
_INT_MIN, _INT_MAX = -(2**63), 2**64
_MAX_INT_CHARS = 70  # 0b and 64 binary digits, with room for a sign
_FIX = ConfigError.fix
_REINSTALL = "the installed presets are damaged; reinstall safelora"

# Checks one option value the way the command line would ("threshold", 7): the reason it is
# refused, or None when it is fine.
ValueCheck = Callable[[str, Any], str | None]


def _yaml() -> ModuleType:
    """PyYAML, imported when a config or preset is read: it adds ~0.1 s to every start-up otherwise."""
    import yaml

    return yaml


class _Refused(Exception):
    """Something a config may not hold, at a 1-based line."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line = line


@functools.cache
def _loader() -> type:
    """PyYAML's safe loader, with the refusals above; built on first use, as PyYAML is imported then."""
    yaml = _yaml()

    def refuse(node_or_event: Any, problem: str) -> _Refused:
        return _Refused(node_or_event.start_mark.line + 1, problem)

    class StrictLoader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise refuse(event, f"alias *{event.anchor}: a config holds no anchors or aliases; write the value out")
            if event.anchor is not None:
                raise refuse(
                    event, f"anchor &{event.anchor}: a config holds no anchors or aliases; write the value out"
                )
            if getattr(event, "tag", None) is not None:
                tag = str(event.tag).replace("tag:yaml.org,2002:", "!!")
                raise refuse(event, f"tag {tag}: a config holds plain values; remove the tag")
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise refuse(event, f"nested deeper than {MAX_DEPTH} levels; a config maps option names to values")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if not isinstance(node, yaml.MappingNode):
                raise refuse(node, "expected a mapping")
            mapping: dict[Any, Any] = {}
            lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise refuse(key_node, "merge key <<: a config holds no merge keys; name each option itself")
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (list, dict)):
                    raise refuse(key_node, "a key must be an option name, not a list or a mapping")
                if key in mapping:
                    raise refuse(key_node, f"duplicate key {key!r} (first on line {lines[key]}); name each option once")
                mapping[key] = self.construct_object(value_node, deep=deep)
                lines[key] = line
            return mapping

        def construct_yaml_int(self, node: Any) -> int:
            text = str(node.value).replace("_", "")
            if len(text) > _MAX_INT_CHARS:
                raise refuse(node, f"integer of {len(text)} characters; no option takes such a number")
            try:
                value: int = super().construct_yaml_int(node)
            except ValueError:  # PyYAML resolves "0b_" and "0x_" as integers, then int() fails
                raise refuse(node, f"{node.value} is not an integer; write the number out") from None
            if not _INT_MIN <= value < _INT_MAX:
                raise refuse(node, f"integer {text} out of range; no option takes such a number")
            return value

        def construct_yaml_float(self, node: Any) -> float:
            value: float = super().construct_yaml_float(node)
            if not math.isfinite(value):
                raise refuse(node, f"{node.value}: an option value must be a finite number")
            return value

    StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
    StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)
    # 2024-01-31 unquoted is a date to PyYAML; to a config it is the text written (a path, a revision).
    # A lone "=" or "<<" value is text too.
    for tag in ("timestamp", "value", "merge"):
        StrictLoader.add_constructor(f"tag:yaml.org,2002:{tag}", yaml.SafeLoader.construct_yaml_str)
    return StrictLoader


def _parse(text: str, where: str, fix: str) -> tuple[object, dict[str, int]]:
    """The document and, when it is a mapping, the line of each top-level key."""
    yaml = _yaml()
    try:
        loader = _loader()(text)  # PyYAML's reader refuses control characters here already
        try:
            node = loader.get_single_node()
            doc = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except _Refused as e:
        raise ConfigError(f"{where}:{e.line}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{at}: not valid YAML ({e.problem or e.context}); {fix}") from None
    except yaml.reader.ReaderError as e:
        row = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{where}:{row}: not valid YAML ({str(e).splitlines()[0]}); {fix}") from None
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return doc, lines


def load_options(
    text: str,
    where: str,
    known: Collection[str],
    check: ValueCheck | None = None,
    exclusive: Collection[Collection[str]] = (),
) -> dict[str, Any]:
    """Parse a YAML mapping of option names (``num_layers`` or ``num-layers``) to values.

    Unknown keys are an error that names them, so a typo never silently falls back to a default.
    Two keys of one group of ``exclusive`` are an error that names both lines. ``check``, when
    given, vets each value; the first refusal names the file, line and key.
    """
    return _located(text, where, known, check, exclusive)[0]


def _located(
    text: str, where: str, known: Collection[str], check: ValueCheck | None, exclusive: Collection[Collection[str]]
) -> tuple[dict[str, Any], dict[str, int]]:
    """``load_options``, with the line of each option (by its normalised name)."""
    doc, lines = _parse(text, where, _FIX)
    options = _checked({} if doc is None else doc, where, known, lines)
    for group in exclusive:
        _one_of(group, where, lines)
    if check is not None:
        for key, value in options.items():
            reason = check(key, value)
            if reason is not None:
                raise ConfigError(f"{_at(where, lines, key)}: {key}: {reason}")
    return options, {key.replace("-", "_"): line for key, line in lines.items()}


def _one_of(group: Collection[str], where: str, lines: Mapping[str, int]) -> None:
    """At most one key of ``group`` in a file: the second, by line, is refused, naming the first."""
    given = sorted((line, key) for key, line in lines.items() if key.replace("-", "_") in group)
    if len(given) > 1:
        (first_line, first), (line, key) = given[0], given[1]
        raise ConfigError(f"{where}:{line}: {key}: give {first} or {key}, not both ({first} is on line {first_line})")


def checked_options(doc: object, where: str, known: Collection[str]) -> dict[str, Any]:
    """Option names normalised (``num-layers`` → ``num_layers``) and checked against ``known``."""
    return _checked(doc, where, known, {})


def _at(where: str, lines: Mapping[str, int], key: str) -> str:
    """``where:line`` for the key as written (either spelling), or ``where`` without a known line."""
    line = lines.get(key, lines.get(key.replace("_", "-")))
    return where if line is None else f"{where}:{line}"


def _checked(doc: object, where: str, known: Collection[str], lines: Mapping[str, int]) -> dict[str, Any]:
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise ConfigError(f"{where}: expected a mapping of option names to values; {_FIX}")
    options: dict[str, Any] = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name in options:
            raise ConfigError(f"{_at(where, lines, key)}: {key} repeats an option given above; name each option once")
        options[name] = value
    unknown = [k for k in doc if k.replace("-", "_") not in known]
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), list(known), n=1)
            hint = f" (did you mean {close[0].replace('_', '-') if '-' in key else close[0]}?)" if close else ""
            problems.append(f"{_at(where, lines, key)}: unknown key {key}{hint}")
        raise ConfigError(f"{'; '.join(problems)}; known keys: {', '.join(sorted(known))}")
    return options


def located_file(
    path: Path, known: Collection[str], check: ValueCheck | None = None, exclusive: Collection[Collection[str]] = ()
) -> tuple[dict[str, Any], dict[str, int]]:
    """``load_options`` for a file on disk, with the line of each option (by its normalised name,
    ``num_layers``): a regular file of at most ``MAX_BYTES``, in UTF-8.

    A file that cannot be read as such (missing, a FIFO or device, too large, an OS error) is an
    input error, exit 1; what it says is judged as usage, exit 2.
    """
    raw, _ = safefs.read_small(path, ConfigFileError, MAX_BYTES, fix=_FIX)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte {e.start}); save the config as UTF-8") from None
    return _located(text, str(path), known, check, exclusive)


@dataclass(frozen=True)
class Preset:
    """A shipped (base, aligned) pair and the setting to use with it."""

    name: str
    base: str
    aligned: str
    options: dict[str, Any]


def preset_names() -> list[str]:
    """The shipped presets' names, without reading them (for shell completion)."""
    files = importlib.resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def presets() -> dict[str, Preset]:
    """Every preset shipped in ``configs/``, by name (the file name without ``.yaml``)."""
    found = {}
    for entry in importlib.resources.files(PRESET_PACKAGE).iterdir():
        if entry.name.endswith(".yaml"):
            name = entry.name.removesuffix(".yaml")
            doc, _ = _parse(entry.read_text(encoding="utf-8"), f"preset {name}", _REINSTALL)
            if not (isinstance(doc, dict) and isinstance(doc.get("base"), str) and isinstance(doc.get("aligned"), str)):
                raise ConfigError(f"preset {name}: needs base and aligned repo ids; {_REINSTALL}")
            found[name] = Preset(name, doc["base"], doc["aligned"], doc)
    return dict(sorted(found.items()))


def preset(name: str) -> Preset:
    """The preset called ``name``; a usage error listing the choices otherwise."""
    all_presets = presets()
    if name not in all_presets:
        raise UsageError(f"preset {name}: no such preset; choose one of {', '.join(all_presets)}", option="preset")
    return all_presets[name]


def preset_for_aligned(aligned: str) -> Preset | None:
    """The preset whose aligned model is ``aligned`` (a Hub repo id), if exactly one is."""
    matches = [p for p in presets().values() if p.aligned == aligned]
    return matches[0] if len(matches) == 1 else None
