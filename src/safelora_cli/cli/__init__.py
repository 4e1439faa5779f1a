"""The ``safelora`` command line: parse, call the Python API (``api``), render through one sink. No math here."""

from __future__ import annotations

import importlib
import inspect
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperOption

from .. import config
from .. import errors as e_
from .._version import __version__
from ..errors import SafeLoraError, UsageError
from ..outputs.text import console as _console
from ..outputs.text import discard, line


class _Deferred:
    """A module, imported when one of its attributes is first used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


if TYPE_CHECKING:
    from .. import adapters as adapter_io
    from .. import api
    from .. import demo as demo_data
    from ..adapters import peft_config
    from ..api import Device, Precision
    from ..outputs import decision
    from ..outputs import plot as plotting
    from ..outputs.decision import Sort
    from ..run.audit import CheckResult
    from ..run.pipeline import Report
    from ..stores import backups
    from ..stores import cache as projection_cache
    from . import render as rendering
else:
    Device = Precision = Sort = str
    # torch takes ~2 s to import: the modules that need it load when a command first uses them, so
    # --help, --version and shell completion answer at once.
    adapter_io, api, backups, decision, demo_data, peft_config, plotting, projection_cache, rendering = (
        _Deferred(f"safelora_cli.{name}")
        for name in (
            "adapters",
            "api",
            "stores.backups",
            "outputs.decision",
            "demo",
            "adapters.peft_config",
            "outputs.plot",
            "stores.cache",
            "cli.render",
        )
    )


T = TypeVar("T")


class _Command(TyperCommand):
    """A command whose --help reads well: positional arguments show their metavar, not Typer's
    ``<list[str]>``, -h/--help shows no ``<bool>``, the docstring's paragraphs are re-flowed to
    the terminal's width instead of keeping the source's line breaks, and brackets in the text
    (``org/name[@revision]``, ``safelora[plot]``) stay text instead of being read as Rich markup."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument) and param.metavar:
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
            if getattr(param, "help", None):
                param.help = escape(param.help)  # type: ignore[attr-defined]
        if self.help:
            paragraphs = inspect.cleandoc(self.help).split("\n\n")
            self.help = escape("\n\n".join(" ".join(p.split("\n")) for p in paragraphs))
        if self.epilog:
            self.epilog = escape(self.epilog)

    def get_help_option(self, ctx: Any) -> TyperOption | None:
        option = super().get_help_option(ctx)
        if option is not None:
            option.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        return option


