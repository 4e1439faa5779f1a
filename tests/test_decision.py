"""Seeing the decision: the terminal histogram, the step summary's structure under hostile names,
and the rules for appending to a summary file."""

from __future__ import annotations

import dataclasses
import html
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from markdown_it import MarkdownIt
from markdown_it.token import Token
from safetensors.torch import load_file, save_file

from safelora_cli import __version__, decision
from safelora_cli.adapter import ADAPTER_FILE
from safelora_cli.decision import append_summary, histogram_lines, summary_markdown
from safelora_cli.errors import ExtraFileError
from safelora_cli.pipeline import LayerResult, Report, Settings, project_adapter
from safelora_cli.sources import open_local
from safelora_cli.text import printable

HOSTILE = [
    "a|b|c",
    "tick`s``and```fences",
    "x --> y",
    "line\nbreak\r\n",
    "<script>alert(1)</script>",
    "[click](https://example.com/x)",
    "<!-- safelora:end -->",
    "```mermaid",
    "&amp; &#124;",
    "back\\|slash\\\\|pipe",
    "*bold* _em_ ~~strike~~ $x$",
    "%%{init: {'theme': 'dark'}}%%",
    '"quoted" #35; ;',
    "rtl\u202eevil",
]


@pytest.fixture
def report(llama_pair: tuple[Path, Path], adapter_dir: Path) -> Report:
    """A real dry-run report of the tiny Llama adapter, with layer 0's q_proj untrained (B = 0:
    undefined similarity) and τ_k set so that some modules are projected and some kept."""
    tensors = load_file(adapter_dir / ADAPTER_FILE)
    zero_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[zero_b] = torch.zeros_like(tensors[zero_b])
    save_file(tensors, adapter_dir / ADAPTER_FILE, metadata={"format": "pt"})
    base, aligned = llama_pair
    settings = Settings(mode="number", num_layers=3, dry_run=True)
    return project_adapter(adapter_dir, open_local(base), open_local(aligned), settings)


def hostile(report: Report) -> Report:
    """``report`` with hostile module names, adapter path and notes (the numbers are the real ones)."""
    layers = [
        dataclasses.replace(layer, module=HOSTILE[i % len(HOSTILE)] + f".{i}") for i, layer in enumerate(report.layers)
    ]
    return dataclasses.replace(
        report,
        adapter=Path("/tmp/ad|apter `x` <b>--> \n [y]"),
        layers=layers,
        notes=["note with | and ` and <!-- and -->\nsecond line"],
    )


# --- the summary's structure -------------------------------------------------------------------

_PARSER = MarkdownIt("commonmark").enable("table")
_NUMBER = r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)"  # Mermaid's xychart number: no exponent


def tokens(text: str) -> list[Token]:
    return _PARSER.parse(text)


def chart(text: str) -> tuple[list[str], list[float], list[float]]:
    """The one xychart's x labels, bar values and line values, checked against Mermaid's grammar."""
    fences = [t for t in tokens(text) if t.type == "fence"]
    assert [t.info for t in fences] == ["mermaid"]
    body = fences[0].content
    assert body.startswith("xychart-beta\n")
    assert "%%" not in body and not re.search(r"#\w+;", body)  # Mermaid's comments, directives, entities
    lines = body.splitlines()[1:]
    assert re.fullmatch(r'  title "[^"\n]*"', lines[0])
    m = re.fullmatch(r'  x-axis \[((?:"[A-Za-z0-9_. ]+", )*"[A-Za-z0-9_. ]+")\]', lines[1])
    assert m, lines[1]
    labels = re.findall(r'"([^"]*)"', m[1])
    assert re.fullmatch(rf'  y-axis "similarity" {_NUMBER} --> {_NUMBER}', lines[2])
    series = {}
    for line in lines[3:]:
        m = re.fullmatch(rf"  (bar|line) \[((?:{_NUMBER}, )*{_NUMBER})\]", line)
        assert m, line
        series[m[1]] = [float(v) for v in m[2].split(", ")]
    assert set(series) <= {"bar", "line"}
    return labels, series["bar"], series.get("line", [])


