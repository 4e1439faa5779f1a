"""``evaluate`` and what writes its results: the API of ``safelora eval``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import StrPath

if TYPE_CHECKING:
    from ..evaluation.generate import Progress
    from ..evaluation.result import EvalResult


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
    from ..evaluation import generate
    from ..evaluation.run import evaluate as run_evaluation

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
    from ..outputs.evaluation import markdown

    return markdown(result)


def write_eval_card(result: EvalResult) -> Path:
    """Write the Evaluation section into the model card (README.md) of the one adapter ``result``
    evaluated, marked with the adapter's stamp digest so that a later rewrite of the adapter removes
    it; returns the card's path. Refused when the adapter changed since it was evaluated."""
    from ..evaluation.written import write_card

    return write_card(result)


def write_eval_records(result: EvalResult, path: StrPath) -> None:
    """Write ``result``'s records to ``path``: one JSON line per variant × prompt (``variant``, ``set``,
    ``prompt``, ``response``, ``refused``, and the judge's ``verdict``), so anyone can judge them again."""
    from ..evaluation.written import write_records

    write_records(result, Path(path))
