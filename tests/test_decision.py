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
from support.run import project_adapter

from safelora_cli import __version__
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.api import LayerResult, Report
from safelora_cli.errors import ExtraFileError
from safelora_cli.outputs import histogram, markdown, summary, table
from safelora_cli.outputs.histogram import histogram_lines
from safelora_cli.outputs.summary import append_summary, summary_markdown
from safelora_cli.outputs.text import printable
from safelora_cli.results import Settings
from safelora_cli.sources import open_local

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
    # Named by content, never by this machine's paths or file stat (issue 18).
    assert f"<code>base</code>, content <code>blake3:{report.base.content[:16]}</code>" in text
    assert report.base.fingerprint not in text
    assert "1 with an undefined similarity (never projected)" in text


def test_hostile_names_leave_the_structure_intact(report: Report) -> None:
    bad = hostile(report)
    text = check_structure(bad)
    outside_chart = re.sub(r"```mermaid\n.*?\n```\n", "", text, flags=re.S)
    for raw in ("-->", "<script", "<!-- safelora", "`", "<b>", "](", "%%"):
        assert raw not in outside_chart
    assert "line\\nbreak" in html.unescape(text)
    # The adapter's name (an absolute path is never published) and the note stay on their own line, as text.
    first = tokens(text)[1]
    assert html.unescape(_rendered(first)).startswith("Safe LoRA · ad|apter `x` <b>--> \\n [y]")
    assert "note with | and ` and <!-- and -->\\nsecond line" in [
        _rendered(t) for t in tokens(text)[:-3] if t.type == "inline"
    ]


def test_summary_of_a_written_run_and_of_a_hub_pair(report: Report) -> None:
    hub = dataclasses.replace(report.base, source="org/model", name="org/model", revision="0123abcd" * 5)
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
    text = summary.error_summary_markdown(Path("/x/a|b\n## injected"), "bad `thing` <img src=x> | -->\nmore")
    toks = tokens(text)
    assert [t.type for t in toks] == [
        "heading_open",
        "inline",
        "heading_close",
        "paragraph_open",
        "inline",
        "paragraph_close",
    ]
    assert html.unescape(_rendered(toks[1])) == "Safe LoRA · a|b\\n## injected (failed)"
    assert html.unescape(_rendered(toks[4])) == "Error: bad `thing` <img src=x> | -->\\nmore"