def tables(text: str) -> dict[str, list[list[str]]]:
    """Each table's body rows (cells as rendered text), keyed by its header row."""
    out: dict[str, list[list[str]]] = {}
    toks = tokens(text)
    i = 0
    while i < len(toks):
        if toks[i].type != "table_open":
            i += 1
            continue
        rows: list[list[str]] = []
        row: list[str] = []
        while toks[i].type != "table_close":
            t = toks[i]
            if t.type == "tr_open":
                row = []
            elif t.type == "inline":
                row.append(_rendered(t))
            elif t.type == "tr_close":
                rows.append(row)
            i += 1
        out[" | ".join(rows[0])] = rows[1:]
    return out


def _rendered(inline: Token) -> str:
    """An inline token's text; only ``<code>`` may appear as HTML, and nothing may be a link."""
    parts = []
    for child in inline.children or []:
        assert child.type in ("text", "html_inline", "strong_open", "strong_close", "softbreak"), child.type
        if child.type == "html_inline":
            assert child.content in ("<code>", "</code>"), child.content
        elif child.type == "text":
            parts.append(child.content)
    return "".join(parts)


def check_structure(report: Report) -> str:
    text = summary_markdown(report)
    doc = report.to_json()
    toks = tokens(text)
    assert [t.tag for t in toks if t.type == "heading_open"] == ["h2", "h3"]
    html_blocks = [t.content.strip() for t in toks if t.type == "html_block"]
    assert html_blocks == [f"<details><summary>All {len(report.layers)} modules</summary>", "</details>"]
    inlines = [t for t in toks if t.type == "inline"]
    assert inlines[-1].content == f"<sub>safelora {__version__}</sub>"
    for t in inlines[:-1]:
        _rendered(t)  # only <code> as HTML, no links
    labels, bars, line = chart(text)
    found = tables(text)
    projected_rows = found["module | layer | similarity | ‖CB‖/‖B‖ | chart label"]
    all_rows = found["# | chart label | module | layer | similarity | projected | ‖CB‖/‖B‖"]
    # Every module, in the report's (layer) order, named exactly (as printable text) in the legend table.
    assert [row[2] for row in all_rows] == [printable(layer["module"]) for layer in doc["layers"]]
    assert all(len(row) == 7 for row in all_rows)
    legend = {row[1]: row[2] for row in all_rows}
    assert len(legend) == len(all_rows)  # labels are unique
    charted = [layer for layer in doc["layers"] if layer["similarity"] is not None]
    assert [legend[label] for label in labels] == [printable(layer["module"]) for layer in charted]
    assert bars == [layer["similarity"] for layer in charted]  # exactly, digit for digit
    assert line == [doc["threshold"]] * len(charted)
    assert len(projected_rows) == doc["projected_count"]
    assert [row[0] for row in projected_rows] == [
        printable(layer["module"]) for layer in doc["layers"] if layer["projected"]
    ]
    assert all(len(row) == 5 for row in projected_rows)
    return text


def test_summary_structure_matches_the_json_report(report: Report) -> None:
    doc = report.to_json()
    assert 0 < doc["projected_count"] < doc["layer_count"]
    assert any(layer["similarity"] is None for layer in doc["layers"])
    text = check_structure(report)
    assert text.startswith("## Safe LoRA · <code>")
    assert "(dry run)" in text.splitlines()[0] and "**Dry run:** nothing was written." in text
    assert "τ_k = " in text and f"the {report.num_layers} least similar modules" in text
    assert f"fingerprint <code>{report.base.fingerprint}</code>" in text
    assert "1 with an undefined similarity (never projected)" in text


def test_hostile_names_leave_the_structure_intact(report: Report) -> None:
    bad = hostile(report)
    text = check_structure(bad)
    outside_chart = re.sub(r"```mermaid\n.*?\n```\n", "", text, flags=re.S)
    for raw in ("-->", "<script", "<!-- safelora", "`", "<b>", "](", "%%"):
        assert raw not in outside_chart
    assert "line\\nbreak" in html.unescape(text)
    # The adapter path and the note stay on their own line, as text.
    first = tokens(text)[1]
    assert html.unescape(_rendered(first)).startswith("Safe LoRA · /tmp/ad|apter `x` <b>--> \\n [y]")
    assert "note with | and ` and <!-- and -->\\nsecond line" in [
        _rendered(t) for t in tokens(text)[:-3] if t.type == "inline"
    ]


