"""The documentation in docs/ runs: every ```python block, verbatim, so the docs cannot drift from the code.

Each file's blocks run in order in one namespace, in a scratch working directory, as a reader would
paste them into one session; a traceback names the Markdown file and its line. Shell commands go in
```console blocks, which are not run here. The checks around them keep that promise whole: no Python
hides in a fence this test would skip, and every relative link in docs/ leads to a file that exists.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ("method.md", "hub.md", "cache.md", "design.md", "api.md")
# An opening fence and its language (a closing fence has none); indented fences count too.
_FENCE = re.compile(r"^ *```(?P<lang>[^`\s]*)")
_LANGUAGES = {"python", "console", "text", "json", "yaml"}
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """Every fenced block of a Markdown text: (language, line of its first line of code, its code)."""
    blocks = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip(" "))
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        if end == len(lines):
            raise AssertionError(f"line {i + 1}: a fence that is never closed")
        code = "".join(line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : end])
        blocks.append((opening["lang"], i + 2, code))
        i = end + 1
    return blocks


def python_blocks(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for lang, line, code in fenced_blocks(page.read_text(encoding="utf-8")) if lang == "python"]


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_the_docs_are_there_and_teach_with_code() -> None:
    assert {p.name for p in pages()} >= set(PAGES)
    for name in ("method.md", "cache.md", "hub.md", "api.md"):
        assert python_blocks(DOCS / name), f"{name} has no Python block to run"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_fence_names_a_language_this_test_knows(page: Path) -> None:
    """A block fenced ```py or left bare would escape the run below: every fence says what it holds."""
    for lang, line, _ in fenced_blocks(page.read_text(encoding="utf-8")):
        assert lang in _LANGUAGES, f"{page.name}:{line - 1}: fence language {lang!r}; use one of {sorted(_LANGUAGES)}"


@pytest.mark.parametrize("page", [p for p in pages() if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for line, code in python_blocks(page):
        # Padded so that a traceback's line numbers are the Markdown file's.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_relative_links_lead_to_files_in_the_repository(page: Path) -> None:
    for m in _LINK.finditer(page.read_text(encoding="utf-8")):
        target = m["target"].split("#", 1)[0]
        if not target or re.match(r"^[a-z]+:", target):
            continue
        path = (page.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{page.name}: link to {m['target']} leads nowhere"


def test_no_file_cites_a_document_the_repository_does_not_have() -> None:
    """Code, tests and docs stand alone: the method and the Hub protocol are described in docs/."""
    missing = ("SPEC" + ".md", "HUB_TESTING" + ".md")
    here = Path(__file__).resolve()
    files = [ROOT / "README.md", *DOCS.rglob("*.md")]
    for folder in ("src", "tests", "benchmarks", "configs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml") and p != here]
    cited = [f"{p.relative_to(ROOT)} cites {name}" for p in files for name in missing if name in p.read_text("utf-8")]
    assert not cited, cited


def _render_module() -> Any:
    """docs/examples/render.py, which `make docs` runs."""
    spec = importlib.util.spec_from_file_location("render", DOCS / "examples" / "render.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    return render


def test_the_summary_example_is_what_the_demo_writes() -> None:
    """docs/examples/summary.md is the demo's real step summary: regenerated here, it must be equal
    (after a change to the summary or the demo, `make docs` regenerates it and the plot)."""
    render = _render_module()
    committed = (DOCS / "examples" / "summary.md").read_text(encoding="utf-8")
    fresh = render.demo_report().summary_markdown()
    # The chart's similarities are printed digit for digit, and the last digits of a float32 sum
    # depend on the CPU's vector width and thread count: those compare to 6 decimals.
    assert _rounded(fresh) == _rounded(committed), "run `make docs` and commit docs/examples/"
    png = (DOCS / "examples" / "similarity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _rounded(text: str) -> str:
    return re.sub(r"\d+\.\d{7,}", lambda m: f"{float(m[0]):.6f}", text)


def _readme_block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```text\n", text.index(marker)) + len("```text\n")
    return text[start : text.index("```", start)]


def test_the_readme_shows_the_demos_real_histogram_and_summary() -> None:
    from safelora_cli.outputs.histogram import histogram_lines

    report = _render_module().demo_report()
    lines = histogram_lines(
        [layer.similarity for layer in report.layers],
        report.threshold,
        [layer.projected for layer in report.layers],
        100,
    )
    assert _readme_block_after("This is `make demo`'s:") == "\n".join(lines) + "\n"
    opening = _readme_block_after("[docs/examples/summary.md](docs/examples/summary.md), opens with")
    assert (DOCS / "examples" / "summary.md").read_text(encoding="utf-8").startswith(opening)
