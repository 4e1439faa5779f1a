"""What ``eval`` found, as Markdown: the section a step summary gets and the "Evaluation" section of
an adapter's model card; and that card section's upkeep.

The card section is safelora's second marked section, separate from the "Safe LoRA" one
(``card.py``): it sits between ``<!-- safelora-eval:begin digest=… -->`` and
``<!-- safelora-eval:end -->``, whole lines outside fenced code blocks. The begin marker carries the
stamp digest of the adapter that was evaluated, so whatever rewrites the adapter later (``project``,
``restore``) takes out a section that no longer describes it (``remove_stale``). ``added=file`` in
the marker says safelora created the card for it, so taking the section out removes the card.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .._version import __version__
from ..errors import AdapterError
from ..evaluation.result import BENIGN, HARMFUL, EvalResult, Variant
from ..io import safefs
from .card import CARD_FILE, edit_card, markers
from .markdown import code, md

END = "<!-- safelora-eval:end -->"
_BEGIN = re.compile(r"<!-- safelora-eval:begin digest=(?P<digest>[0-9a-f]{64})(?P<file> added=file)? -->")


def _shown(path: str) -> str:
    """A path as published: as given when relative, else by its base name."""
    p = Path(path)
    return p.name if p.is_absolute() else path


def _rate(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}% ({part}/{total})"


def _cells(v: Variant) -> list[str]:
    harmful, benign = v.scores.get(HARMFUL), v.scores.get(BENIGN)
    ppl = v.perplexity
    return [
        code(v.name),
        "—" if harmful is None else _rate(harmful.total - harmful.refused, harmful.total),
        "—" if benign is None else _rate(benign.refused, benign.total),
        "—" if ppl is None or not math.isfinite(ppl.value) else f"{ppl.value:.2f} ({ppl.tokens} tokens)",
    ]


def _p(x: float) -> str:
    return f"{x:.3g}" if x >= 0.001 else f"{x:.1e}"


def markdown(result: EvalResult, heading: str = "## Evaluation") -> str:
    """The evaluation as Markdown: what was run (model, judge, prompt files by sha256, generation
    settings), the rates and perplexities per variant, and the paired tests."""
    s = result.settings
    lines = [
        heading,
        "",
        f"Measured with safelora {md(__version__)} (`safelora eval`). Judge: {md(result.judge_text)}.",
        "",
        f"- **Model:** {code(_shown(result.model))}",
    ]
    for p in result.prompt_sets:
        column = f", column {code(p.column)}" if p.column else ""
        lines.append(
            f"- **{p.name.capitalize()} prompts:** {code(p.path.name)}, sha256 {code(p.sha256)}, "
            f"{len(p.prompts)} prompts{column}"
        )
    if result.utility is not None:
        lines.append(
            f"- **Utility text:** {code(Path(result.utility.path).name)}, sha256 {code(result.utility.sha256)}"
        )
    system = "a system prompt" if s.get("system_prompt") else "no system prompt"
    template = "the chat template" if s.get("chat_template") else "plain text (no chat template)"
    lines += [
        f"- **Generation:** greedy, at most {s['max_new_tokens']} new tokens, {template}, {system}; batch "
        f"{s['batch_size_final']}, {md(s['dtype'])} on {md(s['device'])}, {s['threads']} threads; torch "
        f"{md(s['torch'])}, transformers {md(s['transformers'])}, peft {md(s['peft'])}",
        "",
        "| variant | harmful compliance | benign over-refusal | perplexity |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += ["| " + " | ".join(_cells(v)) + " |" for v in result.variants]
    if result.comparisons:
        lines += [
            "",
            "| variant | against | set | refused by variant only | by the other only | p (exact McNemar) | p (Holm) |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for c in result.comparisons:
            lines.append(
                f"| {code(c.variant)} | {code(c.against)} | {c.set} | {c.refused_by_variant_only} | "
                f"{c.refused_by_other_only} | {_p(c.p_value)} | {_p(c.p_holm)} |"
            )
    if result.notes:
        lines += ["", "**Notes:**", ""] + [f"- {md(note)}" for note in result.notes]
    lines += [""]
    return "\n".join(lines)


def card_section(result: EvalResult, digest: str) -> str:
    """The card's Evaluation section, markers included, for the adapter whose stamp digest is ``digest``."""
    return "\n".join([f"<!-- safelora-eval:begin digest={digest} -->", "", markdown(result), END, ""])


def _lines(text: str) -> list[str]:
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _find(lines: list[str], where: object) -> tuple[int, int, str, bool] | None:
    """(begin line, end line, digest, whether safelora created the card) of the one section, or None."""
    found, ends, _ = markers(lines, _BEGIN, END)
    begins = [(i, b["digest"], bool(b["file"])) for i, b in found]
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0][0]:
        raise AdapterError(
            f"{where}: {len(begins)} '<!-- safelora-eval:begin … -->' and {len(ends)} '{END}' markers, not one "
            "section; keep one pair (or none) and run again"
        )
    return begins[0][0], ends[0], begins[0][1], begins[0][2]


def with_section(text: str | None, section: str, *, where: object = CARD_FILE) -> str:
    """``text`` (a card, or None when there is none) with the Evaluation ``section`` in it: an existing
    one replaced where it is, else appended after a blank line. Line ends follow the card's."""
    if text is None:
        return section.replace(" -->", " added=file -->", 1)
    lines = _lines(text)
    eol = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    body = [line.rstrip("\n") + eol for line in _lines(section)]
    found = _find(lines, where)
    if found is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += eol
        return "".join([*lines, eol, *body])
    begin, end, _, created = found
    if created:
        body[0] = body[0].replace(" -->", " added=file -->", 1)
    lines[begin : end + 1] = body
    return "".join(lines)


def without_section(text: str, keep: str | None = None, *, where: object = CARD_FILE) -> str | None:
    """``text`` without the Evaluation section, unless it carries the digest ``keep``; None when
    safelora created the card for it and nothing else is left."""
    lines = _lines(text)
    found = _find(lines, where)
    if found is None or found[2] == keep:
        return text
    begin, end, _, created = found
    del lines[begin : end + 1]
    if begin > 0 and begin == len(lines) and not lines[begin - 1].strip():
        del lines[begin - 1]  # the blank line the section was appended after
    rest = "".join(lines)
    return None if created and not rest.strip() else rest


def write_section(directory: safefs.Directory, section: str) -> None:
    """Put ``section`` into the card in ``directory`` (created when there is none)."""
    edit_card(directory, lambda text: with_section(text, section, where=directory.path / CARD_FILE))


def remove_stale(directory: safefs.Directory, digest: str | None) -> None:
    """Take out the card's Evaluation section unless it describes the adapter whose digest is ``digest``."""
    edit_card(
        directory,
        lambda text: None if text is None else without_section(text, digest, where=directory.path / CARD_FILE),
    )
