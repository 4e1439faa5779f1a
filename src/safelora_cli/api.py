"""safelora as a library: what the ``safelora`` command does, as functions a training script can call.

Every function raises a ``SafeLoraError`` subclass for input it cannot handle (never ``SystemExit``),
and leaves every file as it was then. The command line is a thin layer on top: it parses flags,
calls these functions, and renders what they return.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Protocol, overload

from . import adapters as adapter_io
from . import config, sources
from .errors import MissingAlignedError, MissingBaseError, SafeLoraError, SourceError, UsageError
from .run import audit, pipeline
from .stores import backups
from .stores.cache import PairCache, ProjectionCache

StrPath = str | os.PathLike[str]
Precision = Literal["float32", "float64"]
Device = Literal["auto", "cpu", "cuda"]
Report = pipeline.Report
CheckResult = audit.CheckResult
Inspection = audit.Inspection
Restored = backups.Restored

_PRECISIONS = ("float32", "float64")
_DEVICES = ("auto", "cpu", "cuda")
DEFAULT_THRESHOLD = 0.5
MAX_CONNECTIONS = 64


class Events(Protocol):
    """What a run reports while it works (the command line draws progress bars from it)."""

    def on_module(self, layer: pipeline.LayerResult, total: int) -> None:
        """A module's similarity is known (before selection); ``total`` modules in the run."""

    def task(self, label: str, total: int) -> Any:
        """A download of ``total`` bytes starts; returns the function that advances it."""

    def warn(self, message: str) -> None:
        """Something the user should know now (before a large download, say)."""

    def say(self, message: str) -> None:
        """A passing remark (waiting for another run's lock)."""


class _Silent:
    """``Events`` that show nothing."""

    def on_module(self, layer: pipeline.LayerResult, total: int) -> None:
        pass

    def task(self, label: str, total: int) -> Any:
        return lambda n: None

    def warn(self, message: str) -> None:
        pass

    def say(self, message: str) -> None:
        pass


# The options a config file or preset may set for ``project``, by the names the API takes.
_OPTIONS = (
    "base",
    "aligned",
    "base_revision",
    "aligned_revision",
    "threshold",
    "num_layers",
    "output",
    "dry_run",
    "precision",
    "device",
    "cache",
    "backup",
    "force",
    "allow_dora",
    "model_card",
    "token",
    "connections",
)
# Keys a config file may hold for the command line alone (output and presentation): accepted here,
# and ignored, so one file serves both.
_COMMAND_LINE_ONLY = ("json", "quiet", "summary", "plot", "sort", "projected_only")
# Config keys the command line spells as negative flags: ``no_cache: true`` is ``cache=False``.
_NEGATED = {"no_cache": "cache", "no_backup": "backup"}


@overload
def project(
    adapter: StrPath,
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    base_revision: str | None = None,
    aligned_revision: str | None = None,
    preset: str | None = None,
    config: StrPath | Mapping[str, Any] | None = None,
    threshold: float | None = None,
    num_layers: int | None = None,
    output: StrPath | None = None,
    dry_run: bool = False,
    precision: Precision = "float32",
    device: Device = "auto",
    cache: bool = True,
    backup: bool = True,
    force: bool = False,
    allow_dora: bool = False,
    model_card: bool = False,
    token: str | None = None,
    connections: int = 8,
    events: Events | None = None,
) -> Report: ...
@overload
def project(
    adapter: list[StrPath],
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    base_revision: str | None = None,
    aligned_revision: str | None = None,
    preset: str | None = None,
    config: StrPath | Mapping[str, Any] | None = None,
    threshold: float | None = None,
    num_layers: int | None = None,
    output: StrPath | None = None,
    dry_run: bool = False,
    precision: Precision = "float32",
    device: Device = "auto",
    cache: bool = True,
    backup: bool = True,
    force: bool = False,
    allow_dora: bool = False,
    model_card: bool = False,
    token: str | None = None,
    connections: int = 8,
    events: Events | None = None,
) -> list[Report | SafeLoraError]: ...


