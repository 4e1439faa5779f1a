"""safelora as a library: what the ``safelora`` command does, as functions a training script can call.

Every function raises a ``SafeLoraError`` subclass for input it cannot handle (never ``SystemExit``),
and leaves every file as it was then. The command line is a thin layer on top: it parses flags,
calls these functions, and renders what they return.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload

from . import config
from .attest.keys import PUBLIC_KEYS_ENV as PUBLIC_KEYS_ENV
from .config import ValueCheck
from .errors import AdapterNotLocalError, MissingAlignedError, MissingBaseError, SafeLoraError, SourceError, UsageError
from .housekeeping import CacheListing as CacheListing
from .housekeeping import ClearedPairs as ClearedPairs
from .housekeeping import RemovedBackups as RemovedBackups
from .housekeeping import backups_to_remove as backups_to_remove
from .housekeeping import cache_clear as cache_clear
from .housekeeping import cache_list as cache_list
from .housekeeping import cache_remove as cache_remove
from .housekeeping import remove_backups as remove_backups
from .options import Device, Options, Precision, StrPath, explicit_of, layered
from .outputs.text import printable
from .results import Backup as Backup
from .results import CheckResult as CheckResult
from .results import Inspection as Inspection
from .results import LayerResult as LayerResult
from .results import Restored as Restored
from .results import Settings as Settings
from .results import Signed as Signed
from .results import SourceInfo as SourceInfo

if TYPE_CHECKING:
    # The names below are this module's too (``__getattr__`` imports them on first use).
    from . import adapters as adapter_io
    from . import sources
    from .adapters import Adapter as Adapter
    from .adapters import file_digest as file_digest
    from .adapters import opened as opened
    from .adapters.base import PROVENANCE_PREFIX as PROVENANCE_PREFIX
    from .adapters.lora_config import CONFIG_FILE as CONFIG_FILE
    from .adapters.peft_config import ADAPTER_FILE as ADAPTER_FILE
    from .attest.keys import PublicKey, Signer
    from .attest.policy import Policy
    from .demo import build as build_demo
    from .evaluation.generate import Progress
    from .evaluation.result import EvalResult as EvalResult
    from .io import safefs
    from .outputs.histogram import histogram_lines as histogram_lines
    from .outputs.plot import check_plot_path as check_plot_path
    from .outputs.plot import require_matplotlib as require_matplotlib
    from .outputs.report import Report as Report
    from .outputs.summary import append_summary as append_summary
    from .outputs.summary import check_summary_path as check_summary_path
    from .outputs.summary import error_summary_markdown as error_summary_markdown
    from .outputs.table import Sort as Sort
    from .outputs.table import table_rows as table_rows
    from .run import verify
    from .stores.cache import PairCache, ProjectionCache
    from .stores.cache import PairSummary as PairSummary
    from .stores.digests import DigestMemo

__all__ = ["PUBLIC_KEYS_ENV", "Device", "Options", "Precision", "StrPath", "build_demo", "printable"]

# The names this module gives from the modules that import torch: each is imported on first use,
# so that importing the API (and the command line's --help) does not pay for torch.
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
        return importlib.import_module(f"{__package__}.demo").build
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__package__}.{home}"), name)


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
    """``project`` with its options as one ``Options``."""
    options = options.checked()
    outcomes, paths = _project(_specs(adapter), options, events or _Silent(), single=not isinstance(adapter, list))
    for path, outcome in zip(paths, outcomes, strict=True):
        if isinstance(outcome, SafeLoraError):
            outcome.adapter = path
    result: Report | list[Report | SafeLoraError] = _one_or_all(adapter, outcomes)
    return result


def _one_or_all(adapter: StrPath | list[StrPath], outcomes: list[Any]) -> Any:
    """One adapter's outcome (raised when it is an error), or every adapter's for a list: a list
    exactly when given one (a path or pattern that names several adapters is refused before)."""
    if not isinstance(adapter, list):
        [only] = outcomes
        if isinstance(only, SafeLoraError):
            raise only
        return only
    return outcomes


def _specs(adapter: StrPath | list[StrPath]) -> list[StrPath]:
    return list(adapter) if isinstance(adapter, list) else [adapter]


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
    from . import sources
    from .adapters.specs import names_several
    from .run import batch, guards, pipeline
    from .stores.backups import BackupStore
    from .stores.cache import ProjectionCache

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
        adapters = stack.enter_context(_open_adapters(specs))
        if single and len(adapters) != 1:
            raise UsageError(f"{os.fspath(specs[0])!r} names {len(adapters)} adapters; pass a list to project several")
        outputs = batch.outputs(adapters, settings.output, names_several(specs))
        guards.refuse_unsafe_targets(adapters, settings, BackupStore())  # before a checkpoint is opened
        aligned = os.fspath(options.aligned) if options.aligned else _aligned_default(adapters, notes)
        base = os.fspath(options.base) if options.base else _base_from_preset(aligned, notes)
        _note_swapped(base, aligned, adapters)
        pair = ((base, options.base_revision), (aligned, options.aligned_revision))
        base_src, aligned_src = _open_pair(stack, pair, hub, events, notes, None)
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
            signer=signer,
            outputs=outputs,
        )
        return outcomes, [named.path for named in adapters]


def _load_signer(spec: StrPath | None) -> Signer | None:
    from .attest import keys

    return keys.load_signer_or_env(spec)


def _open_pair(
    stack: ExitStack,
    pair: tuple[tuple[StrPath, str | None], tuple[StrPath, str | None]],
    hub: sources.Hub,
    transfer: sources.Transfer,
    notes: list[str],
    memo: DigestMemo | None,
) -> tuple[sources.Source, sources.Source]:
    """Base and aligned opened (closed with ``stack``), each with the digests ``memo`` keeps for it."""
    from . import sources

    opened = []
    for (spec, revision), role in zip(pair, ("base", "aligned"), strict=True):
        src = sources.open_source(os.fspath(spec), revision, role=role, transfer=transfer, notes=notes, settings=[hub])
        stack.callback(src.close)
        src.memo = memo
        src.digests.update(memo.load(src.cache_identity()) if memo is not None else {})
        opened.append(src)
    return opened[0], opened[1]


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
    """Base and aligned that are one checkpoint (every V would be 0), when that costs no read: the same
    files by any path, one Hub commit. Other copies of one content: the run, once it has hashed them."""
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


def _note_swapped(base: str, aligned: str, adapters: list[adapter_io.Named]) -> None:
    """A note for each adapter whose base is the model it was trained on while aligned is not: the
    pair may be swapped. A swapped pair gives the same similarities (V only changes sign), so no
    table shows it, and provenance would record the wrong pair."""
    from . import adapters as adapter_io

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
    from . import sources

    if not spec.startswith(sources.HF_PREFIX) and os.path.lexists(spec):
        try:
            return os.path.exists(name) and os.path.samefile(spec, name)
        except OSError:
            return False
    ref, other = sources.parse_ref(spec.removeprefix(sources.HF_PREFIX)), sources.parse_ref(name)
    return ref is not None and other is not None and ref.repo_id.lower() == other.repo_id.lower()


def _aligned_default(adapters: list[adapter_io.Named], notes: list[str]) -> str:
    """No aligned model given: the first adapter's base_model_name_or_path, read through its open directory."""
    from . import adapters as adapter_io
    from . import sources

    name = adapter_io.read_config(_dir_of(adapters[0])).base_model_name_or_path
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