app = typer.Typer(
    help="Safe LoRA for PEFT adapters: project each LoRA update onto the alignment subspace of "
    "W_aligned − W_base when it looks unlike it. Exit codes: 0 done, 1 input or I/O error, 2 usage, "
    "3 (check only) not sanitized against the pair or modified since.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# What to do about an error, in flags: the core's messages state the problem, the command line
# adds how to get past it (the most specific type wins).
_HINTS: dict[type[SafeLoraError], str] = {
    e_.InPlaceError: "; pass --output DIR for a patched copy",
    e_.OutputError: "; choose another --output",
    e_.OutputNotEmptyError: "; choose another --output, or pass --force to reuse it",
    e_.AlreadyProjectedError: ". Start from the original adapter, or pass --force",
    e_.ChangedSinceError: "; pass --force to do so anyway",
    e_.DoraError: ". Pass --allow-dora to project lora_B and leave the magnitudes unchanged",
    e_.PrecisionError: "; use --precision float64",
    e_.DeviceError: "; use --device cpu or auto",
    e_.BackupNotKeptError: ", or pass --no-backup",
    e_.HubAccessError: " (--token or HF_TOKEN)",
    e_.MissingBaseError: "; pass --base (or --preset)",
    e_.MissingAlignedError: "; pass --aligned (or --preset)",
}


def describe(error: SafeLoraError) -> str:
    """The error's one line as the command line prints it: the problem, then the flag that helps."""
    hint = next((_HINTS[cls] for cls in type(error).__mro__ if cls in _HINTS), "")
    return f"{error}{hint}"


def _flag(names: str, help: str, *short: str) -> Any:
    """A boolean flag with its --no- form: no metavar, and the default shown as the flag that is on."""
    return typer.Option(names, *short, help=help, metavar="")


BaseOpt = Annotated[
    str | None,
    typer.Option(
        metavar="REF",
        help="The unaligned base model: a local directory (safetensors, single or sharded, or .bin), or a Hub "
        "repo org/name[@revision]. An existing local path wins; hf://org/name always means the Hub. "
        "Default: the preset's base when --aligned is a preset's aligned model.",
        show_default=False,
    ),
]
AlignedOpt = Annotated[
    str | None,
    typer.Option(
        metavar="REF",
        help="The aligned (chat) model, as --base. Default: adapter_config.json's base_model_name_or_path when "
        "it is a local directory or a Hub repo id.",
        show_default=False,
    ),
]
BaseRevisionOpt = Annotated[
    str | None,
    typer.Option(metavar="REV", help="Branch, tag or commit sha of a Hub --base (default: main).", show_default=False),
]
AlignedRevisionOpt = Annotated[
    str | None,
    typer.Option(
        metavar="REV", help="Branch, tag or commit sha of a Hub --aligned (default: main).", show_default=False
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        metavar="TOKEN",
        help="Hugging Face token for gated or private repos. Default: HF_TOKEN, then the stored login. "
        "Never printed or stored.",
        show_default=False,
    ),
]
ConnectionsOpt = Annotated[
    int,
    typer.Option(
        min=1,
        max=64,
        metavar="N",
        help="HTTP connections for Hub downloads, shared by --base and --aligned: the byte ranges a run "
        "needs are fetched over this many at once.",
    ),
]
NoCacheOpt = Annotated[
    bool, _flag("--no-cache/--cache", "Neither read nor write the projection cache (SAFELORA_CACHE).")
]
AdapterArgs = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="ADAPTER",
        help="PEFT LoRA adapter directories (or quoted globs such as 'adapters/*'), as --adapter.",
        show_default=False,
    ),
]
AdaptersOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        metavar="DIR",
        help="A PEFT LoRA adapter directory. Repeat it, or give a quoted glob ('adapters/*'), for several "
        "against one pair: each projection operator is read or computed once for all. A path that exists "
        "is taken as it is, never as a glob.",
        show_default=False,
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        min=-1.0,
        max=1.0,
        metavar="τ",
        help="Project every module whose similarity (rounded to 5 decimals) is ≤ τ. [default: 0.5]",
    ),
]
NumLayersOpt = Annotated[
    int | None,
    typer.Option(
        min=1, metavar="K", help="Number mode: project the K modules with the lowest similarities (ties included)."
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="Write a complete patched adapter directory here and leave the source untouched.",
        show_default=False,
    ),
]
DryRunOpt = Annotated[bool, _flag("--dry-run/--no-dry-run", "Compute and report; write nothing.")]
JsonOpt = Annotated[
    bool, _flag("--json/--no-json", "One JSON document on stdout (an array for several); the rest goes to stderr.")
]
QuietOpt = Annotated[bool, _flag("--quiet/--no-quiet", "Print nothing but errors (and the JSON with --json).", "-q")]
AllowDoraOpt = Annotated[
    bool,
    _flag("--allow-dora/--no-allow-dora", "Project lora_B of a DoRA adapter; magnitudes are left unchanged."),
]
NoBackupOpt = Annotated[
    bool,
    _flag(
        "--no-backup/--backup",
        "Keep no copy of the original before an in-place rewrite (SAFELORA_BACKUPS): restore then cannot undo the run.",
    ),
]
ForceOpt = Annotated[
    bool,
    _flag(
        "--force/--no-force",
        "Project an adapter changed since safelora projected it, or one whose original is not kept (again, on "
        "top of the projection); reuse a non-empty --output.",
    ),
]
ModelCardOpt = Annotated[
    bool,
    _flag(
        "--model-card/--no-model-card",
        "Write a Safe LoRA section (version, pair, settings, projected modules) into the written adapter's "
        "README.md, between markers (a rerun replaces it), and tag the card safelora.",
    ),
]
SummaryOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="Append a Markdown section per adapter to FILE: the pair, the settings, the counts, a Mermaid chart "
        "of the similarities and the projected modules. Default: $GITHUB_STEP_SUMMARY when set (GitHub "
        "Actions); --quiet does not stop it.",
        show_default=False,
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="Draw each module's similarity, by layer, with τ, to FILE.png or FILE.svg (needs safelora[plot]). "
        "Several adapters: FILE-1.png, FILE-2.png, … in the order they are reported.",
        show_default=False,
    ),
]
SORTS: dict[str, Sort] = {"layer": "layer", "similarity": "similarity"}
PRECISIONS: dict[str, Precision] = {"float32": "float32", "float64": "float64"}
DEVICES: dict[str, Device] = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}