def test_summary_of_a_written_run_and_of_a_hub_pair(report: Report) -> None:
    hub = dataclasses.replace(report.base, source="org/model", revision="0123abcd" * 5)
    written = dataclasses.replace(report, dry_run=False, written=True, output=Path("out dir"), base=hub)
    text = summary_markdown(written)
    assert "(dry run)" not in text and "**Written:** <code>out dir</code>." in text
    assert f"<code>org/model</code> at commit <code>{'0123abcd' * 5}</code>" in text


def test_summary_without_projected_or_defined_modules(report: Report) -> None:
    kept = dataclasses.replace(report, layers=[dataclasses.replace(x, projected=False) for x in report.layers])
    text = summary_markdown(kept)
    assert "### Projected modules (0)" in text and "None: every module was kept" in text
    assert "module | layer | similarity | ‖CB‖/‖B‖ | chart label" not in tables(text)
    undefined = [dataclasses.replace(x, similarity=None, projected=False, reason="B·A = 0") for x in report.layers]
    text = summary_markdown(dataclasses.replace(report, layers=undefined, threshold=None))
    assert not [t for t in tokens(text) if t.type == "fence"]  # nothing to chart: no fence
    noop = dataclasses.replace(report, layers=[], notes=["already projected with this pair and these settings"])
    text = summary_markdown(noop)
    assert "Projected modules" not in text and "already projected with this pair" in text


def test_error_summary_is_short_and_escaped() -> None:
    text = decision.error_summary_markdown(Path("/x/a|b\n## injected"), "bad `thing` <img src=x> | -->\nmore")
    toks = tokens(text)
    assert [t.type for t in toks] == [
        "heading_open",
        "inline",
        "heading_close",
        "paragraph_open",
        "inline",
        "paragraph_close",
    ]
    assert html.unescape(_rendered(toks[1])) == "Safe LoRA · /x/a|b\\n## injected (failed)"
    assert html.unescape(_rendered(toks[4])) == "Error: bad `thing` <img src=x> | -->\\nmore"