@overload
def check(
    adapter: StrPath,
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    token: str | None = None,
    original: StrPath | None = None,
    trust_stamp: bool = False,
    public_keys: Sequence[StrPath] | None = None,
    policy: StrPath | None = None,
) -> CheckResult: ...
@overload
def check(
    adapter: list[StrPath],
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    token: str | None = None,
    original: StrPath | None = None,
    trust_stamp: bool = False,
    public_keys: Sequence[StrPath] | None = None,
    policy: StrPath | None = None,
) -> list[CheckResult | SafeLoraError]: ...


def check(
    adapter: StrPath | list[StrPath],
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    token: str | None = None,
    original: StrPath | None = None,
    trust_stamp: bool = False,
    public_keys: Sequence[StrPath] | None = None,
    policy: StrPath | None = None,
) -> CheckResult | list[CheckResult | SafeLoraError]:
    """Whether an adapter is sanitized by safelora, unmodified since, verified, and (with ``base`` and
    ``aligned``) against that pair. Verified: by recomputation (``original``, the adapter before
    projection, projected again against ``base``/``aligned`` reproduces it), by safelora's local
    record (it wrote these bytes on this machine), or, with ``trust_stamp``, by an intact stamp alone
    (a guard against accidents only). With ``public_keys`` (PEM files; default: the paths
    ``SAFELORA_PUBLIC_KEYS`` lists), only by a signed attestation one of those keys verifies, and
    everything reported comes from it. ``policy`` (a YAML file) is what else the verified provenance
    must meet. ``CheckResult.status`` is ``sanitized``, ``never_sanitized``, ``modified``,
    ``other_pair``, ``unverified`` or ``outside_policy``; ``ok`` is True only for ``sanitized``, and
    ``verified_by`` says how. A list (patterns expanded) gives a list: each adapter's result, or the
    ``SafeLoraError`` raised for it."""
    from .attest import keys as signing
    from .attest import policy as policies

    if (base is None) != (aligned is None):
        raise UsageError("give both base and aligned, or neither")
    if original is not None and base is None:
        raise UsageError("verifying with the original needs the pair: give base and aligned too")
    keys = signing.load_publics(public_keys)
    if keys and (original is not None or trust_stamp):
        raise UsageError("public keys verify by signature: give them without original or trust_stamp")
    rules = policies.load(policy) if policy is not None else None

    def one(path: StrPath) -> CheckResult:
        return _check(path, base, aligned, token, original, trust_stamp, keys, rules)

    result: CheckResult | list[CheckResult | SafeLoraError] = _each(adapter, one)
    return result


