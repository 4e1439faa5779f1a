"""``safelora project``: its flags, a config and a preset under them, and the extras it writes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from .. import api
from ..errors import SafeLoraError, UsageError
from . import render as rendering
from ._batch import deliver, expanded, interruptible
from ._errors import after_write, best_effort, describe, errors
from ._options import (
    AdapterArgs,
    AdaptersOpt,
    AlignedOpt,
    AlignedRevisionOpt,
    AllowCheckpointOpt,
    AllowDoraOpt,
    BaseOpt,
    BaseRevisionOpt,
    ConfigOpt,
    ConnectionsOpt,
    DeviceOpt,
    DryRunOpt,
    ForceOpt,
    JsonLinesOpt,
    ModelCardOpt,
    NoBackupOpt,
    NoCacheOpt,
    NumLayersOpt,
    OutputOpt,
    PlotOpt,
    PrecisionOpt,
    PresetOpt,
    ProjectedOnlyOpt,
    QuietOpt,
    SignKeyOpt,
    SortOpt,
    SummaryOpt,
    ThresholdOpt,
    TokenOpt,
    adapter_specs,
)
from .console import line

EXAMPLES = """Examples:

  safelora project ./my-adapter --base ./llama-base --aligned ./llama-chat

  safelora project ./my-adapter --preset llama-2-7b --dry-run

  safelora project ./my-adapter --preset llama-2-7b --num-layers 7 --output ./sanitized

  safelora project 'adapters/*' --base meta-llama/Llama-2-7b-hf --aligned meta-llama/Llama-2-7b-chat-hf --json
"""


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
    as_json: JsonLinesOpt = False,
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
    sign_key: SignKeyOpt = None,
    allow_checkpoint: AllowCheckpointOpt = False,
) -> None:
    """Project a LoRA adapter (Safe LoRA): for each module, B ← C·B when its similarity is low.

    Rewrites adapter_model.safetensors in place (atomically, after keeping the original in the
    backup store) unless --output or --dry-run is given. Only the weights of the adapter's
    targeted modules are read, one tensor at a time; from a Hub repo, only their byte ranges are
    downloaded. Each module's projection operator is cached per (base, aligned) pair, so later runs
    on the same pair read nothing for it (--no-cache: off). With --sign-key, each adapter written is
    signed; a rewrite without it removes the attestation it does not re-sign.
    """
    options, shown = _options(ctx)
    specs = adapter_specs(shown["adapters"], shown["adapter"])
    summary, plot, quiet = shown["summary"], shown["plot"], shown["quiet"]
    sink = rendering.Sink(as_json=shown["as_json"], quiet=quiet, lines=True)
    paths = expanded(specs)
    in_place = not options.dry_run and options.output is None
    summary_file = _summary_file(summary)
    with errors():
        try:
            _check_extras(summary, plot)
        except SafeLoraError as e:
            options.locate(e)  # a path from --config: its file and line
            raise
    with (
        errors(sink, paths),
        interruptible(paths, in_place),
        rendering.RunDisplay(sink.console, enabled=not quiet) as display,
        _summarized_failure(summary_file, lambda: [*paths()] or specs),
    ):
        started = time.perf_counter()
        outcomes = api.run(list[api.StrPath](specs), options, events=display)
        seconds = time.perf_counter() - started
    failed = sum(isinstance(o, SafeLoraError) for o in outcomes)

    def show() -> None:
        render = partial(rendering.render, sort=shown["sort"], projected_only=shown["projected_only"])
        deliver(sink, outcomes, lambda report: report.to_json(), render)
        if len(outcomes) > 1:
            sink.show(partial(rendering.render_batch, outcomes, seconds))
        sink.emit()

    after_write(show)
    _write_extras(outcomes, summary_file, plot, sink)
    if failed:
        raise typer.Exit(1)


def _options(ctx: typer.Context) -> tuple[api.Options, dict[str, Any]]:
    """The run's options, and every parameter's value (by its name), with the flags given on the
    command line over --config over --preset over the defaults."""
    keys = _option_keys(ctx)
    given = {key: ctx.params[name] for key, name in keys.items() if _from_command_line(ctx, name)}
    parse = _parser(ctx, keys)
    with errors():
        options, found = api.project_options(
            given, preset=ctx.params["preset"], config=ctx.params["config_file"], check=_check(parse), parse=parse
        )
    shown = dict(ctx.params)
    for key, value in found.items():
        shown[keys[key]] = value
    if options.threshold is not None and options.num_layers is not None:
        raise typer.BadParameter("give --threshold or --num-layers, not both", param_hint="--num-layers")
    return options, shown


def _option_keys(ctx: typer.Context) -> dict[str, str]:
    """Config key -> parameter name, for every option of the command (``json`` -> ``as_json``)."""
    keys = {}
    for param in ctx.command.params:
        if param.name in ("config_file", "preset", "adapters") or param.name is None:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = param.name
    return keys


def _parser(ctx: typer.Context, keys: dict[str, str]) -> Callable[[str, Any], Any]:
    """A config value as its option's own parsing gives it (``adapter: ./a`` is the list ``[./a]``
    a repeatable option holds); a key no flag spells (``cache``) as it is."""
    params = {p.name: p for p in ctx.command.params}

    def parse(key: str, value: Any) -> Any:
        if key not in keys:
            return value
        param = params[keys[key]]
        multiple = getattr(param, "multiple", False) and not isinstance(value, list)
        return param.process_value(ctx, [value] if multiple else value)

    return parse


def _check(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], str | None]:
    """Why the option's own parsing refuses a config value, or None."""

    def check(key: str, value: Any) -> str | None:
        try:
            parse(key, value)
        except typer.BadParameter as e:
            return str(e.message)
        return None

    return check


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


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
            api.check_summary_path(summary)
        except SafeLoraError as e:
            raise UsageError(f"summary {e}", option="summary", concerns=("summary",)) from None
    if plot is not None:
        api.check_plot_path(plot)
        api.require_matplotlib()


@contextmanager
def _summarized_failure(summary: Path | None, adapters: Callable[[], list[Path] | list[str]]) -> Iterator[None]:
    """A run that fails as a whole still leaves its error in the step summary, once per adapter."""
    try:
        yield
    except SafeLoraError as e:
        if summary is not None:
            sections = "".join(api.error_summary_markdown(a, describe(e)) for a in adapters())
            best_effort("the step summary", lambda: api.append_summary(summary, sections))
        raise


def _write_extras(
    outcomes: list[api.Report | SafeLoraError], summary: Path | None, plot: Path | None, sink: rendering.Sink
) -> None:
    """The step summary and the plots, after the adapters are written: each failure is a warning."""
    if summary is not None:
        sections = "".join(
            api.error_summary_markdown(o.adapter or "safelora project", describe(o))
            if isinstance(o, SafeLoraError)
            else o.summary_markdown()
            for o in outcomes
        )
        if best_effort("the step summary", lambda: api.append_summary(summary, sections)):
            sink.show(partial(_said, f"summary appended to {summary}"))
    if plot is not None:
        for i, outcome in enumerate(outcomes, 1):
            if isinstance(outcome, SafeLoraError):
                continue
            target = plot if len(outcomes) == 1 else plot.with_name(f"{plot.stem}-{i}{plot.suffix}")
            if best_effort(f"the plot {target}", partial(outcome.plot, target)):
                sink.show(partial(_said, f"plot written to {target}"))


def _said(message: str, console: Console) -> None:
    console.print(line((message, "dim")), highlight=False)