def project(
    adapter: StrPath | list[StrPath],
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    base_revision: str | None = None,
    aligned_revision: str | None = None,
    preset: str | None = None,
    config: StrPath | Mapping[str, Any] | None = None,
    threshold: float | None = None,
    num_layers: int | None = None,
    output: StrPath | None = None,
    dry_run: bool = False,
    precision: Precision = "float32",
    device: Device = "auto",
    cache: bool = True,
    backup: bool = True,
    force: bool = False,
    allow_dora: bool = False,
    model_card: bool = False,
    token: str | None = None,
    connections: int = 8,
    events: Events | None = None,
) -> Report | list[Report | SafeLoraError]:
    """Run Safe LoRA on a PEFT LoRA adapter directory (or several) against a (base, aligned) pair.

    As ``safelora project``: the adapter's ``adapter_model.safetensors`` is rewritten in place
    (atomically, after its original is kept in the backup store unless ``backup=False``), or
    written to ``output`` as a complete adapter directory, or nothing is written (``dry_run``).
    ``base`` and ``aligned`` are local directories or Hub repo ids (``org/name[@revision]``);
    ``aligned`` defaults to the adapter config's ``base_model_name_or_path`` and ``base`` to the
    preset whose aligned model that is. Threshold mode projects every module whose rounded
    similarity is ≤ ``threshold`` (default 0.5); ``num_layers=k`` projects the k least similar.

    ``model_card`` writes the run's Safe LoRA section into the written adapter's README.md (a card
    that cannot be written is a note in the report); ``Report.summary_markdown()``,
    ``Report.card_section()`` and ``Report.plot(path)`` give the rest of what the command line's
    --summary, --model-card and --plot show.

    ``preset`` (a shipped pair, such as ``"llama-2-7b"``) and ``config`` (a YAML file, or a mapping
    of the same keys) fill in the options left at their defaults; the config wins over the preset.
    Keys only the command line uses (``json``, ``quiet``, ``summary``, ``plot``, ``sort``,
    ``projected_only``) are accepted and ignored, so one file serves both.

    One adapter (a path): returns its ``Report``, or raises its ``SafeLoraError``. A list (or a
    glob that matches several): returns one entry per adapter, its ``Report`` or the
    ``SafeLoraError`` raised for it (``error.adapter`` names it); an adapter's failure raises
    nothing, a checkpoint's failure (every adapter needs it) raises.
    """
    given = {
        "base": None if base is None else os.fspath(base),
        "aligned": None if aligned is None else os.fspath(aligned),
        "base_revision": base_revision,
        "aligned_revision": aligned_revision,
        "threshold": threshold,
        "num_layers": num_layers,
        "output": output,
        "dry_run": dry_run,
        "precision": precision,
        "device": device,
        "cache": cache,
        "backup": backup,
        "force": force,
        "allow_dora": allow_dora,
        "model_card": model_card,
        "token": token,
        "connections": connections,
    }
    options = _with_defaults(given, preset, config)
    specs = _specs(adapter)
    outcomes, paths = _project(specs, options, events or _Silent())
    for path, outcome in zip(paths, outcomes, strict=True):
        if isinstance(outcome, SafeLoraError):
            outcome.adapter = path
    if not isinstance(adapter, list) and len(outcomes) == 1:
        only = outcomes[0]
        if isinstance(only, SafeLoraError):
            raise only
        return only
    return outcomes


def _specs(adapter: StrPath | list[StrPath]) -> list[StrPath]:
    return list(adapter) if isinstance(adapter, list) else [adapter]


