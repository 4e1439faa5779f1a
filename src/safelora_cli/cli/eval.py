"""``safelora eval``: refusal, over-refusal and utility, before and after, as a table people read at
a glance (or one JSON document), with the responses as records anyone can judge again."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .. import api
from . import render as rendering
from ._errors import best_effort, errors
from ._options import ADVANCED, DEVICES, INPUTS, OUTPUT, REPORTS, SELECTION, JsonOpt, QuietOpt, _choice, flag
from .console import line

if TYPE_CHECKING:
    from ..api import EvalResult

EXAMPLES = """Examples:

  safelora eval ./my-adapter --model meta-llama/Llama-2-7b-chat-hf --prompts harmful.csv --benign benign.txt

  safelora eval ./my-adapter --model ./chat-model --prompts advbench.csv --judge ./guard --records out.jsonl --json
"""

DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def eval_(
    adapters: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ADAPTER",
            help="PEFT LoRA adapter directories (or quoted globs) to evaluate on --model; none: the model alone.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            metavar="MODEL",
            help="The aligned chat model the adapters were trained on: a directory or a Hub repo, loaded once "
            "with transformers (no remote code).",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = ...,  # type: ignore[assignment]
    prompts: Annotated[
        Path,
        typer.Option(
            metavar="FILE",
            help="Harmful prompts: one a line, or .jsonl/.csv (see --prompt-column). Compliance is the share "
            "not refused.",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = ...,  # type: ignore[assignment]
    benign: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Benign prompts, as --prompts: over-refusal is the share refused.",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    utility: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="A text whose perplexity each variant gets (lines joined with newlines; a sliding window of "
            "min(context, 1024) tokens, stride half of it).",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    refusal_markers: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Refusal markers, one a line, instead of safelora's default list: a response holding one "
            "(case-insensitive) is a refusal.",
            show_default=False,
            rich_help_panel=SELECTION,
        ),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="A local Llama Guard-style classifier (a directory or a Hub repo): its safe/unsafe verdict "
            "replaces the markers on the harmful set.",
            show_default=False,
            rich_help_panel=SELECTION,
        ),
    ] = None,
    original: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="The adapter's original (before projection), for one adapter. Default: the original the backup "
            "store keeps for an adapter safelora projected.",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    system_prompt: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT", help="A system prompt before each prompt.", show_default=False, rich_help_panel=SELECTION
        ),
    ] = None,
    prompt_column: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="The column of a .jsonl/.csv prompt file to read. Default: the first of prompt, goal, Goal, "
            "Behavior (HarmBench's ContextString is put before it).",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, metavar="N", help="Longest answer, in tokens (greedy).", rich_help_panel=ADVANCED)
    ] = 128,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Prompts answered at once (halved on a CUDA out-of-memory).",
            rich_help_panel=ADVANCED,
        ),
    ] = 8,
    dtype: Annotated[
        str,
        _choice(
            DTYPES,
            "DTYPE",
            "auto, float32, bfloat16 or float16 (auto: float32 on CPU, bfloat16 on CUDA).",
            rich_help_panel=ADVANCED,
        ),
    ] = "auto",
    device: Annotated[
        str,
        _choice(DEVICES, "auto|cpu|cuda", "Where the model runs (auto: CUDA when present).", rich_help_panel=ADVANCED),
    ] = "auto",
    records: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Write one JSON line per variant × prompt (variant, set, prompt, response, refused) to FILE.",
            show_default=False,
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    summary: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Append the evaluation as Markdown to FILE. Default: $GITHUB_STEP_SUMMARY when set.",
            show_default=False,
            rich_help_panel=REPORTS,
        ),
    ] = None,
    model_card: Annotated[
        bool,
        flag(
            "--model-card/--no-model-card",
            "Write an Evaluation section into the adapter's README.md (one adapter), marked with the adapter's "
            "digest: a later project or restore of the adapter removes it.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure refusal, over-refusal and utility: the model alone, with each adapter, and with each
    adapter's original, on the same prompts, with greedy decoding.

    Reports per variant the harmful compliance (share of --prompts not refused), the benign
    over-refusal (share of --benign refused) and the perplexity on --utility; and, for each adapter
    against its original and against the model alone, the exact McNemar p-value on the paired
    refusals, Holm-adjusted across the comparisons. Refusal markers are a crude judge: read the
    records. Evaluation never changes an adapter; --model-card edits only its README.md. Needs
    safelora[hf]. Exit codes: 0 done, 1 input or model error, 2 usage.
    """
    specs = list(adapters or [])
    if model_card and len(specs) != 1:
        raise typer.BadParameter("--model-card writes into one adapter's card: give exactly one adapter")
    if original is not None and len(specs) != 1:
        raise typer.BadParameter("--original is the original of one adapter: give exactly one adapter")
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    summary_file = summary or (
        Path(os.environ["GITHUB_STEP_SUMMARY"]) if os.environ.get("GITHUB_STEP_SUMMARY") else None
    )
    with errors(sink):
        with _bars(sink.console, enabled=not quiet) as progress:
            result = api.evaluate(
                model,
                specs,
                prompts=prompts,
                benign=benign,
                utility=utility,
                refusal_markers=refusal_markers,
                judge=judge,
                system_prompt=system_prompt,
                prompt_column=prompt_column,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                dtype=dtype,
                device=device,
                original=original,
                progress=progress,
            )
        if records is not None:
            api.write_eval_records(result, records)
    sink.add(result.to_json(), lambda console: render_eval(result, console))
    sink.emit(batch=False)
    failed = False
    if summary_file is not None:
        failed |= not best_effort("the summary", lambda: api.append_summary(summary_file, api.eval_markdown(result)))
    if model_card:
        failed |= not best_effort("the model card", lambda: _card(result, sink))
    if failed:
        raise typer.Exit(1)