def _one_of(choices: Mapping[str, str]) -> Callable[[str], str]:
    """An option's check of its value against ``choices``: part of parsing the option, so that the
    same value from a --config file is refused with the file and line."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"expected one of {', '.join(choices)}")
        return value

    return check


def _complete(choices: Mapping[str, str]) -> Callable[[str], list[str]]:
    return lambda incomplete: [c for c in choices if c.startswith(incomplete)]


SortOpt = Annotated[
    str,
    typer.Option(
        metavar="KEY",
        callback=_one_of(SORTS),
        autocompletion=_complete(SORTS),
        help="Order of the table's rows: layer, or similarity (lowest first).",
    ),
]
ProjectedOnlyOpt = Annotated[
    bool, _flag("--projected-only/--all-modules", "List only the projected modules in the table.")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.", metavar="")]


def _complete_preset(incomplete: str) -> list[str]:
    return [name for name in config.preset_names() if name.startswith(incomplete)]


PrecisionOpt = Annotated[
    str,
    typer.Option(
        metavar="float32|float64",
        help="Compute precision.",
        callback=_one_of(PRECISIONS),
        autocompletion=_complete(PRECISIONS),
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        metavar="auto|cpu|cuda",
        help="Where the math runs (auto: CUDA when present).",
        callback=_one_of(DEVICES),
        autocompletion=_complete(DEVICES),
    ),
]


def _err_console() -> Console:
    return _console(stderr=True)


def _print_error(error: SafeLoraError | str) -> None:
    message = describe(error) if isinstance(error, SafeLoraError) else error
    _err_console().print(line(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


@contextmanager
def _errors(sink: rendering.Sink | None = None, adapters: Callable[[], list[Path]] = list) -> Iterator[None]:
    """The one place errors become a one-line message and an exit code.

    With ``sink``, a failure also gives the JSON ``{"adapter", "error"}`` object for each of
    ``adapters()`` (a usage error, exit 2, gives none). An OS error that escaped the path-specific
    handling, or any other unexpected exception, is still one line and exit 1 (SAFELORA_DEBUG=1 shows
    the traceback): hostile input must never end in a traceback.
    """
    try:
        yield
    except SafeLoraError as e:
        _debug(e)
        if sink is not None and e.exit_code == 1:
            targets: list[Path | None] = [*adapters()] or [None]
            for path in targets:
                sink.fail(path, describe(e), echo=False)
            sink.emit(batch=len(adapters()) > 1)
        _print_error(e)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        _debug(e)
        where = e.filename if e.filename is not None else "I/O"
        _print_error(f"{where}: {e.strerror or e.__class__.__name__}")
        raise typer.Exit(1) from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("typer", "click"):
            raise  # usage errors and exits: Typer prints them and exits 2 (or as asked)
        _debug(e)
        _print_error(f"unexpected {e.__class__.__name__}: {str(e)[:200]}; set SAFELORA_DEBUG=1 for the traceback")
        raise typer.Exit(1) from None


def _debug(error: BaseException) -> None:
    """SAFELORA_DEBUG=1: the traceback of an error, raised or returned for one adapter of a batch."""
    if os.environ.get("SAFELORA_DEBUG"):
        traceback.print_exception(error)


@contextmanager
def _interruptible(paths: Callable[[], list[Path]], in_place: bool) -> Iterator[None]:
    """Ctrl-C: exit 130, with one line that says which adapters are unchanged (every rewrite is atomic)."""
    before = {p: _weights_identity(p) for p in paths()} if in_place else {}
    try:
        yield
    except KeyboardInterrupt:
        unchanged = [p for p, st in before.items() if st is not None and _weights_identity(p) == st]
        changed = [p for p in before if p not in unchanged]
        told = "interrupted"
        if unchanged:
            told += f"; unchanged: {', '.join(map(str, unchanged))}"
        if changed:
            told += f"; written before the interrupt: {', '.join(map(str, changed))}"
        with suppress(Exception):
            _err_console().print(line(("interrupted", "bold red"), told.removeprefix("interrupted")), highlight=False)
        raise typer.Exit(130) from None


def _weights_identity(adapter: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.lstat(adapter / peft_config.ADAPTER_FILE)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _expanded(specs: list[str]) -> Callable[[], list[Path]]:
    """The adapter directories ``specs`` name, for messages about them (never raises): expanded
    once, when first asked for."""

    @cache
    def paths() -> list[Path]:
        try:
            return [path for path, _ in adapter_io.expand(specs)]
        except SafeLoraError:
            return [Path(s) for s in specs]

    return paths


_MODE_KEYS = ("threshold", "num_layers")


def _merge(lower: Mapping[str, Any], higher: Mapping[str, Any]) -> dict[str, Any]:
    """Option values where ``higher`` wins; τ and k are one choice, so either one replaces both."""
    merged = {**lower, **higher}
    if any(k in higher for k in _MODE_KEYS):
        for k in _MODE_KEYS:
            if k not in higher:
                merged.pop(k, None)
    return merged


def _option_keys(ctx: typer.Context) -> dict[str, str]:
    """YAML key -> parameter name, for every option of the command (``json`` -> ``as_json``)."""
    keys = {}
    for param in ctx.command.params:
        if param.name in ("config_file", "preset", "adapters") or param.name is None:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = param.name
    return keys


def _as_defaults(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    keys = _option_keys(ctx)
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    # ``adapter: ./a`` in YAML means the one-element list a repeatable option expects.
    return {keys[k]: [v] if keys[k] in repeatable and not isinstance(v, list) else v for k, v in options.items()}


def _value_check(ctx: typer.Context) -> config.ValueCheck:
    """A config value judged by its option's own parsing: why it is refused, or None."""
    keys = _option_keys(ctx)
    params = {p.name: p for p in ctx.command.params}

    def check(key: str, value: Any) -> str | None:
        param = params[keys[key]]
        multiple = getattr(param, "multiple", False) and not isinstance(value, list)
        try:
            param.process_value(ctx, [value] if multiple else value)
        except typer.BadParameter as e:
            return str(e.message)
        return None

    return check