def _with_defaults(
    given: dict[str, Any], preset: str | None, config_doc: StrPath | Mapping[str, Any] | None
) -> dict[str, Any]:
    """The options given, with those left at their defaults filled in from the config, then the preset."""
    defaults: dict[str, Any] = {"threshold": None, "num_layers": None, "dry_run": False, "precision": "float32"}
    defaults |= {"device": "auto", "cache": True, "backup": True, "force": False, "allow_dora": False}
    defaults["model_card"] = False
    defaults["connections"] = 8
    layers: list[dict[str, Any]] = []
    if config_doc is not None:
        if isinstance(config_doc, Mapping):
            layers.append(_api_names(config.checked_options(dict(config_doc), "config", _known()), "config"))
        else:
            layers.append(_api_names(config.load_file(Path(config_doc), _known()), str(config_doc)))
    if preset is not None:
        chosen = config.preset(preset)
        layers.append(_api_names(config.checked_options(chosen.options, f"preset {preset}", _known()), preset))
    options = dict(given)
    explicit = {k for k, v in given.items() if v != defaults.get(k)}
    for layer in layers:  # the config first: it wins over the preset
        mode_set = bool({"threshold", "num_layers"} & explicit)
        for key, value in layer.items():
            if key in explicit or (key in ("threshold", "num_layers") and mode_set):
                continue
            options[key] = value
            explicit.add(key)
    return options


def _known() -> set[str]:
    return {*_OPTIONS, *_NEGATED, *_COMMAND_LINE_ONLY}


