"""safelora as a library: what the ``safelora`` command does, as functions a training script can call.

Every function raises a ``SafeLoraError`` subclass for input it cannot handle (never ``SystemExit``),
and leaves every file as it was then. The command line is a thin layer on top: it parses flags,
calls these functions, and renders what they return.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload

from .. import config
from ..attest.keys import PUBLIC_KEYS_ENV as PUBLIC_KEYS_ENV
from ..config import ValueCheck
from ..errors import MissingAlignedError, MissingBaseError, SafeLoraError, UsageError
from ..housekeeping import CacheListing as CacheListing
from ..housekeeping import ClearedPairs as ClearedPairs
from ..housekeeping import RemovedBackups as RemovedBackups
from ..housekeeping import backups_to_remove as backups_to_remove
from ..housekeeping import cache_clear as cache_clear
from ..housekeeping import cache_list as cache_list
from ..housekeeping import cache_remove as cache_remove
from ..housekeeping import remove_backups as remove_backups
from ..options import Device, Options, Precision, StrPath, explicit_of, layered
from ..outputs.text import printable
from ..results import Backup as Backup
from ..results import CheckResult as CheckResult
from ..results import Inspection as Inspection
from ..results import LayerResult as LayerResult
from ..results import Restored as Restored
from ..results import Settings as Settings
from ..results import Signed as Signed
from ..results import SourceInfo as SourceInfo
from .evaluating import eval_markdown as eval_markdown
from .evaluating import evaluate as evaluate
from .evaluating import write_eval_card as write_eval_card
from .evaluating import write_eval_records as write_eval_records
from .gate import check as check
from .gate import inspect as inspect
from .gate import restore as restore
from .gate import sign as sign
from .opening import adapter_paths as adapter_paths
from .opening import dir_of, one_or_all, open_adapters, open_pair, refuse_same, specs_of
from .opening import weights_file as weights_file

if TYPE_CHECKING:
    # The names below are this module's too (``__getattr__`` imports them on first use).
    from .. import adapters as adapter_io
    from .. import sources
    from ..adapters import Adapter as Adapter
    from ..adapters import file_digest as file_digest
    from ..adapters import opened as opened
    from ..adapters.base import PROVENANCE_PREFIX as PROVENANCE_PREFIX
    from ..adapters.lora_config import CONFIG_FILE as CONFIG_FILE
    from ..adapters.peft_config import ADAPTER_FILE as ADAPTER_FILE
    from ..attest.keys import Signer
    from ..demo import build as build_demo
    from ..evaluation.result import EvalResult as EvalResult
    from ..outputs.histogram import histogram_lines as histogram_lines
    from ..outputs.plot import check_plot_path as check_plot_path
    from ..outputs.plot import require_matplotlib as require_matplotlib
    from ..outputs.report import Report as Report
    from ..outputs.summary import append_summary as append_summary
    from ..outputs.summary import check_summary_path as check_summary_path
    from ..outputs.summary import error_summary_markdown as error_summary_markdown
    from ..outputs.table import Sort as Sort
    from ..outputs.table import table_rows as table_rows
    from ..stores.cache import PairCache, ProjectionCache
    from ..stores.cache import PairSummary as PairSummary

__all__ = ["PUBLIC_KEYS_ENV", "Device", "Options", "Precision", "StrPath", "build_demo", "printable"]

# The names this module gives from the modules that import torch: each is imported on first use,
# so that importing the API (and the command line's --help) does not pay for torch.
_PACKAGE = __name__.rpartition(".")[0]  # safelora_cli: the homes are its modules
_HOMES = {
    # What the integrations read of an adapter safelora wrote: they go through the API alone.
    "Adapter": "adapters",
    "opened": "adapters",
    "file_digest": "adapters",
    "PROVENANCE_PREFIX": "adapters.base",
    "CONFIG_FILE": "adapters.lora_config",
    "ADAPTER_FILE": "adapters.peft_config",
    "Report": "outputs.report",
    "EvalResult": "evaluation.result",
    "PairSummary": "stores.cache",
    "Sort": "outputs.table",
    "table_rows": "outputs.table",
    "histogram_lines": "outputs.histogram",
    "check_summary_path": "outputs.summary",
    "append_summary": "outputs.summary",
    "error_summary_markdown": "outputs.summary",
    "check_plot_path": "outputs.plot",
    "require_matplotlib": "outputs.plot",
}


def __getattr__(name: str) -> Any:
    if name == "build_demo":
        return importlib.import_module(f"{_PACKAGE}.demo").build
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{_PACKAGE}.{home}"), name)


class Events(Protocol):
    """What a run reports while it works (the command line draws progress bars from it)."""

    def on_module(self, layer: LayerResult, total: int) -> None:
        """A module's similarity is known (before selection); ``total`` modules in the run."""

    def task(self, label: str, total: int) -> Any:
        """A download of ``total`` bytes starts; returns the function that advances it."""

    def warn(self, message: str) -> None:
        """Something the user should know now (before a large download, say)."""

    def say(self, message: str) -> None:
        """A passing remark (waiting for another run's lock)."""


