"""A refusal of a value that came from --config names the file and the line of its key: every conflict
and invalid value a run finds, not only the ones a config's own reading finds. A value given on the
command line (or to the API) is named as today, without the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from safelora_cli import api
from safelora_cli.errors import OutputError, SafeLoraError, UsageError

Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERMINAL_WIDTH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sanitize.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _one_line(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_revision_for_a_local_base_names_the_config_line(
    cli: Cli, tmp_path: Path, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    base, aligned = llama_pair
    cfg = _config(tmp_path, f"base: {base}\naligned: {aligned}\n\nbase_revision: main\n")
    said = _one_line(cli("project", adapter_dir, "--config", cfg, "--dry-run"), 2)
    assert said.startswith(f"error: {cfg}:4: base revision main: "), said
    assert "local path" in said


def test_a_revision_flag_against_a_local_base_from_the_config_names_the_base_line(
    cli: Cli, tmp_path: Path, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    base, aligned = llama_pair
    cfg = _config(tmp_path, f"aligned: {aligned}\nbase: {base}\n")
    said = _one_line(cli("project", adapter_dir, "--config", cfg, "--base-revision", "main", "--dry-run"), 2)
    assert said.startswith(f"error: {cfg}:2: base revision main: "), said


def test_a_revision_given_twice_in_a_config_names_the_revision_line(
    cli: Cli, tmp_path: Path, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    base, _ = llama_pair
    cfg = _config(tmp_path, f"base: {base}\naligned: org/model@v1\naligned-revision: v2\n")
    said = _one_line(cli("project", adapter_dir, "--config", cfg, "--dry-run"), 2)
    assert said.startswith(f"error: {cfg}:3: aligned: revision given twice"), said


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_output_equal_to_the_adapter_from_a_config_names_the_line(
    cli: Cli, tmp_path: Path, adapter_dir: Path, llama_pair: tuple[Path, Path], dry_run: bool
) -> None:
    base, aligned = llama_pair
    before = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}
    cfg = _config(tmp_path, f"base: {base}\naligned: {aligned}\noutput: {adapter_dir}\n")
    said = _one_line(cli("project", adapter_dir, "--config", cfg, *(["--dry-run"] if dry_run else [])), 1)
    assert said.startswith(f"error: {cfg}:3: {adapter_dir}: is the adapter directory"), said
    assert {p.name: p.read_bytes() for p in adapter_dir.iterdir()} == before


def test_an_output_flag_equal_to_the_adapter_is_named_as_today(
    cli: Cli, tmp_path: Path, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    base, aligned = llama_pair
    cfg = _config(tmp_path, f"base: {base}\naligned: {aligned}\n")
    said = _one_line(cli("project", adapter_dir, "--config", cfg, "--output", adapter_dir), 1)
    assert said.startswith(f"error: {adapter_dir}: is the adapter directory"), said
    assert str(cfg) not in said


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("threshold: 3", "threshold 3: give a number from -1 to 1"),
        ("num-layers: 0", "num_layers 0: give a whole number"),
        ("connections: 0", "connections 0: give a number from 1 to"),
        ("precision: float16", "precision 'float16': choose one of"),
        ("device: tpu", "device 'tpu': choose one of"),
        ("force: maybe", "force 'maybe': give true or false"),
        ("no_cache: maybe", "no_cache must be true or false"),
    ],
)
def test_an_invalid_value_from_a_config_names_the_line_in_the_api(tmp_path: Path, line: str, said: str) -> None:
    cfg = _config(tmp_path, f"base: b\naligned: a\n\n{line}\n")
    with pytest.raises(UsageError, match="^" + re.escape(f"{cfg}:4: {said}")) as refused:
        api.project(tmp_path / "adapter", config=cfg)
    assert "\n" not in str(refused.value) and "--" not in str(refused.value)


def test_an_invalid_keyword_is_named_without_the_config(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "base: b\naligned: a\nthreshold: 0.3\n")
    with pytest.raises(UsageError, match=r"^num_layers 0: give a whole number"):
        api.project(tmp_path / "adapter", config=cfg, num_layers=0)


def test_an_output_equal_to_the_adapter_from_a_config_names_the_line_in_the_api(
    tmp_path: Path, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    base, aligned = llama_pair
    cfg = _config(tmp_path, f"base: {base}\naligned: {aligned}\noutput: {adapter_dir}\n")
    with pytest.raises(OutputError, match="^" + re.escape(f"{cfg}:3: {adapter_dir}: is the adapter directory")):
        api.project(adapter_dir, config=cfg)
    with pytest.raises(OutputError, match="^" + re.escape(f"{cfg}:3: ")):
        api.project([adapter_dir], config=cfg)


def test_an_adapter_refused_for_the_configs_output_names_the_line_in_a_batch(
    tmp_path: Path, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    base, aligned = llama_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("mine")
    cfg = _config(tmp_path, f"base: {base}\naligned: {aligned}\n\noutput: {out}\n")
    (outcome,) = api.project([adapter_dir], config=cfg)
    assert isinstance(outcome, SafeLoraError), outcome
    assert str(outcome).startswith(f"{cfg}:4: {out}: exists and is not empty"), outcome
    assert outcome.adapter == adapter_dir
    assert [p.name for p in out.iterdir()] == ["kept.txt"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("sort: bogus\n", ":2: sort: expected one of"),
        ("precision: float16\n", ":2: precision: expected one of"),
        ("device: tpu\n", ":2: device: expected one of"),
        ("connections: 99\n", ":2: connections: "),
        ("thresold: 0.3\n", ":2: unknown key thresold (did you mean threshold?)"),
    ],
)
def test_the_command_line_names_the_line_of_a_bad_value(cli: Cli, tmp_path: Path, text: str, needle: str) -> None:
    cfg = _config(tmp_path, "base: b\n" + text)
    said = _one_line(cli("project", tmp_path / "adapter", "--config", cfg, "--aligned", "a"), 2)
    assert said.startswith(f"error: {cfg}{needle}"), said


@pytest.mark.parametrize("key", ["plot", "summary"])
def test_a_bad_report_path_from_a_config_names_the_line(cli: Cli, tmp_path: Path, key: str) -> None:
    """--plot and --summary are the command line's own: from a config, their refusal names the line;
    from a flag, the flag as today."""
    bad = tmp_path / ("chart.jpg" if key == "plot" else "a-directory")
    bad.mkdir()
    cfg = _config(tmp_path, f"base: b\naligned: a\n{key}: {bad}\n")
    said = _one_line(cli("project", tmp_path / "adapter", "--config", cfg), 2)
    assert said.startswith(f"error: {cfg}:3: {key} {bad}"), said
    flagged = _one_line(cli("project", tmp_path / "adapter", "--config", cfg, f"--{key}", bad), 2)
    assert flagged.startswith(f"error: --{key} {bad}"), flagged
