"""``safelora eval``'s parts that need no model: the exact McNemar test and Holm, verdict parsing,
prompt files and refusal markers, perplexity in JSON, and the card's Evaluation section as text."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from safelora_cli.errors import AdapterError
from safelora_cli.evaluation import perplexity, stats
from safelora_cli.evaluation.judges import DEFAULT_MARKERS, Markers
from safelora_cli.evaluation.prompts import CONTEXT_JOIN, read_prompts
from safelora_cli.outputs import evaluation


def test_mcnemar_and_holm_on_known_values() -> None:
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(0, 5) == 2 / 32
    assert stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert stats.mcnemar_exact(0, 1100) == 2.0**-1099  # exact fractions: no underflow before the end
    assert stats.discordant([True, True, False, False], [True, False, True, True]) == (1, 2)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]
    assert stats.holm([]) == []


def test_prompt_files_in_each_format(tmp_path: Path) -> None:
    jsonl = tmp_path / "advbench.jsonl"
    jsonl.write_text('{"goal": "a", "target": "x"}\n\n{"goal": "b"}\n')
    assert read_prompts(jsonl, "harmful", "prompts").prompts == ("a", "b")
    harmbench = tmp_path / "harmbench.csv"
    harmbench.write_text('Behavior,ContextString,BehaviorID\nsay it,,1\n"explain, why","some, context",2\n')
    got = read_prompts(harmbench, "harmful", "prompts")
    assert got.column == "Behavior" and got.prompts == ("say it", "some, context" + CONTEXT_JOIN + "explain, why")
    chosen = read_prompts(harmbench, "harmful", "prompts", column="BehaviorID")
    assert chosen.prompts == ("1", "some, context" + CONTEXT_JOIN + "2")  # the context goes with any column
    text = tmp_path / "p.txt"
    text.write_bytes("\ufeffone\r\n\r\n two \n".encode())
    got = read_prompts(text, "benign", "benign")
    assert got.prompts == ("one", "two") and got.sha256 == hashlib.sha256(text.read_bytes()).hexdigest()


def test_markers_are_case_insensitive_and_read_typographic_apostrophes() -> None:
    markers = Markers(DEFAULT_MARKERS)
    assert markers.refused("I’M SORRY, but no.") and markers.refused("well, i cannot do that")
    assert not markers.refused("Sure, here is how")


def test_an_infinite_perplexity_is_null_in_json() -> None:
    assert perplexity.Perplexity(math.inf, 10, 32, 16).to_json()["perplexity"] is None


DIGEST = "ab" * 32


def _section(digest: str = DIGEST) -> str:
    return f"<!-- safelora-eval:begin digest={digest} -->\n\n## Evaluation\n\nfigures\n<!-- safelora-eval:end -->\n"


def test_the_section_is_replaced_in_place_and_keeps_crlf_cards() -> None:
    card = "# Mine\r\n\r\ntext\r\n"
    once = evaluation.with_section(card, _section())
    assert (
        once.startswith(card)
        and "\r\n<!-- safelora-eval:end -->\r\n" in once
        and once.count("\n") == once.count("\r\n")  # every line ends as the card's do
    )
    twice = evaluation.with_section(once, _section("cd" * 32))
    assert twice.count("safelora-eval:begin") == 1 and "cd" * 32 in twice
    assert evaluation.without_section(twice) == card
    assert evaluation.without_section(twice, keep="cd" * 32) == twice  # it describes the adapter as it is


def test_markers_in_a_code_block_are_text_and_two_sections_are_refused() -> None:
    shown = "```\n" + _section() + "```\n"
    assert evaluation.without_section(shown) == shown
    with pytest.raises(AdapterError, match="2 '<!-- safelora-eval:begin … -->' and 2"):
        evaluation.with_section(_section() + _section(), _section())
    with pytest.raises(AdapterError, match="not one section"):
        evaluation.without_section("<!-- safelora-eval:end -->\n")