def _check(
    adapter: StrPath,
    base: StrPath | None,
    aligned: StrPath | None,
    token: str | None,
    original: StrPath | None,
    trust_stamp: bool,
    keys: list[PublicKey],
    rules: Policy | None,
) -> CheckResult:
    from .run import audit, signed

    with ExitStack() as stack:
        pair, recompute = _verifiers(stack, base, aligned, original, token)
        [named] = stack.enter_context(_open_adapters([adapter]))
        if keys:
            result = signed.check_signed(_dir_of(named), keys, pair, rules)
            return replace(result, structured=audit.structured(result.provenance))
        result = audit.check(_dir_of(named), pair, trust_stamp=trust_stamp, recompute=recompute)
    return result if rules is None else signed.within_policy(result, rules)


def sign(
    adapter: StrPath,
    *,
    sign_key: StrPath | None = None,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    original: StrPath | None = None,
    token: str | None = None,
) -> Signed:
    """Sign an adapter safelora sanitized, once it is verified as ``check`` verifies it without a key:
    by safelora's local record, or by recomputation (``original`` with ``base`` and ``aligned``). The
    way to sign again after a key rotation. ``sign_key`` defaults to ``SAFELORA_SIGN_KEY``. Raises
    ``SignRefusedError`` when nothing verifies the adapter."""
    from .adapters import rewrite_lock
    from .attest import keys
    from .run import signed
    from .stores.backups import BackupStore

    if (base is None) != (aligned is None) or (original is None) != (base is None):
        raise UsageError("verifying by recomputation needs original, base and aligned together")
    signer = keys.load_signer_or_env(sign_key)
    if signer is None:
        raise UsageError(f"sign_key: none given, and {keys.SIGN_KEY_ENV} is not set", option="sign_key")
    with ExitStack() as stack:
        _, recompute = _verifiers(stack, base, aligned, original, token)
        [named] = stack.enter_context(_open_adapters([adapter]))
        directory = _dir_of(named)
        with rewrite_lock(directory):
            return signed.sign_verified(directory, signer, BackupStore(), recompute)


def _verifiers(
    stack: ExitStack, base: StrPath | None, aligned: StrPath | None, original: StrPath | None, token: str | None
) -> tuple[tuple[sources.Source, sources.Source] | None, verify.Recompute | None]:
    """The pair a check compares (opened with check's own digest memo), and the recomputation from
    ``original`` against it, each when given."""
    from . import sources
    from .run import verify
    from .stores.backups import BackupStore
    from .stores.cache import ProjectionCache

    if base is None or aligned is None:
        return None, None
    cache = ProjectionCache()  # only its memo of Hub refs: a branch names the commit it had
    hub = sources.Hub.from_env(token, cache.refs if cache.problem() is None else None)
    memo = BackupStore().digests()  # check's own digest memo, never the shared cache's
    pair = _open_pair(stack, ((base, None), (aligned, None)), hub, sources.QuietTransfer(), [], memo)
    if original is None:
        return pair, None
    [first] = stack.enter_context(_open_adapters([original]))
    return pair, verify.recomputer(_dir_of(first), *pair)