def _api_names(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Config keys as the API names them (``no_cache: true`` → ``cache=False``)."""
    out = {}
    for key, value in options.items():
        if key in _COMMAND_LINE_ONLY:
            continue
        if key in _NEGATED:
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key} must be true or false")
            out[_NEGATED[key]] = not value
        else:
            out[key] = value
    return out


def settings_from(options: Mapping[str, Any]) -> pipeline.Settings:
    """The pipeline's settings from ``project``'s options, checked (``UsageError`` names the option)."""
    threshold, num_layers = options.get("threshold"), options.get("num_layers")
    if threshold is not None and num_layers is not None:
        raise UsageError("give a threshold or a number of layers (num_layers), not both")
    if threshold is not None and (type(threshold) not in (int, float) or not -1.0 <= threshold <= 1.0):
        raise UsageError(f"threshold {threshold!r}: give a number from -1 to 1")
    if num_layers is not None and (type(num_layers) is not int or num_layers < 1):
        raise UsageError(f"num_layers {num_layers!r}: give a whole number of modules, at least 1")
    precision, device = options.get("precision", "float32"), options.get("device", "auto")
    if precision not in _PRECISIONS:
        raise UsageError(f"precision {precision!r}: choose one of {', '.join(_PRECISIONS)}")
    if device not in _DEVICES:
        raise UsageError(f"device {device!r}: choose one of {', '.join(_DEVICES)}")
    for key in ("dry_run", "cache", "backup", "force", "allow_dora", "model_card"):
        if not isinstance(options.get(key, False), bool):
            raise UsageError(f"{key} {options[key]!r}: give true or false")
    connections = options.get("connections", 8)
    if type(connections) is not int or not 1 <= connections <= MAX_CONNECTIONS:
        raise UsageError(f"connections {connections!r}: give a number from 1 to {MAX_CONNECTIONS}")
    output = options.get("output")
    return pipeline.Settings(
        mode="number" if num_layers is not None else "threshold",
        threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold),
        num_layers=num_layers,
        precision=precision,
        device=device,
        allow_dora=options.get("allow_dora", False),
        force=options.get("force", False),
        dry_run=options.get("dry_run", False),
        output=None if output is None else Path(output),
        backup=options.get("backup", True),
        model_card=options.get("model_card", False),
    )


def _project(
    specs: Sequence[StrPath], options: Mapping[str, Any], events: Events
) -> tuple[list[Report | SafeLoraError], list[Path]]:
    settings = settings_from(options)
    notes: list[str] = []
    with ExitStack() as stack:
        store = None
        if options.get("cache", True):
            store = ProjectionCache()
            if (problem := store.problem()) is not None:
                notes.append(problem)
                store = None
        hub = sources.Hub.from_env(options.get("token"), store.refs if store is not None else None)
        adapters = stack.enter_context(adapter_io.open_all(specs))
        aligned = options.get("aligned") or _aligned_default(adapters, notes)
        base = options.get("base") or _base_from_preset(aligned, notes)
        _note_swapped(base, aligned, adapters, notes)
        connections = options.get("connections", 8)
        base_src = sources.open_source(
            base,
            options.get("base_revision"),
            role="base",
            hub=hub,
            transfer=events,
            notes=notes,
            connections=connections,
        )
        stack.callback(base_src.close)
        aligned_src = sources.open_source(
            aligned,
            options.get("aligned_revision"),
            role="aligned",
            hub=hub,
            transfer=events,
            notes=notes,
            connections=connections,
        )
        stack.callback(aligned_src.close)
        _refuse_same(base_src, aligned_src)
        outcomes = pipeline.project_adapters(
            adapters,
            base_src,
            aligned_src,
            settings,
            notes=notes,
            on_module=events.on_module,
            cache=_pair(store, base_src, aligned_src, notes),
            on_wait=events.say,
        )
        return outcomes, [named.path for named in adapters]


def _pair(
    store: ProjectionCache | None, base: sources.Source, aligned: sources.Source, notes: list[str]
) -> PairCache | None:
    """The pair's cache, or None (with a note) when its directory breaks the ownership rule."""
    if store is None:
        return None
    pair = store.pair(base.cache_identity(), aligned.cache_identity())
    if (problem := pair.problem()) is not None:
        notes.append(problem)
        return None
    return pair


def _refuse_same(base: sources.Source, aligned: sources.Source) -> None:
    """Base and aligned that are one checkpoint (the same files, or the same Hub commit): every V
    would be 0, and every module undefined."""
    same = base.cache_identity() == aligned.cache_identity()
    if base.revision is not None and aligned.revision is not None:
        same = same or base.revision == aligned.revision  # one commit sha is one tree
    elif base.revision is None and aligned.revision is None:
        same = same or base.fingerprint() == aligned.fingerprint()  # the same files (inodes), by any path
    if same:
        raise SourceError(
            f"base {base.label} and aligned {aligned.label} are the same checkpoint: every V = W_aligned − W_base "
            "would be 0; pass the unaligned base model as base and the chat model as aligned"
        )


def _note_swapped(base: str, aligned: str, adapters: list[adapter_io.Named], notes: list[str]) -> None:
    """A note when base is the model the adapter was trained on and aligned is not: the pair may be
    swapped. A swapped pair gives the same similarities (V only changes sign), so no table shows it,
    and provenance would record the wrong pair."""
    for named in adapters:
        if named.dir is None:
            continue
        try:
            trained_on = adapter_io.read_config(named.dir).base_model_name_or_path
        except SafeLoraError:
            continue  # the adapter's own run reports it
        if trained_on and _same_model(base, trained_on) and not _same_model(aligned, trained_on):
            notes.append(
                f"base {base} is the model the adapter was trained on (adapter_config.json's base_model_name_or_path) "
                f"and aligned {aligned} is not: base and aligned may be swapped; a swapped pair gives the same "
                "similarities and provenance would record it, so check the order"
            )
            return


def _same_model(spec: str, name: str) -> bool:
    """Whether two model references name one model: one directory, or one Hub repo (any revision)."""
    if not spec.startswith(sources.HF_PREFIX) and os.path.lexists(spec):
        try:
            return os.path.exists(name) and os.path.samefile(spec, name)
        except OSError:
            return False
    ref, other = sources.parse_ref(spec.removeprefix(sources.HF_PREFIX)), sources.parse_ref(name)
    return ref is not None and other is not None and ref.repo_id.lower() == other.repo_id.lower()


def _aligned_default(adapters: list[adapter_io.Named], notes: list[str]) -> str:
    """No aligned model given: the first adapter's base_model_name_or_path, read through its open directory."""
    first = adapters[0]
    if first.dir is None:
        raise first.error or SafeLoraError(f"{first.path}: cannot be read")
    name = adapter_io.read_config(first.dir).base_model_name_or_path
    if name is None or not (os.path.isdir(name) or sources.parse_ref(name) is not None):
        named = f" (adapter_config.json names {name!r}, neither a local directory nor a Hub repo id)" if name else ""
        raise MissingAlignedError(f"no aligned model given{named}")
    notes.append(f"aligned model taken from adapter_config.json's base_model_name_or_path: {name}")
    return name


def _base_from_preset(aligned: str, notes: list[str]) -> str:
    """No base model given: the base of the preset whose aligned model is ``aligned``."""
    match = config.preset_for_aligned(aligned)
    if match is None:
        raise MissingBaseError(f"no base model given ({aligned} is not the aligned model of any preset)")
    notes.append(f"base model filled in from preset {match.name}: {match.base}")
    return match.base


def check(
    adapter: StrPath, *, base: StrPath | None = None, aligned: StrPath | None = None, token: str | None = None
) -> CheckResult:
    """Whether an adapter is sanitized by safelora and unmodified since (and, with ``base`` and
    ``aligned``, against that pair). ``CheckResult.status`` is ``sanitized``, ``never_sanitized``,
    ``modified`` or ``other_pair``; ``ok`` is True only for ``sanitized``."""
    if (base is None) != (aligned is None):
        raise UsageError("give both base and aligned, or neither")
    pair = None
    if base is not None and aligned is not None:
        pair = (_identity(base, "base", token), _identity(aligned, "aligned", token))
    with adapter_io.open_all([adapter]) as [named]:
        if named.dir is None:
            raise named.error or SafeLoraError(f"{named.path}: cannot be read")
        return audit.check(named.dir, pair)


def _identity(spec: StrPath, role: str, token: str | None) -> str:
    """How provenance names a checkpoint (``path@fingerprint`` or ``repo@sha``), reading no weights."""
    store = ProjectionCache()
    hub = sources.Hub.from_env(token, store.refs if store.problem() is None else None)
    src = sources.open_source(os.fspath(spec), None, role=role, hub=hub, transfer=sources.QuietTransfer(), notes=[])
    try:
        return pipeline.source_info(src).identity
    finally:
        src.close()


def inspect(adapter: StrPath) -> Inspection:
    """What an adapter is (modules, ranks, dtypes, size, targets, DoRA…), its provenance, and whether
    the original of a projected adapter is kept in the backup store."""
    with adapter_io.open_all([adapter]) as [named]:
        if named.dir is None:
            raise named.error or SafeLoraError(f"{named.path}: cannot be read")
        return audit.inspect(named.dir, backups.BackupStore())


@overload
def restore(adapter: StrPath, *, force: bool = False) -> Restored: ...
@overload
def restore(adapter: list[StrPath], *, force: bool = False) -> list[Restored | SafeLoraError]: ...


def restore(adapter: StrPath | list[StrPath], *, force: bool = False) -> Restored | list[Restored | SafeLoraError]:
    """Put back the original ``adapter_model.safetensors`` an in-place ``project`` kept, byte for byte.

    Refused (``BackupError``) when no original is kept and, unless ``force``, when the adapter was
    changed since safelora wrote it. A list returns one entry per adapter, as ``project`` does.
    """
    store = backups.BackupStore()
    outcomes: list[Restored | SafeLoraError] = []
    with adapter_io.open_all(_specs(adapter)) as opened:
        for named in opened:
            try:
                if named.dir is None:
                    raise named.error or SafeLoraError(f"{named.path}: cannot be read")
                outcomes.append(backups.restore(named.dir, store, force=force))
            except SafeLoraError as e:
                e.adapter = named.path
                outcomes.append(e)
    if not isinstance(adapter, list) and len(outcomes) == 1:
        only = outcomes[0]
        if isinstance(only, SafeLoraError):
            raise only
        return only
    return outcomes