class _Silent:
    """``Events`` that show nothing."""

    def on_module(self, layer: LayerResult, total: int) -> None:
        pass

    def task(self, label: str, total: int) -> Any:
        return lambda n: None

    def warn(self, message: str) -> None:
        pass

    def say(self, message: str) -> None:
        pass


@overload
def project(
    adapter: StrPath,
    *,
    preset: str | None = None,
    config: StrPath | Mapping[str, Any] | None = None,
    events: Events | None = None,
    **options: Any,
) -> Report: ...
@overload
def project(
    adapter: list[StrPath],
    *,
    preset: str | None = None,
    config: StrPath | Mapping[str, Any] | None = None,
    events: Events | None = None,
    **options: Any,
) -> list[Report | SafeLoraError]: ...


def project(
    adapter: StrPath | list[StrPath],
    *,
    preset: str | None = None,
    config: StrPath | Mapping[str, Any] | None = None,
    events: Events | None = None,
    **options: Any,
) -> Report | list[Report | SafeLoraError]:
    """Run Safe LoRA on a PEFT LoRA adapter directory (or several) against a (base, aligned) pair.

    The keyword options are the fields of ``Options`` (``base``, ``aligned``, ``threshold``,
    ``num_layers``, ``output``, ``dry_run``, ``precision``, ``device``, ``cache``, ``backup``,
    ``force``, ``allow_dora``, ``model_card``, ``token``, ``connections``, ``allow_checkpoint``, the
    revisions), with its defaults. As ``safelora project``: the adapter's ``adapter_model.safetensors`` is rewritten in
    place (atomically, after its original is kept in the backup store unless ``backup=False``), or
    written to ``output`` as a complete adapter directory, or nothing is written (``dry_run``).
    A Trainer checkpoint is not rewritten in place unless ``allow_checkpoint`` (``CheckpointError``),
    and from one ``output`` takes the adapter's files only, never the training state.
    ``base`` and ``aligned`` are local directories or Hub repo ids (``org/name[@revision]``);
    ``aligned`` defaults to the adapter config's ``base_model_name_or_path`` and ``base`` to the
    preset whose aligned model that is. Threshold mode projects every module whose rounded
    similarity is ≤ ``threshold`` (default 0.5); ``num_layers=k`` projects the k least similar.

    ``model_card`` writes the run's Safe LoRA section into the written adapter's README.md (a card
    that cannot be written is a note in the report); ``Report.summary_markdown()``,
    ``Report.card_section()`` and ``Report.plot(path)`` give the rest of what the command line shows.

    ``preset`` (a shipped pair, such as ``"llama-2-7b"``) and ``config`` (a YAML file, or a mapping
    of the same keys) fill in the options left at their defaults; the config wins over the preset.
    Keys only the command line uses (``json``, ``quiet``, ``summary``, ``plot``, ``sort``,
    ``projected_only``, ``adapter``) are accepted and ignored, so one file serves both.

    One adapter (a path): returns its ``Report``, or raises its ``SafeLoraError``. A list (or a
    glob that matches several): returns one entry per adapter, its ``Report`` or the
    ``SafeLoraError`` raised for it (``error.adapter`` names it); an adapter's failure raises
    nothing, a checkpoint's failure (every adapter needs it) raises.
    """
    Options.check_names("project", options)
    chosen = layered(explicit_of(options), preset=preset, config_doc=config).options
    return run(adapter, chosen, events)


def project_options(
    explicit: Mapping[str, Any],
    *,
    preset: str | None = None,
    config: StrPath | None = None,
    check: ValueCheck | None = None,
    parse: Callable[[str, Any], Any] | None = None,
) -> tuple[Options, dict[str, Any]]:
    """The command line's options (config keys, such as ``no_cache``): those it was given
    ``explicit``ly over the config's, the preset's and the defaults (``options.layered``); with the
    values of the keys only the command line uses."""
    found = layered(explicit, preset=preset, config_doc=config, check=check, parse=parse)
    return found.options, found.command_line


def preset_names() -> list[str]:
    """The shipped presets' names (for shell completion)."""
    return config.preset_names()


@overload
def run(adapter: StrPath, options: Options, events: Events | None = None) -> Report: ...
@overload
def run(adapter: list[StrPath], options: Options, events: Events | None = None) -> list[Report | SafeLoraError]: ...