def test_md_escapes_markdown_and_html_but_keeps_names_readable() -> None:
    assert decision.md("model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert decision.md("_em_ a|b <c> `d` [e] \\") == ("&#95;em&#95; a&#124;b &#60;c&#62; &#96;d&#96; &#91;e&#93; &#92;")
    long = "x" * 1000
    assert len(decision.md(long)) == 199 and "…" in decision.md(long)


def test_numbers_are_exact_and_positional() -> None:
    for x in (0.1, 1e-05, -2.5e-07, 0.5716701156148856, 1.0, -0.0):
        text = decision.number(x)
        assert re.fullmatch(_NUMBER, text) and float(text) == x


# --- chart labels ------------------------------------------------------------------------------


def layer(module: str, index: int | None) -> LayerResult:
    return LayerResult(module, index, 0.5, False, None, 1.0)


def test_chart_labels_are_short_unique_and_safe() -> None:
    layers = [
        layer("model.layers.3.self_attn.q_proj", 3),
        layer("model.layers.3.cross_attn.q_proj", 3),
        layer("model.layers.3.mlp.down_proj", 3),
        layer("lm_head", None),
        layer("model.layers.4.mlp.a|b", 4),
        layer("x" * 60, None),
    ]
    assert decision.chart_labels(layers) == [
        "L3 self_attn.q_proj",
        "L3 cross_attn.q_proj",
        "L3 down_proj",
        "lm_head",
        "module 5",
        "module 6",
    ]


def test_chart_labels_of_hostile_names_never_collide(report: Report) -> None:
    labels = decision.chart_labels(hostile(report).layers)
    assert len(set(labels)) == len(labels)
    assert all(re.fullmatch(r"[A-Za-z0-9_. ]+", label) for label in labels)


# --- the table's order -------------------------------------------------------------------------


def test_table_rows_sort_by_similarity_and_filter_projected(report: Report) -> None:
    by_sim = decision.table_rows(report, "similarity")
    sims = [x.similarity for x in by_sim]
    defined = [s for s in sims if s is not None]
    assert defined == sorted(defined) and sims[len(defined) :] == [None] * (len(sims) - len(defined))
    assert decision.table_rows(report) == report.layers
    only = decision.table_rows(report, "layer", projected_only=True)
    assert only == [x for x in report.layers if x.projected] and only


# --- the histogram -----------------------------------------------------------------------------


def _rows(lines: list[str]) -> list[str]:
    return [line for line in lines if line.lstrip().startswith(("(", "undefined"))]


def test_histogram_of_a_real_report(report: Report) -> None:
    sims = [x.similarity for x in report.layers]
    flags = [x.projected for x in report.layers]
    lines = histogram_lines(sims, report.threshold, flags, 60, k=report.num_layers)
    assert all(len(line) <= 60 for line in lines)
    rule = next(i for i, line in enumerate(lines) if "τ_k = " in line and line.startswith("─"))
    above, below = lines[1:rule], lines[rule + 1 : -1]
    # Everything above τ's rule is projected, everything below kept (or undefined).
    assert all("░" not in line for line in above) and any("█" in line for line in above)
    assert all("█" not in line for line in below) and any("░" in line for line in below)
    counts = {"█": 0, "░": 0}
    for line in _rows(lines):
        count = int(line.rsplit(" ", 1)[1]) if line.rstrip()[-1].isdigit() else 0
        counts["█" if "█" in line else "░"] += count if "undefined" not in line else 0
    assert counts == {"█": report.projected_count, "░": 4}
    assert lines[-1] == f"{report.projected_count} projected · 4 kept · 1 undefined · τ_k = {report.threshold} (k = 3)"
    assert _rows(lines)[-1].lstrip().startswith("undefined") and _rows(lines)[-1].endswith(" 1")


@pytest.mark.parametrize("width", [40, 60, 80, 200])
def test_histogram_fits_the_width(width: int) -> None:
    sims: list[float | None] = [i / 50 - 0.3 for i in range(60)] + [None]
    flags = [s is not None and s <= 0.25 for s in sims]
    lines = histogram_lines(sims, 0.25, flags, width, k=17)
    assert all(len(line) <= width for line in lines)
    assert len(_rows(lines)) <= decision.MAX_BINS + 1
    text = "\n".join(lines)
    assert "28 projected · 32 kept · 1 undefined" in text and "τ_k = 0.25 (k = 17)" in text


def test_histogram_degenerate_inputs() -> None:
    assert histogram_lines([], 0.5, [], 60) == []
    none = histogram_lines([None, None], 0.5, [False, False], 60)
    assert "no module has a defined similarity" in none and none[-1] == "0 projected · 0 kept · 2 undefined · τ = 0.5"
    one = histogram_lines([0.3], 0.5, [True], 60)
    assert len(_rows(one)) == 1 and one[-1] == "1 projected · 0 kept · τ = 0.5"
    same = histogram_lines([0.5] * 4, 0.5, [True] * 4, 60)
    assert len(_rows(same)) == 1 and _rows(same)[0].startswith("(0.49, 0.50]") and _rows(same)[0].endswith(" 4")
    # τ outside the data: the rule goes above or below every bin, and the bins do not stretch to it.
    low = histogram_lines([0.8, 0.9], 0.1, [False, False], 60)
    assert low[1].startswith("──── τ = 0.1 ")
    assert _rows(low)[0].startswith("(0.79, 0.80]") and _rows(low)[-1].startswith("(0.89, 0.90]")
    high = histogram_lines([0.1, 0.2], 0.9, [True, True], 60)
    assert high[-2].startswith("──── τ = 0.9 ")
    assert _rows(high)[0].startswith("(0.09, 0.10]") and _rows(high)[-1].startswith("(0.19, 0.20]")
    wide = histogram_lines([-40.0, 30.0], 0.5, [True, False], 60)  # not cosines, but drawn all the same
    assert len(_rows(wide)) <= decision.MAX_BINS and "τ = 0.5" in "\n".join(wide)
    no_tau = histogram_lines([0.1, 0.2], None, [False, False], 60)
    assert not any("τ" in line for line in no_tau)


def test_histogram_bins_follow_the_rounded_decision() -> None:
    # 0.500004 rounds to 0.5 ≤ τ: projected, so it sits above the rule with 0.5 itself; 0.500006 is below.
    lines = histogram_lines([0.500004, 0.5, 0.500006], 0.5, [True, True, False], 60)
    rule = next(i for i, line in enumerate(lines) if line.startswith("────"))
    assert lines[rule - 1].endswith("█ 2") or lines[rule - 1].endswith("██ 2")
    assert "░" in lines[rule + 1] and lines[rule + 1].endswith(" 1")


def test_histogram_ascii() -> None:
    lines = histogram_lines([0.1, 0.7, None], 0.5, [True, False, False], 60, ascii=True)
    assert all(ord(c) < 128 for line in lines for c in line)
    assert "tau = 0.5" in "\n".join(lines) and "#" in "\n".join(lines) and "=" in "\n".join(lines)


# --- appending to a summary file ---------------------------------------------------------------


def test_append_creates_then_appends_in_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.md"
    append_summary(target, "first\n")
    writes: list[int] = []
    real_write = os.write

    def counting(fd: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting)
    append_summary(target, "second ünïcode\n" * 1000)
    assert writes == [len(("second ünïcode\n" * 1000).encode())]
    assert target.read_text() == "first\n" + "second ünïcode\n" * 1000


def test_append_short_write_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", lambda fd, data: len(data) // 2)
    with pytest.raises(ExtraFileError, match=r"only 5 of 10 bytes were appended"):
        append_summary(tmp_path / "s.md", "0123456789")


def test_append_refuses_links_directories_and_devices(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = tmp_path / "link.md"
    link.symlink_to(victim)
    with pytest.raises(ExtraFileError, match=r"link\.md: is a symbolic link, not a regular file"):
        append_summary(link, "x")
    assert victim.read_text() == "precious\n"
    dangling = tmp_path / "dangling.md"
    dangling.symlink_to(tmp_path / "created-through-link")
    with pytest.raises(ExtraFileError, match="symbolic link"):
        append_summary(dangling, "x")
    assert not (tmp_path / "created-through-link").exists()
    with pytest.raises(ExtraFileError, match="is a directory, not a regular file"):
        append_summary(tmp_path, "x")
    with pytest.raises(ExtraFileError, match="is a character device"):
        append_summary(Path("/dev/null"), "x")


_APPEND_SCRIPT = """
import os, sys
from pathlib import Path
from safelora_cli.decision import append_summary
from safelora_cli.errors import ExtraFileError
if sys.argv[2] == "swapped":
    # The file is swapped in after the check: the check saw nothing there, the open must still refuse.
    real_stat = os.stat
    def stat(path, *args, **kwargs):
        if str(path) == sys.argv[1]:
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)
    os.stat = stat
try:
    append_summary(Path(sys.argv[1]), "section\\n")
except ExtraFileError as e:
    print(e)
    sys.exit(1)
"""


@pytest.mark.parametrize("when", ["before", "swapped"])
@pytest.mark.parametrize("reader", [False, True])
def test_append_to_a_fifo_is_refused_without_blocking(tmp_path: Path, reader: bool, when: str) -> None:
    fifo = tmp_path / "summary.md"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader else None
    try:
        done = subprocess.run(
            [sys.executable, "-c", _APPEND_SCRIPT, str(fifo), when], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1, done.stderr
        assert (
            done.stdout.strip()
            == f"{fifo}: is a FIFO, not a regular file; name a regular file (or one that does not exist yet)"
        )
        if fd is not None:
            assert os.read(fd, 100) == b""  # no writer ever opened the pipe: nothing in it
    finally:
        if fd is not None:
            os.close(fd)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_link_swapped_in_after_the_check_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = tmp_path / "summary.md"
    link.symlink_to(victim)
    done = subprocess.run(
        [sys.executable, "-c", _APPEND_SCRIPT, str(link), "swapped"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip().startswith(f"{link}: is a symbolic link, not a regular file")
    assert victim.read_text() == "precious\n"