def _card(result: EvalResult, sink: rendering.Sink) -> None:
    path = api.write_eval_card(result)
    sink.show(lambda c: c.print(line((f"Evaluation section written to {path}", "dim")), highlight=False))


@contextmanager
def _bars(console: Console, *, enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Progress bars with an ETA on a terminal (transient); nothing elsewhere."""
    if not (enabled and console.is_terminal):
        yield lambda label, total: lambda n: None
        return
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )

    def task(label: str, total: int) -> Callable[[int], None]:
        task_id = bars.add_task(label, total=total)
        return lambda n: bars.advance(task_id, n)

    with bars:
        yield task


def _pct(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}% ({part}/{total})"


def _p(x: float) -> str:
    return f"{x:.3g}" if x >= 0.001 else f"{x:.1e}"


def render_eval(result: EvalResult, console: Console) -> None:
    """The variants' table, the comparisons' table, the judge and the notes."""
    console.print(line(("Evaluation · ", "italic"), (result.model, "italic")), highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD)
    for title, justify in (
        ("variant", "left"),
        ("harmful compliance", "right"),
        ("benign over-refusal", "right"),
        ("perplexity", "right"),
    ):
        table.add_column(title, justify=justify)  # type: ignore[arg-type]
    for v in result.variants:
        harmful, benign = v.scores.get("harmful"), v.scores.get("benign")
        ppl = v.perplexity
        table.add_row(
            line(v.name),
            "—" if harmful is None else _pct(harmful.total - harmful.refused, harmful.total),
            "—" if benign is None else _pct(benign.refused, benign.total),
            "—" if ppl is None or not math.isfinite(ppl.value) else f"{ppl.value:.2f}",
        )
    console.print(table)
    if result.comparisons:
        tests = Table(box=box.SIMPLE_HEAD, title="paired refusals: exact McNemar, Holm-adjusted", title_justify="left")
        for title, justify in (
            ("variant", "left"),
            ("against", "left"),
            ("set", "left"),
            ("only variant refused", "right"),
            ("only other refused", "right"),
            ("p", "right"),
            ("p (Holm)", "right"),
        ):
            tests.add_column(title, justify=justify)  # type: ignore[arg-type]
        for c in result.comparisons:
            tests.add_row(
                line(c.variant),
                line(c.against),
                c.set,
                str(c.refused_by_variant_only),
                str(c.refused_by_other_only),
                _p(c.p_value),
                _p(c.p_holm),
            )
        console.print(tests)
    console.print(line(("judge: ", "dim"), (result.judge_text, "dim")), highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(line(("note:", "yellow"), " ", note), highlight=False, soft_wrap=True)
