"""A newcomer's first hour: what a first-time user meets, point by point — suspicious pairs, the
table at any width, --json whatever happens, help, wording and feedback, and `make demo` twice."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from rich.console import Console
from support.run import project_adapter
from typer.testing import Result

from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.api import Report
from safelora_cli.cli import _options as cli_options
from safelora_cli.cli import app
from safelora_cli.cli import render as report
from safelora_cli.results import Settings
from safelora_cli.run import pipeline
from safelora_cli.sources import open_local

Cli = Callable[..., Result]
ROOT = Path(__file__).resolve().parent.parent


def _pair(llama_pair: tuple[Path, Path]) -> list[str]:
    base, aligned = llama_pair
    return ["--base", str(base), "--aligned", str(aligned)]


def _one_error(r: Result, code: int = 1) -> str:
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# --- suspicious pairs ----------------------------------------------------------------------------


def test_base_and_aligned_naming_one_checkpoint_is_refused(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    _, aligned = llama_pair
    link = tmp_path / "chat-link"
    link.symlink_to(aligned)
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    for other in (aligned, link):  # the same directory, by its path or through a link
        line = _one_error(cli("project", adapter_dir, "--base", other, "--aligned", aligned))
        assert "are the same checkpoint: every V = W_aligned − W_base would be 0" in line
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before


def test_a_base_that_is_the_adapters_own_model_may_be_swapped(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path
) -> None:
    base, aligned = llama_pair  # the adapter was trained on `aligned` (its base_model_name_or_path)
    r = cli("project", adapter_dir, "--base", aligned, "--aligned", base, "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    [note] = [n for n in json.loads(r.stdout)["notes"] if "swapped" in n]
    assert note.startswith(f"base {aligned} is the model the adapter was trained on")
    r = cli("project", adapter_dir, "--base", aligned, "--aligned", base, "--dry-run")
    assert "note: base " in r.stdout and "may be swapped" in r.stdout
    r = cli("project", adapter_dir, *_pair(llama_pair), "--dry-run", "--json")
    assert not [n for n in json.loads(r.stdout)["notes"] if "swapped" in n]


# --- the table at any width ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_report(llama_pair: tuple[Path, Path], llama_adapter: Path) -> Report:
    base, aligned = llama_pair
    settings = Settings(mode="number", num_layers=3, dry_run=True)
    return project_adapter(llama_adapter, open_local(base), open_local(aligned), settings)


def _rendered(rep: Report, width: int, **options: object) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None, record=True)
    report.render(rep, console, **options)  # type: ignore[arg-type]
    return console.export_text()


def _header(text: str) -> list[str]:
    [header] = [line for line in text.splitlines() if line.lstrip().startswith("module ")]
    return header.split()


@pytest.mark.parametrize(
    ("width", "columns"),
    [
        (60, ["module", "similarity", "proj."]),
        (80, ["module", "layer", "similarity", "proj.", "‖CB‖/‖B‖"]),
        (120, ["module", "layer", "similarity", "proj.", "‖CB‖/‖B‖"]),
    ],
)
def test_the_table_keeps_module_similarity_and_projected_at_any_width(
    dry_report: Report, width: int, columns: list[str]
) -> None:
    text = _rendered(dry_report, width)
    heading, *rest = text.splitlines()
    assert heading == f"Safe LoRA · {dry_report.adapter}"  # a path: one line, the terminal wraps it
    assert all(len(line) <= width for line in rest), text
    assert _header(text) == columns
    bar = width >= 80
    for layer in dry_report.layers:
        [row] = [line for line in text.splitlines() if line.startswith(f" {layer.module} ")]
        assert f"{layer.similarity:.5f}" in row  # whole, never cut
        assert row.rstrip().split()[-1 if width == 60 else -2] == ("yes" if layer.projected else "no")
        assert ("█" in row or "·" in row) == bar  # the bar goes first, then the ratio
    assert "3 projected · 5 kept" in text  # the histogram fits too


def test_plain_output_never_wraps(cli: Cli, llama_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A pipe or a CI log has no width: a long path or module name stays on its line, whole."""
    from safelora_cli import demo

    root = tmp_path / ("a-rather-long-directory-name-" * 6).rstrip("-")
    base, aligned, adapter = demo.build(root)
    r = cli("project", adapter, "--base", base, "--aligned", aligned, "--dry-run")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"Safe LoRA · {adapter}" in lines  # one line, whole
    assert any(line.startswith("would project") and line.endswith(" s") for line in lines)
    assert len(f"Safe LoRA · {adapter}") > 200  # wider than any terminal's default


# --- --json always gives JSON --------------------------------------------------------------------