def test_md_escapes_markdown_and_html_but_keeps_names_readable() -> None:
    assert markdown.md("model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert markdown.md("_em_ a|b <c> `d` [e] \\") == ("&#95;em&#95; a&#124;b &#60;c&#62; &#96;d&#96; &#91;e&#93; &#92;")
    long = "x" * 1000
    assert len(markdown.md(long)) == 199 and "…" in markdown.md(long)


def test_numbers_are_exact_and_positional() -> None:
    for x in (0.1, 1e-05, -2.5e-07, 0.5716701156148856, 1.0, -0.0):
        text = markdown.number(x)
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
    assert summary.chart_labels(layers) == [
        "L3 self_attn.q_proj",
        "L3 cross_attn.q_proj",
        "L3 down_proj",
        "lm_head",
        "module 5",
        "module 6",
    ]


def test_chart_labels_of_hostile_names_never_collide(report: Report) -> None:
    labels = summary.chart_labels(hostile(report).layers)
    assert len(set(labels)) == len(labels)
    assert all(re.fullmatch(r"[A-Za-z0-9_. ]+", label) for label in labels)


# --- the table's order -------------------------------------------------------------------------


def test_table_rows_sort_by_similarity_and_filter_projected(report: Report) -> None:
    by_sim = table.table_rows(report, "similarity")
    sims = [x.similarity for x in by_sim]
    defined = [s for s in sims if s is not None]
    assert defined == sorted(defined) and sims[len(defined) :] == [None] * (len(sims) - len(defined))
    assert table.table_rows(report) == report.layers
    only = table.table_rows(report, "layer", projected_only=True)
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
    assert len(_rows(lines)) <= histogram.MAX_BINS + 1
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
    assert len(_rows(wide)) <= histogram.MAX_BINS and "τ = 0.5" in "\n".join(wide)
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
from safelora_cli.outputs.summary import append_summary
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


# --- the command line: --summary, --plot, --model-card, --sort, --projected-only ---------------

Cli = Any


def _pair(llama_pair: tuple[Path, Path]) -> list[str]:
    base, aligned = llama_pair
    return ["--base", str(base), "--aligned", str(aligned)]


def _sections(text: str) -> list[str]:
    """The summary file cut into its sections (each starts with its ``## Safe LoRA`` heading)."""
    starts = [m.start() for m in re.finditer(r"^## Safe LoRA", text, re.M)]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _sha(path: Path) -> bytes:
    return path.read_bytes()


def _check_section(section: str, doc: dict[str, Any]) -> None:
    """One adapter's section: its chart and projected table hold exactly what its JSON report says."""
    labels, bars, line = chart(section)
    charted = [layer for layer in doc["layers"] if layer["similarity"] is not None]
    assert bars == [layer["similarity"] for layer in charted]
    assert line == [doc["threshold"]] * len(charted)
    legend = {
        row[1]: row[2]
        for row in tables(section)["# | chart label | module | layer | similarity | projected | ‖CB‖/‖B‖"]
    }
    assert [legend[label] for label in labels] == [layer["module"] for layer in charted]
    projected = tables(section)["module | layer | similarity | ‖CB‖/‖B‖ | chart label"]
    assert [row[0] for row in projected] == [layer["module"] for layer in doc["layers"] if layer["projected"]]


def test_summary_flag_appends_one_section_per_adapter(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    other = Path(shutil.copytree(adapter_dir, tmp_path / "other"))
    summary = tmp_path / "summary.md"
    summary.write_text("# CI job\n\n")
    r = cli("project", adapter_dir, other, *_pair(llama_pair), "--dry-run", "--json", "--summary", summary)
    assert r.exit_code == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    text = summary.read_text()
    assert text.startswith("# CI job\n\n")  # appended, never truncated
    sections = _sections(text)
    assert len(sections) == 2
    for section, doc in zip(sections, docs, strict=True):
        assert section.startswith(f"## Safe LoRA · {markdown.code(Path(doc['adapter']).name)} (dry run)")
        assert "**Dry run:** nothing was written." in section
        _check_section(section, doc)


def test_github_step_summary_is_the_default_and_quiet_does_not_stop_it(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    r = cli("project", adapter_dir, *_pair(llama_pair), "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    [section] = _sections(step.read_text())
    assert "**Written:**" in section and "(dry run)" not in section.splitlines()[0]

    explicit = tmp_path / "explicit.md"
    before = step.read_bytes()
    r = cli("project", adapter_dir, *_pair(llama_pair), "--dry-run", "-q", "--summary", explicit)
    assert r.exit_code == 0, r.stderr
    assert step.read_bytes() == before  # --summary wins over the environment
    assert len(_sections(explicit.read_text())) == 1

    r = cli("check", adapter_dir, *_pair(llama_pair))
    assert r.exit_code == 0, r.stderr
    assert step.read_bytes() == before  # check writes no summary


def test_a_failed_adapter_gets_a_short_section_with_its_error(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken|`-->"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{")
    summary = tmp_path / "summary.md"
    r = cli("project", adapter_dir, "--adapter", broken, *_pair(llama_pair), "--dry-run", "-q", "--summary", summary)
    assert r.exit_code == 1
    ok, failed = _sections(summary.read_text())
    assert "(dry run)" in ok.splitlines()[0]
    assert failed.splitlines()[0].endswith("(failed)")
    assert "**Error:**" in failed and "adapter_config.json" in failed
    assert not [t for t in tokens(failed) if t.type in ("fence", "table_open")]
    assert [t.tag for t in tokens(failed) if t.type == "heading_open"] == ["h2"]

    # A run that fails as a whole (no such base) still says so, once per adapter.
    whole = tmp_path / "whole.md"
    r = cli("project", adapter_dir, "--base", tmp_path / "nope", "--aligned", llama_pair[1], "-q", "--summary", whole)
    assert r.exit_code == 1
    [section] = _sections(whole.read_text())
    assert "(failed)" in section.splitlines()[0] and "nope" in section


def test_a_summary_path_that_is_no_regular_file_stops_the_run_before_anything(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "summary.md"
    link.symlink_to(victim)
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    r = cli("project", adapter_dir, *_pair(llama_pair), "--summary", link)
    assert r.exit_code == 2
    assert r.stderr.startswith("error: --summary ") and "symbolic link" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before
    assert victim.read_text() == "precious"


def test_a_summary_that_fails_after_the_write_is_a_warning(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(not_a_dir / "summary.md"))
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    r = cli("project", adapter_dir, *_pair(llama_pair), "--plot", not_a_dir / "chart.png")
    assert r.exit_code == 0, r.stderr
    assert (adapter_dir / ADAPTER_FILE).read_bytes() != before  # projected, and the exit code says so
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings), r.stderr
    assert "step summary was not written" in warnings[0] and "chart.png" in warnings[1]


def test_plot_flag_one_file_per_adapter(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    import shutil

    r = cli("project", adapter_dir, *_pair(llama_pair), "--dry-run", "--plot", tmp_path / "one.svg")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "one.svg").read_bytes().startswith(b"<?xml")
    assert f"plot written to {tmp_path / 'one.svg'}" in r.stdout

    other = Path(shutil.copytree(adapter_dir, tmp_path / "other"))
    r = cli("project", adapter_dir, other, *_pair(llama_pair), "--dry-run", "-q", "--plot", tmp_path / "many.png")
    assert r.exit_code == 0, r.stderr
    for i in (1, 2):
        assert (tmp_path / f"many-{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "many.png").exists()


@pytest.mark.parametrize("matplotlib_missing", [False, True])
def test_a_plot_that_cannot_be_drawn_stops_the_run_before_anything(
    cli: Cli,
    llama_pair: tuple[Path, Path],
    adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    matplotlib_missing: bool,
) -> None:
    target = tmp_path / "plots" / "chart.png"
    if matplotlib_missing:
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        expected = "error: --plot needs matplotlib, which is not installed: pip install 'safelora[plot]'\n"
    else:
        target = target.with_suffix(".jpg")
        expected = f"error: --plot {target}: the chart is written as FILE.png or FILE.svg\n"
    before = {p: p.read_bytes() for p in adapter_dir.iterdir()}
    r = cli("project", adapter_dir, *_pair(llama_pair), "--summary", tmp_path / "s.md", "--plot", target)
    assert r.exit_code == 2
    assert r.stderr == expected
    assert {p: p.read_bytes() for p in adapter_dir.iterdir()} == before
    assert not (tmp_path / "s.md").exists() and not target.parent.exists()


def test_model_card_flag_in_place_rerun_and_restore(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    card_file = adapter_dir / "README.md"
    original = card_file.read_bytes()
    r = cli("project", adapter_dir, *_pair(llama_pair), "--model-card", "-q")
    assert r.exit_code == 0, r.stderr
    text = card_file.read_text()
    assert text.count("<!-- safelora:begin") == 1 and text.count("<!-- safelora:end -->") == 1
    assert "safelora" in text.split("---")[1]  # tagged in the front matter
    assert "## Safe LoRA" in text

    r = cli("project", adapter_dir, *_pair(llama_pair), "--num-layers", "2", "--model-card", "-q")
    assert r.exit_code == 0, r.stderr  # re-projected from the kept original
    again = card_file.read_text()
    assert again.count("<!-- safelora:begin") == 1 and again != text  # replaced, never duplicated

    r = cli("restore", adapter_dir, "--json")
    assert r.exit_code == 0, r.stderr
    assert card_file.read_bytes() == original  # section and tag gone again, the rest byte for byte

    out = tmp_path / "sanitized"
    r = cli("project", adapter_dir, *_pair(llama_pair), "--model-card", "--output", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert card_file.read_bytes() == original  # the source is left alone
    assert (out / "README.md").read_text().count("<!-- safelora:begin") == 1


def test_dry_run_writes_no_card(cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path) -> None:
    before = {p: p.read_bytes() for p in adapter_dir.iterdir()}
    r = cli("project", adapter_dir, *_pair(llama_pair), "--model-card", "--dry-run", "-q")
    assert r.exit_code == 0, r.stderr
    assert {p: p.read_bytes() for p in adapter_dir.iterdir()} == before


def _table_modules(stdout: str) -> list[str]:
    return re.findall(r"^ (model\.layers\.\d+\.self_attn\.\w+) ", stdout, re.M)


def test_sort_and_projected_only_order_the_table(cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path) -> None:
    import json

    args = ["project", adapter_dir, *_pair(llama_pair), "--dry-run", "--num-layers", "3"]
    doc = json.loads(cli(*args, "--json").stdout)
    layers = doc["layers"]
    assert _table_modules(cli(*args).stdout) == [layer["module"] for layer in layers]
    by_similarity = sorted(layers, key=lambda layer: layer["similarity"])
    assert _table_modules(cli(*args, "--sort", "similarity").stdout) == [layer["module"] for layer in by_similarity]
    projected = [layer["module"] for layer in by_similarity if layer["projected"]]
    shown = _table_modules(cli(*args, "--sort", "similarity", "--projected-only").stdout)
    assert shown == projected and len(shown) == 3
    # The JSON report is the same whatever the table shows (all served from the cache by now).
    again = json.loads(cli(*args, "--json", "--sort", "similarity", "--projected-only").stdout)["layers"]
    assert again == [{**layer, "cached": True} for layer in layers]
    r = cli(*args, "--sort", "size")
    assert r.exit_code == 2 and "layer, similarity" in r.stderr


def test_the_histogram_is_below_the_table(cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path) -> None:
    r = cli("project", adapter_dir, *_pair(llama_pair), "--dry-run", "--num-layers", "3")
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert "\x1b" not in out  # not a terminal: no colour codes
    table_end = out.rindex(_table_modules(out)[-1])
    histogram = out[table_end:]
    assert "similarity:  █ projected  ░ kept" in histogram
    assert re.search(r"^─+ τ_k = 0\.\d+ \(k = 3\) ─+$", histogram, re.M)
    assert re.search(r"^3 projected · 5 kept · τ_k = 0\.\d+ \(k = 3\)$", histogram, re.M)


def test_config_file_keys_for_the_extras(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "safelora.yaml"
    summary, chart_file, out = tmp_path / "s.md", tmp_path / "c.svg", tmp_path / "out"
    config.write_text(
        f"summary: {summary}\nplot: {chart_file}\nmodel_card: true\nsort: similarity\nprojected-only: true\n"
        f"output: {out}\nnum_layers: 2\n"
    )
    r = cli("project", adapter_dir, *_pair(llama_pair), "--config", config)
    assert r.exit_code == 0, r.stderr
    assert len(_sections(summary.read_text())) == 1
    assert chart_file.read_bytes().startswith(b"<?xml")
    assert "<!-- safelora:end -->" in (out / "README.md").read_text()
    assert len(_table_modules(r.stdout)) == 2  # only the projected modules


def test_the_api_offers_the_same(llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path) -> None:
    import safelora_cli
    from safelora_cli.outputs import card

    base, aligned = llama_pair
    out = tmp_path / "out"
    report = safelora_cli.project(adapter_dir, base=base, aligned=aligned, output=out, model_card=True)
    assert report.summary_markdown() == summary_markdown(report)
    assert report.card_section() == card.card_section(report)
    # The card holds the section (its begin marker also records the tag safelora added).
    assert report.card_section().split("\n", 1)[1] in (out / "README.md").read_text()
    report.plot(tmp_path / "chart.svg")
    assert (tmp_path / "chart.svg").read_bytes().startswith(b"<?xml")
    assert report.to_json()["precision"] == "float32"
    assert safelora_cli.check(out, base=base, aligned=aligned).ok  # paths, as Path objects, work throughout