def _config_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    if value is not None:
        with _errors():
            options = config.load_file(value, _option_keys(ctx), _value_check(ctx))
        ctx.default_map = _merge(ctx.default_map or {}, _as_defaults(ctx, options))
    return value


def _preset_callback(ctx: typer.Context, value: str | None) -> str | None:
    if value is not None:
        with _errors():
            chosen = config.preset(value)
            options = config.checked_options(chosen.options, f"preset {value}", _option_keys(ctx))
        # A --config file given beside the preset wins over it, whichever comes first on the line.
        ctx.default_map = _merge(_as_defaults(ctx, options), ctx.default_map or {})
    return value


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=_config_callback,
        metavar="FILE",
        help="YAML file with any of these options (keys like num_layers or num-layers); flags given here win.",
        show_default=False,
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        is_eager=True,
        callback=_preset_callback,
        metavar="NAME",
        autocompletion=_complete_preset,
        help="A shipped pair: llama-2-7b, llama-2-13b, llama-3-8b, llama-3.1-8b, mistral-7b, qwen2.5-7b, gemma-2-9b.",
        show_default=False,
    ),
]


def _adapters(positional: list[str] | None, option: list[str] | None) -> list[str]:
    """Adapters given as arguments and with --adapter, in that order; at least one."""
    specs = [*(positional or []), *(option or [])]
    if not specs:
        raise typer.BadParameter("give an adapter directory (as an argument or with --adapter)", param_hint="ADAPTER")
    return specs


_PROJECT_EXAMPLES = """Examples:

  safelora project ./my-adapter --base ./llama-base --aligned ./llama-chat

  safelora project ./my-adapter --preset llama-2-7b --dry-run

  safelora project ./my-adapter --preset llama-2-7b --num-layers 7 --output ./sanitized

  safelora project 'adapters/*' --base meta-llama/Llama-2-7b-hf --aligned meta-llama/Llama-2-7b-chat-hf --json
"""


@app.command(cls=_Command, epilog=_PROJECT_EXAMPLES)
def project(
    ctx: typer.Context,
    adapters: AdapterArgs = None,
    adapter: AdaptersOpt = None,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    threshold: ThresholdOpt = None,
    num_layers: NumLayersOpt = None,
    output: OutputOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    precision: PrecisionOpt = "float32",
    device: DeviceOpt = "auto",
    allow_dora: AllowDoraOpt = False,
    force: ForceOpt = False,
    no_backup: NoBackupOpt = False,
    quiet: QuietOpt = False,
    config_file: ConfigOpt = None,
    preset: PresetOpt = None,
    base_revision: BaseRevisionOpt = None,
    aligned_revision: AlignedRevisionOpt = None,
    token: TokenOpt = None,
    no_cache: NoCacheOpt = False,
    connections: ConnectionsOpt = 8,
    model_card: ModelCardOpt = False,
    summary: SummaryOpt = None,
    plot: PlotOpt = None,
    sort: SortOpt = "layer",
    projected_only: ProjectedOnlyOpt = False,
) -> None:
    """Project a LoRA adapter (Safe LoRA): for each module, B ← C·B when its similarity is low.

    Rewrites adapter_model.safetensors in place (atomically, after keeping the original in the
    backup store) unless --output or --dry-run is given. Only the weights of the adapter's
    targeted modules are read, one tensor at a time; from a Hub repo, only their byte ranges are
    downloaded. Each module's projection operator is cached per (base, aligned) pair, so later runs
    on the same pair read nothing for it (--no-cache: off).
    """
    specs = _adapters(adapters, adapter)
    if threshold is not None and num_layers is not None:
        # A flag on the command line beats the other one coming from --config/--preset.
        if _from_command_line(ctx, "num_layers") and not _from_command_line(ctx, "threshold"):
            threshold = None
        elif _from_command_line(ctx, "threshold") and not _from_command_line(ctx, "num_layers"):
            num_layers = None
        else:
            raise typer.BadParameter("give --threshold or --num-layers, not both", param_hint="--num-layers")
    order = SORTS[sort]
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    paths = _expanded(specs)
    in_place = not dry_run and output is None
    summary_file = _summary_file(summary)
    with _errors():
        _check_extras(summary, plot)
    with (
        _errors(sink, paths),
        _interruptible(paths, in_place),
        rendering.RunDisplay(sink.console, enabled=not quiet) as display,
        _summarized_failure(summary_file, lambda: [*paths()] or specs),
    ):
        outcomes = api.project(
            list[str | os.PathLike[str]](specs),
            base=base,
            aligned=aligned,
            base_revision=base_revision,
            aligned_revision=aligned_revision,
            threshold=threshold,
            num_layers=num_layers,
            output=output,
            dry_run=dry_run,
            precision=PRECISIONS[precision],
            device=DEVICES[device],
            cache=not no_cache,
            backup=not no_backup,
            force=force,
            allow_dora=allow_dora,
            token=token,
            connections=connections,
            model_card=model_card,
            events=display,
        )
    failed = sum(isinstance(o, SafeLoraError) for o in outcomes)

    def deliver() -> None:
        render = partial(rendering.render, sort=order, projected_only=projected_only)
        _deliver(sink, outcomes, lambda report: report.to_json(), render)
        if len(outcomes) > 1:
            sink.show(partial(rendering.render_batch, outcomes))
        sink.emit(batch=len(outcomes) > 1)

    _after_write(deliver)
    _write_extras(outcomes, summary_file, plot, sink)
    if failed:
        raise typer.Exit(1)