def test_json_failures_are_the_batch_error_object(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    # An input error of one adapter: the object, on stdout; the line on stderr.
    broken = tmp_path / "broken"
    broken.mkdir()
    r = cli("project", broken, *_pair(llama_pair), "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert set(doc) == {"adapter", "error"} and doc["adapter"] == str(broken)
    assert r.stderr.startswith("error: ")

    # A checkpoint error (every adapter fails): one object per adapter, one per line.
    other = Path(shutil.copytree(adapter_dir, tmp_path / "other"))
    r = cli("project", adapter_dir, other, "--base", tmp_path / "nope", "--aligned", llama_pair[1], "--json")
    assert r.exit_code == 1
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["adapter"] for d in docs] == [str(adapter_dir), str(other)]
    assert all("nope" in d["error"] for d in docs)

    # check and inspect too.
    for command in (["check", broken, "--json"], ["inspect", broken, "--json"], ["restore", broken, "--json"]):
        r = cli(*command)
        assert r.exit_code == 1, command
        assert set(json.loads(r.stdout)) == {"adapter", "error"}, command

    # A usage error (exit 2): nothing on stdout.
    r = cli("project", adapter_dir, *_pair(llama_pair), "--json", "--threshold", "2")
    assert r.exit_code == 2 and r.stdout == ""


# --- help ---------------------------------------------------------------------------------------

COMMANDS = ["project", "check", "inspect", "restore", "demo", "cache ls", "cache rm", "cache clear"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples_defaults_and_no_odd_metavars(cli: Cli, command: str) -> None:
    short = cli(*command.split(), "-h")
    assert short.exit_code == 0
    long = cli(*command.split(), "--help")
    assert long.stdout == short.stdout
    text = long.stdout
    assert not re.search(r"<(bool|list\[str\]|str|int|float|path)>", text, re.I), text
    if not command.startswith("cache"):
        assert "Examples:" in text and f"safelora {command}" in text.split("Examples:", 1)[1]


def test_project_help_shows_the_defaults(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    text = cli("project", "--help").stdout
    assert "[default: 0.5]" in text
    assert "[default: float32]" in text and "[default: auto]" in text and "[default: layer]" in text


@pytest.mark.parametrize("command", ["project", "check", "inspect", "restore"])
def test_adapters_are_positional_or_given_with_adapter(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, command: str
) -> None:
    extra = {"project": [*_pair(llama_pair), "--dry-run", "--no-cache"]}.get(command, [])
    a = cli(command, adapter_dir, *extra, "--json")
    b = cli(command, "--adapter", adapter_dir, *extra, "--json")
    assert a.exit_code == b.exit_code
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    da.pop("seconds", None), db.pop("seconds", None)
    assert da == db


def test_completion_offers_presets_devices_precisions_and_sorts() -> None:
    assert "llama-2-7b" in cli_options.complete_preset("llama-2")
    assert cli_options.complete(cli_options.DEVICES)("c") == ["cpu", "cuda"]
    assert cli_options.complete(cli_options.PRECISIONS)("float6") == ["float64"]
    command = typer.main.get_command(app)
    project = command.commands["project"]  # type: ignore[attr-defined]
    by_name = {p.name: p for p in project.params}
    assert by_name["sort"].shell_complete(None, "s")[0].value == "similarity"  # type: ignore[arg-type]


# --- wording and feedback ------------------------------------------------------------------------


def test_dry_run_says_would_project(cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path) -> None:
    r = cli("project", adapter_dir, *_pair(llama_pair), "--dry-run", "--num-layers", "3")
    assert re.search(
        r"^would project 3 of 8 modules \(k = 3, τ_k = [0-9.]+\); dry run, nothing written", r.stdout, re.M
    )


def test_ctrl_c_exits_130_and_says_the_adapter_is_unchanged(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "project_adapters", interrupted)
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    r = cli("project", adapter_dir, *_pair(llama_pair))
    assert r.exit_code == 130
    assert r.stderr == f"interrupted; unchanged: {adapter_dir}\n"
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before


def test_the_progress_display_has_a_spinner_and_an_eta() -> None:
    from rich.progress import SpinnerColumn, TimeRemainingColumn

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    display = report.RunDisplay(console)
    columns = display._modules.columns
    assert any(isinstance(c, SpinnerColumn) for c in columns)
    assert any(isinstance(c, TimeRemainingColumn) for c in columns)
    with display:  # a spinner from the start, before the first module
        assert display._live is not None


def test_hints_name_hf_download_never_the_deprecated_cli() -> None:
    sources = [p.read_text() for p in (ROOT / "src").rglob("*.py")] + [(ROOT / "README.md").read_text()]
    assert not any("huggingface-cli" in text for text in sources)
    assert any("hf download" in text for text in sources)


def test_the_readme_explains_the_ratio_column_correctly() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "not an orthogonal projection" in text and "can exceed 1" in text


# --- make demo ---------------------------------------------------------------------------------


def test_make_demo_rebuilds_demo_and_runs_twice(tmp_path: Path) -> None:
    """The Makefile's demo recipe, run twice as written (with this venv's safelora): demo/ is
    rebuilt each time and every command it suggests runs against files that exist."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "no demo target"
    bin_dir = str(Path(sys.executable).parent)
    commands = [line.strip().replace("$(BIN)", bin_dir) for line in recipe[1].splitlines()]
    assert commands[0] == "rm -rf demo"
    for _ in range(2):
        out = subprocess.run(["bash", "-ec", "\n".join(commands)], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "demo" / "sanitized" / ADAPTER_FILE).is_file()
    # Run as the recipe runs it (by its path), so that is how the suggestions call it: they paste as they are.
    program = str(Path(bin_dir) / "safelora")
    suggested = re.findall(r"^  (\S*safelora .*?)(?:\s+#.*)?$", out.stdout, re.M)
    assert len(suggested) >= 4
    for command in suggested:
        argv = shlex.split(command)
        assert argv[0] == program, command
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, (command, run.stderr)
    assert "/demo/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_readme_documents_demo_keep() -> None:
    assert "safelora demo --keep demo" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("sort", "size", "layer, similarity"),
        ("precision", "float16", "float32, float64"),
        ("device", "tpu", "auto, cpu, cuda"),
    ],
)
def test_a_bad_choice_in_a_config_names_the_file_line_and_key(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path, key: str, value: str, choices: str
) -> None:
    config = tmp_path / "safelora.yaml"
    config.write_text(f"dry_run: true\n{key}: {value}\n")
    r = cli("project", adapter_dir, *_pair(llama_pair), "--config", config)
    assert r.exit_code == 2
    assert r.stderr == f"error: {config}:2: {key}: expected one of {choices}\n"