def _dir_of(named: adapter_io.Named) -> safefs.Directory:
    """The adapter's opened location, or the error that kept it from opening."""
    if named.dir is None:
        raise named.error or SafeLoraError(f"{named.path}: cannot be read")
    return named.dir


@overload
def inspect(adapter: StrPath) -> Inspection: ...
@overload
def inspect(adapter: list[StrPath]) -> list[Inspection | SafeLoraError]: ...


def inspect(adapter: StrPath | list[StrPath]) -> Inspection | list[Inspection | SafeLoraError]:
    """What an adapter is (modules, ranks, dtypes, size, targets, DoRA…), its provenance, and whether
    the original of a projected adapter is kept in the backup store. A list gives a list, as ``check``."""
    result: Inspection | list[Inspection | SafeLoraError] = _each(adapter, _inspect)
    return result


def _inspect(adapter: StrPath) -> Inspection:
    from .run import audit
    from .stores.backups import BackupStore

    with _open_adapters([adapter]) as [named]:
        return audit.inspect(_dir_of(named), BackupStore())


@overload
def restore(adapter: StrPath, *, force: bool = False) -> Restored: ...
@overload
def restore(adapter: list[StrPath], *, force: bool = False) -> list[Restored | SafeLoraError]: ...


def restore(adapter: StrPath | list[StrPath], *, force: bool = False) -> Restored | list[Restored | SafeLoraError]:
    """Put back the original ``adapter_model.safetensors`` an in-place ``project`` kept, byte for byte.

    Refused (``BackupError``) when no original is kept and, unless ``force``, when the adapter was
    changed since safelora wrote it; an adapter that already is the original kept from its directory
    gives ``Restored.unchanged`` (nothing written). A list returns one entry per adapter, as ``project`` does.
    """
    from .run import restore as restoring
    from .stores import backups

    store = backups.BackupStore()
    outcomes: list[Restored | SafeLoraError] = []
    with _open_adapters(_specs(adapter)) as opened:
        _one_named(adapter, opened)
        for named in opened:
            try:
                outcomes.append(restoring.restore(_dir_of(named), store, force=force))
            except SafeLoraError as e:
                e.adapter = named.path
                outcomes.append(e)
    result: Restored | list[Restored | SafeLoraError] = _one_or_all(adapter, outcomes)
    return result


def _one_named(adapter: StrPath | list[StrPath], opened: list[adapter_io.Named]) -> None:
    """A path or pattern given alone must name one adapter: a list is what names several."""
    if not isinstance(adapter, list) and len(opened) != 1:
        raise UsageError(f"{os.fspath(adapter)!r} names {len(opened)} adapters; pass a list to name several")


def _each(adapter: StrPath | list[StrPath], one: Callable[[StrPath], Any]) -> Any:
    """``one`` for the adapter, or for each adapter a list names (patterns expanded), its result or its
    ``SafeLoraError`` in the list (a usage error still raises)."""
    if not isinstance(adapter, list):
        if len(paths := adapter_paths([adapter])) != 1:
            raise UsageError(f"{os.fspath(adapter)!r} names {len(paths)} adapters; pass a list to name several")
        return one(adapter)
    outcomes: list[Any] = []
    for path in adapter_paths(adapter):
        try:
            outcomes.append(one(path))
        except UsageError:
            raise
        except SafeLoraError as e:
            e.adapter = path
            outcomes.append(e)
    return outcomes


def adapter_paths(specs: Sequence[StrPath]) -> list[Path]:
    """The adapter directories ``specs`` name (globs expanded), without opening them."""
    from . import adapters as adapter_io

    return [path for path, _ in adapter_io.expand(specs)]