def run(
    adapter: StrPath | list[StrPath], options: Options, events: Events | None = None
) -> Report | list[Report | SafeLoraError]:
    """``project`` with its options as one ``Options``. An error about a value a config file gave
    names the file and line (``Options.locate``)."""
    try:
        checked = options.checked()
        outcomes, paths = _project(
            specs_of(adapter), checked, events or _Silent(), single=not isinstance(adapter, list)
        )
    except SafeLoraError as e:
        options.locate(e)
        raise
    for path, outcome in zip(paths, outcomes, strict=True):
        if isinstance(outcome, SafeLoraError):
            outcome.adapter = path
            options.locate(outcome)
    result: Report | list[Report | SafeLoraError] = one_or_all(adapter, outcomes)
    return result


def _settings(options: Options) -> Settings:
    # Every other setting is the option of the same name.
    same = {f.name: getattr(options, f.name) for f in fields(Settings) if f.name in Options.names()}
    return Settings(
        **same
        | {
            "mode": "number" if options.num_layers is not None else "threshold",
            "threshold": options.threshold_or_default,
            "output": options.output_path,
        }
    )


def _project(
    specs: Sequence[StrPath], options: Options, events: Events, *, single: bool
) -> tuple[list[Report | SafeLoraError], list[Path]]:
    from .. import sources
    from ..adapters.specs import names_several
    from ..run import batch, guards, pipeline
    from ..stores.backups import BackupStore
    from ..stores.cache import ProjectionCache

    settings = _settings(options)
    signer = None if options.dry_run else _load_signer(options.sign_key)
    notes: list[str] = []
    with ExitStack() as stack:
        store = None
        if options.cache:
            store = ProjectionCache()
            if (problem := store.problem()) is not None:
                notes.append(problem)
                store = None
        hub = sources.Hub.from_env(options.token, store.refs if store is not None else None, options.connections)
        adapters = stack.enter_context(open_adapters(specs))
        if single and len(adapters) != 1:
            raise UsageError(f"{os.fspath(specs[0])!r} names {len(adapters)} adapters; pass a list to project several")
        outputs = batch.outputs(adapters, settings.output, names_several(specs))
        guards.refuse_unsafe_targets(adapters, settings, BackupStore())  # before a checkpoint is opened
        aligned = os.fspath(options.aligned) if options.aligned else _aligned_default(adapters, notes)
        base = os.fspath(options.base) if options.base else _base_from_preset(aligned, notes)
        _note_swapped(base, aligned, adapters)
        pair = ((base, options.base_revision), (aligned, options.aligned_revision))
        base_src, aligned_src = open_pair(stack, pair, hub, events, notes, None)
        refuse_same(base_src, aligned_src)
        outcomes = pipeline.project_adapters(
            adapters,
            base_src,
            aligned_src,
            settings,
            notes=notes,
            on_module=events.on_module,
            cache=_pair(store, base_src, aligned_src, notes),
            on_wait=events.say,
            signer=signer,
            outputs=outputs,
        )
        return outcomes, [named.path for named in adapters]


def _load_signer(spec: StrPath | None) -> Signer | None:
    from ..attest import keys

    return keys.load_signer_or_env(spec)


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


def _note_swapped(base: str, aligned: str, adapters: list[adapter_io.Named]) -> None:
    """A note for each adapter whose base is the model it was trained on while aligned is not: the
    pair may be swapped. A swapped pair gives the same similarities (V only changes sign), so no
    table shows it, and provenance would record the wrong pair."""
    from .. import adapters as adapter_io

    for named in adapters:
        if named.dir is None:
            continue
        try:
            trained_on = adapter_io.read_config(named.dir).base_model_name_or_path
        except SafeLoraError:
            continue  # the adapter's own run reports it
        if trained_on and _same_model(base, trained_on) and not _same_model(aligned, trained_on):
            named.notes.append(
                f"base {base} is the model the adapter was trained on (adapter_config.json's base_model_name_or_path) "
                f"and aligned {aligned} is not: base and aligned may be swapped; a swapped pair gives the same "
                "similarities and provenance would record it, so check the order"
            )


def _same_model(spec: str, name: str) -> bool:
    """Whether two model references name one model: one directory, or one Hub repo (any revision)."""
    from .. import sources

    if not spec.startswith(sources.HF_PREFIX) and os.path.lexists(spec):
        try:
            return os.path.exists(name) and os.path.samefile(spec, name)
        except OSError:
            return False
    ref, other = sources.parse_ref(spec.removeprefix(sources.HF_PREFIX)), sources.parse_ref(name)
    return ref is not None and other is not None and ref.repo_id.lower() == other.repo_id.lower()


def _aligned_default(adapters: list[adapter_io.Named], notes: list[str]) -> str:
    """No aligned model given: the first adapter's base_model_name_or_path, read through its open directory."""
    from .. import adapters as adapter_io
    from .. import sources

    name = adapter_io.read_config(dir_of(adapters[0])).base_model_name_or_path
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