def _summary_file(summary: Path | None) -> Path | None:
    """Where the step summary goes: --summary, else $GITHUB_STEP_SUMMARY (GitHub Actions), else nowhere."""
    if summary is not None:
        return summary
    env = os.environ.get("GITHUB_STEP_SUMMARY")
    return Path(env) if env else None


def _check_extras(summary: Path | None, plot: Path | None) -> None:
    """Before anything is read or written: a --summary that is not a regular file, a --plot that is
    neither .png nor .svg, or a --plot without matplotlib stop the run (exit 2)."""
    if summary is not None:
        try:
            decision.check_summary_path(summary)
        except SafeLoraError as e:
            raise UsageError(f"--summary {e}") from None
    if plot is not None:
        plotting.check_plot_path(plot)
        plotting.require_matplotlib()


@contextmanager
def _summarized_failure(summary: Path | None, adapters: Callable[[], list[Path] | list[str]]) -> Iterator[None]:
    """A run that fails as a whole still leaves its error in the step summary, once per adapter."""
    try:
        yield
    except SafeLoraError as e:
        if summary is not None:
            sections = "".join(decision.error_summary_markdown(a, describe(e)) for a in adapters())
            _best_effort("the step summary", lambda: decision.append_summary(summary, sections))
        raise


def _write_extras(
    outcomes: list[Report | SafeLoraError], summary: Path | None, plot: Path | None, sink: rendering.Sink
) -> None:
    """The step summary and the plots, after the adapters are written: each failure is a warning."""
    if summary is not None:
        sections = "".join(
            decision.error_summary_markdown(o.adapter or "safelora project", describe(o))
            if isinstance(o, SafeLoraError)
            else o.summary_markdown()
            for o in outcomes
        )
        if _best_effort("the step summary", lambda: decision.append_summary(summary, sections)):
            sink.show(partial(_said, f"summary appended to {summary}"))
    if plot is not None:
        for i, outcome in enumerate(outcomes, 1):
            if isinstance(outcome, SafeLoraError):
                continue
            target = plot if len(outcomes) == 1 else plot.with_name(f"{plot.stem}-{i}{plot.suffix}")
            if _best_effort(f"the plot {target}", partial(outcome.plot, target)):
                sink.show(partial(_said, f"plot written to {target}"))


def _said(message: str, console: Console) -> None:
    console.print(line((message, "dim")), highlight=False)


def _best_effort(what: str, write: Callable[[], None]) -> bool:
    """Write one extra output; a failure is a warning on stderr (never the run's exit code)."""
    try:
        write()
        return True
    except Exception as e:
        _debug(e)
        message = describe(e) if isinstance(e, SafeLoraError) else f"{e.__class__.__name__}: {str(e)[:200]}"
        _err_console().print(
            line(("warning:", "yellow"), f" {what} was not written: ", message), highlight=False, soft_wrap=True
        )
        return False