@contextmanager
def _open_adapters(specs: Sequence[StrPath]) -> Iterator[list[adapter_io.Named]]:
    """Every adapter expanded and opened once (``adapters.open_all``), where a Hub repo id given as an
    adapter that is no local path is named as such."""
    from . import adapters as adapter_io
    from . import sources

    with adapter_io.open_all(specs) as opened:
        for named in opened:
            ref = sources.parse_ref(str(named.path))
            if named.error is not None and ref is not None and ref.revision is None and not os.path.lexists(named.path):
                named.error = AdapterNotLocalError(
                    f"{named.path}: no such directory, and adapters are local directories", str(named.path)
                )
        yield opened


def weights_file(adapter: Path) -> Path:
    """The file ``project`` and ``restore`` rewrite for an adapter (by name alone: this never opens
    it): a single-file adapter (GGUF) is that file; in a directory, PEFT's weights, else MLX-LM's when
    only that is there."""
    from .adapters.mlx_config import WEIGHTS_FILE
    from .adapters.peft_config import ADAPTER_FILE

    if os.path.isfile(adapter):
        return adapter
    peft, mlx = adapter / ADAPTER_FILE, adapter / WEIGHTS_FILE
    return mlx if not os.path.lexists(peft) and os.path.lexists(mlx) else peft


def evaluate(
    model: StrPath,
    adapters: Sequence[StrPath] = (),
    *,
    prompts: StrPath,
    benign: StrPath | None = None,
    utility: StrPath | None = None,
    refusal_markers: StrPath | None = None,
    judge: str | None = None,
    system_prompt: str | None = None,
    prompt_column: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    original: StrPath | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Measure refusal, over-refusal and utility of ``model`` (an aligned chat model: a directory or a
    Hub repo, loaded once with transformers) alone, with each PEFT adapter of ``adapters``, and with
    each adapter's original: the one the backup store keeps for an adapter safelora projected, or
    ``original`` (a directory; one adapter only).

    ``prompts`` (harmful) and ``benign`` are prompt files (one prompt a line, ``.jsonl`` or ``.csv``
    with ``prompt_column`` or the first of prompt/goal/Goal/Behavior); ``utility`` a text whose
    perplexity is measured. Answers are greedy, ``max_new_tokens`` long at most, in batches of
    ``batch_size`` (halved on a CUDA out-of-memory); ``dtype`` is auto (float32 on CPU, bfloat16 on
    CUDA), float32, bfloat16 or float16; ``device`` auto, cpu or cuda. A response is a refusal when it
    holds one of the refusal markers (``refusal_markers``, one a line, else safelora's default list);
    ``judge`` (a Llama Guard-style classifier) replaces them on the harmful set.

    Returns an ``EvalResult``: per variant the harmful compliance, the benign over-refusal and the
    perplexity, the exact McNemar p-values of each adapter against its original and the model alone
    (Holm-adjusted), and every response (``records``). Writes nothing. ``progress(label, total)``,
    when given, returns the function each finished prompt is counted with. Needs ``safelora[hf]``.
    """
    from .evaluation import generate
    from .evaluation.run import evaluate as run_evaluation

    return run_evaluation(
        os.fspath(model),
        [os.fspath(a) for a in adapters],
        prompts=Path(prompts),
        benign=None if benign is None else Path(benign),
        utility=None if utility is None else Path(utility),
        refusal_markers=None if refusal_markers is None else Path(refusal_markers),
        judge=judge,
        system_prompt=system_prompt,
        prompt_column=prompt_column,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        original=None if original is None else os.fspath(original),
        progress=progress or generate.no_progress,
    )


def eval_markdown(result: EvalResult) -> str:
    """An evaluation as a Markdown section (for a step summary): settings, rates, paired tests."""
    from .outputs.evaluation import markdown

    return markdown(result)


def write_eval_card(result: EvalResult) -> Path:
    """Write the Evaluation section into the model card (README.md) of the one adapter ``result``
    evaluated, marked with the adapter's stamp digest so that a later rewrite of the adapter removes
    it; returns the card's path. Refused when the adapter changed since it was evaluated."""
    from .evaluation.written import write_card

    return write_card(result)


def write_eval_records(result: EvalResult, path: StrPath) -> None:
    """Write ``result``'s records to ``path``: one JSON line per variant × prompt (``variant``, ``set``,
    ``prompt``, ``response``, ``refused``, and the judge's ``verdict``), so anyone can judge them again."""
    from .evaluation.written import write_records

    write_records(result, Path(path))