def _deliver(
    sink: rendering.Sink,
    outcomes: Sequence[T | SafeLoraError],
    to_json: Callable[[T], dict[str, Any]],
    render: Callable[[T, Console], None],
) -> None:
    """Each adapter's outcome into the sink: its document and how people see it, or its error."""
    for outcome in outcomes:
        if isinstance(outcome, SafeLoraError):
            _debug(outcome)
            sink.fail(outcome.adapter, describe(outcome))
        else:
            sink.add(to_json(outcome), partial(render, outcome))


def _after_write(deliver: Callable[[], None]) -> None:
    """Output after the adapters are written: a failure here is a warning, never the run's exit code."""
    try:
        deliver()
    except BrokenPipeError:
        # The reader went away (``| head``): say nothing more on stdout, and exit as the run ended.
        discard(sys.stdout)
    except Exception as e:
        with suppress(Exception):
            _err_console().print(
                line(
                    ("warning:", "yellow"),
                    f" printing the result failed ({e.__class__.__name__}: {str(e)[:200]}); "
                    "the adapters were processed as the exit code says",
                ),
                highlight=False,
                soft_wrap=True,
            )


_DEMO_EXAMPLES = """Examples:

  safelora demo

  safelora demo --keep demo
"""


@app.command(cls=_Command, epilog=_DEMO_EXAMPLES)
def demo(
    keep: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Build the example in this directory (new or empty) and keep it, to try the other commands on "
            "(default: a temp directory, removed afterwards).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a tiny base/aligned/adapter set (no downloads) and run `project --output` on it.

    With --keep DIR, DIR holds base/, aligned/, adapter/ (left as built) and sanitized/ (the
    projected copy), and the next commands to try are printed.
    """
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    with _errors(sink), tempfile.TemporaryDirectory(prefix="safelora-demo-") as tmp:
        if keep is not None:
            _require_empty(keep)
        root = keep or Path(tmp)
        base, aligned, adapter = demo_data.build(root)
        out = root / "sanitized"
        sink.show(
            lambda c: c.print(
                line((f"tiny example in {root}: base (sharded), aligned, adapter (q_proj/v_proj, r=8)", "dim"))
            )
        )
        program = _program()
        shown = " ".join(shlex.quote(str(p)) for p in (adapter, "--base", base, "--aligned", aligned, "--output", out))
        sink.show(lambda c: c.print(line((f"$ {program} project {shown}", "dim"))))
        report = api.project(adapter, base=str(base), aligned=str(aligned), output=out)
        sink.add(report.to_json(), lambda console: rendering.render(report, console))
        sink.emit(batch=False)
        if keep is not None:
            sink.show(lambda c: rendering.render_next_steps(root, program, c))


def _program() -> str:
    """How to run this safelora again from here: ``safelora`` when that is what PATH finds, else the
    path it was started by (``.venv/bin/safelora`` after ``make demo``)."""
    invoked = sys.argv[0]
    if Path(invoked).name != "safelora":
        return "safelora"  # python -m safelora_cli, or an embedding: the installed name
    found = shutil.which("safelora")
    if found is not None and os.path.realpath(found) == os.path.realpath(invoked):
        return "safelora"
    return shlex.quote(invoked)


def _require_empty(path: Path) -> None:
    """``demo --keep``: a new directory, or an empty one; never one that holds anything."""
    try:
        if not os.path.lexists(path):
            return
        if path.is_symlink() or not path.is_dir():
            raise SafeLoraError(f"{path}: exists and is not a directory; pass a new or empty directory to --keep")
        if any(path.iterdir()):
            raise SafeLoraError(f"{path}: exists and is not empty; pass a new or empty directory to --keep")
    except OSError as e:
        raise SafeLoraError(f"{path}: {e.strerror}") from None


_CHECK_EXAMPLES = """Examples:

  safelora check ./my-adapter

  safelora check 'adapters/*' --base meta-llama/Llama-2-7b-hf --aligned meta-llama/Llama-2-7b-chat-hf --json
"""


@app.command(cls=_Command, epilog=_CHECK_EXAMPLES)
def check(
    adapters: AdapterArgs = None,
    adapter: AdaptersOpt = None,
    base: Annotated[
        str | None,
        typer.Option(
            metavar="REF", help="Also require this base model (a directory or a Hub repo).", show_default=False
        ),
    ] = None,
    aligned: Annotated[
        str | None,
        typer.Option(
            metavar="REF", help="Also require this aligned model (a directory or a Hub repo).", show_default=False
        ),
    ] = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Gate: is each adapter sanitized by safelora, unmodified since, and (optionally) against this pair?

    Every adapter given is judged. Exit codes: 0 all sanitized; 3 any never sanitized, sanitized
    against another pair, or modified since (and none errored); 1 any error (unreadable adapter or
    checkpoint); 2 usage.
    """
    specs = _adapters(adapters, adapter)
    if (base is None) != (aligned is None):
        raise typer.BadParameter("give both --base and --aligned, or neither", param_hint="--base/--aligned")
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    paths = _expanded(specs)
    results: list[CheckResult | SafeLoraError] = []
    with _errors(sink, paths), _interruptible(paths, in_place=False):
        for path in paths():
            try:
                results.append(api.check(path, base=base, aligned=aligned, token=token))
            except UsageError:
                raise
            except SafeLoraError as e:
                e.adapter = path
                results.append(e)
    _deliver(sink, results, rendering.check_to_json, rendering.render_check)
    sink.emit(batch=len(results) > 1)
    if sink.failed:
        raise typer.Exit(1)
    if not all(not isinstance(r, SafeLoraError) and r.ok for r in results):
        raise typer.Exit(3)


_INSPECT_EXAMPLES = """Examples:

  safelora inspect ./my-adapter

  safelora inspect ./my-adapter --json
"""


@app.command("inspect", cls=_Command, epilog=_INSPECT_EXAMPLES)
def inspect_(
    adapters: AdapterArgs = None,
    adapter: AdaptersOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what an adapter is (modules, ranks, dtypes, size, targets, DoRA…), its provenance, and
    whether the original of a projected adapter is kept (restore can bring it back)."""
    specs = _adapters(adapters, adapter)
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    paths = _expanded(specs)
    with _errors(sink, paths):
        for path in paths():
            try:
                info = api.inspect(path)
            except UsageError:
                raise
            except SafeLoraError as e:
                sink.fail(path, describe(e))
                continue
            sink.add(rendering.inspection_to_json(info), partial(rendering.render_inspection, info))
    sink.emit(batch=len(paths()) > 1)
    if sink.failed:
        raise typer.Exit(1)


_RESTORE_EXAMPLES = """Examples:

  safelora restore ./my-adapter

  safelora restore 'adapters/*' --json
"""


@app.command(cls=_Command, epilog=_RESTORE_EXAMPLES)
def restore(
    adapters: AdapterArgs = None,
    adapter: AdaptersOpt = None,
    force: Annotated[
        bool, _flag("--force/--no-force", "Restore an adapter changed since safelora projected it (losing the change).")
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Put back the original adapter_model.safetensors that an in-place project kept, byte for byte.

    The original comes from the backup store (SAFELORA_BACKUPS), found by the sha256 in the
    adapter's provenance; the rewrite is atomic and locked, as project's. Refused for an adapter
    changed since safelora wrote it (its edits would be lost), unless --force.
    """
    specs = _adapters(adapters, adapter)
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    paths = _expanded(specs)
    with _errors(sink, paths), _interruptible(paths, in_place=True):
        outcomes = api.restore(list(specs), force=force)
    failed = sum(isinstance(o, SafeLoraError) for o in outcomes)

    def deliver() -> None:
        _deliver(sink, outcomes, rendering.restored_to_json, rendering.render_restored)
        sink.emit(batch=len(outcomes) > 1)

    _after_write(deliver)
    if failed:
        raise typer.Exit(1)


cache_app = typer.Typer(
    help="The projection cache: each module's operator per (base, aligned) pair, under SAFELORA_CACHE "
    "(default ~/.cache/safelora, or $XDG_CACHE_HOME/safelora); and the backups of originals, under "
    "SAFELORA_BACKUPS (default ~/.local/share/safelora/originals), removed only with --backups.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(cache_app, name="cache")

BackupsFlag = Annotated[
    bool,
    typer.Option(
        "--backups",
        metavar="",
        help="The kept originals instead of the projection cache: each is the only copy of an adapter's "
        "original, restore can no longer bring it back.",
    ),
]


@cache_app.command(
    "ls", cls=_Command, epilog="Examples:\n\n  safelora cache ls --modules\n\n  safelora cache ls --json\n"
)
def cache_ls(
    modules: Annotated[bool, typer.Option("--modules", "-m", help="List each pair's modules too.", metavar="")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List cached pairs (key, base, aligned, modules, size) and kept originals (adapter, date, size).

    --json prints {"pairs": [...], "backups": [...]}, every pair with its modules.
    """
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    with _errors(sink):
        pairs = projection_cache.ProjectionCache().pairs()
        store = backups.BackupStore()
        kept = store.all()
    sink.add(
        rendering.cache_to_json(pairs, kept),
        lambda console: rendering.render_cache(pairs, kept, store.root, console, modules=modules),
    )
    sink.emit(batch=False)


@cache_app.command(
    "rm",
    cls=_Command,
    epilog="Examples:\n\n  safelora cache rm 3f2a9c\n\n  safelora cache rm --backups ./my-adapter --yes\n",
)
def cache_rm(
    targets: Annotated[
        list[str],
        typer.Argument(
            metavar="KEY_OR_ADAPTER...",
            help="Pair keys (or unique prefixes of them); with --backups, adapter directories.",
            show_default=False,
        ),
    ],
    backups_: BackupsFlag = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove pairs' cached operators; with --backups, adapters' kept originals (asks first)."""
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    if not backups_:
        with _errors(sink):
            cache = projection_cache.ProjectionCache()
            for key in targets:
                removed = cache.remove(key)
                sink.add(rendering.pair_to_json(removed), partial(rendering.render_removed_pair, removed))
        sink.emit(batch=len(targets) > 1)
        return
    with _errors(sink):
        store = backups.BackupStore()
        chosen = _backups_of(store, targets)
        gone = [b for b, dirs in chosen if set(b.adapters) <= dirs or not b.adapters]
        _confirm(f"{len(gone)} kept original(s), {rendering.size(sum(b.nbytes for b in gone))}", yes)
        store.remove(gone)
        for backup, dirs in chosen:
            if backup not in gone:
                for d in dirs:
                    store.forget(backup, d)
    kept_for_others = len(chosen) - len(gone)
    sink.add(
        {"removed": [rendering.backup_to_json(b) for b in gone], "kept_for_other_adapters": kept_for_others},
        lambda c: c.print(
            line(f"removed {len(gone)} kept original(s); {kept_for_others} still kept for other adapters"),
            highlight=False,
        ),
    )
    sink.emit(batch=False)


def _backups_of(store: backups.BackupStore, targets: list[str]) -> list[tuple[backups.Backup, set[str]]]:
    """The backups kept for these adapter directories: the one each one's provenance names, and any
    recorded for its path. Each with the directories (absolute) it is being removed for."""
    kept = store.all()
    chosen: dict[str, tuple[backups.Backup, set[str]]] = {}
    for target in targets:
        where = os.path.abspath(target)
        found = [b for b in kept if where in b.adapters]
        if os.path.isdir(target):
            with adapter_io.opened(Path(target)) as opened:
                sha = opened.provenance().get(adapter_io.PROVENANCE_PREFIX + "original")
            found += [b for b in kept if b.sha256 == sha]
        if not found:
            raise SafeLoraError(f"{target}: no kept original in {store.root}")
        for b in found:
            chosen.setdefault(b.sha256, (b, set()))[1].add(where)
    return list(chosen.values())


def _confirm(what: str, yes: bool) -> None:
    """Ask before deleting backups: each is the only copy of an adapter's original."""
    warning = f"deleting {what}: each is the only copy of an adapter's original, restore cannot bring it back"
    if yes:
        return
    if not sys.stdin.isatty():
        raise typer.BadParameter(f"{warning}. Nothing was removed; pass --yes to delete them", param_hint="--yes")
    if not typer.confirm(f"{warning[0].upper()}{warning[1:]}. Delete?", default=False, err=True):
        _err_console().print(line("nothing was removed"), highlight=False)
        raise typer.Exit(1)


@cache_app.command(
    "clear",
    cls=_Command,
    epilog="Examples:\n\n  safelora cache clear\n\n  safelora cache clear --backups --older-than 30\n",
)
def cache_clear(
    backups_: BackupsFlag = False,
    older_than: Annotated[
        float | None,
        typer.Option(min=0, help="With --backups: only originals kept more than DAYS days ago.", metavar="DAYS"),
    ] = None,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove every cached pair (a pair a running safelora is computing is kept); never the backups,
    unless --backups (which asks first)."""
    if older_than is not None and not backups_:
        raise typer.BadParameter("applies to --backups only", param_hint="--older-than")
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    if backups_:
        with _errors(sink):
            store = backups.BackupStore()
            limit = time.time() - older_than * 86400 if older_than is not None else None
            gone = [b for b in store.all() if limit is None or b.created < limit]
            _confirm(f"{len(gone)} kept original(s), {rendering.size(sum(b.nbytes for b in gone))}", yes)
            store.remove(gone)
        sink.add(
            {"removed": [rendering.backup_to_json(b) for b in gone]},
            lambda c: c.print(line(f"removed {len(gone)} kept original(s) from {store.root}"), highlight=False),
        )
        sink.emit(batch=False)
        return
    with _errors(sink):
        cache = projection_cache.ProjectionCache()
        removed, kept = cache.clear()
    sink.add(
        {"removed": [rendering.pair_to_json(p) for p in removed], "kept": kept},
        lambda c: rendering.render_cleared(removed, kept, cache.root, c),
    )
    sink.emit(batch=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safelora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.", metavar=""),
    ] = False,
) -> None:
    """Safe LoRA for PEFT adapters."""


def main() -> None:
    """Console-script entry point."""
    app()
