"""Help that fits and usage errors that are short: every command's --help at 80 columns names every
option in full, in panels; a usage error on a pipe is three plain lines; a conflict from --config names
the file and line; inspect and cache ls take their width from COLUMNS on a pipe.

The commands are found in the app itself, so a command or option added later is held to the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.core import TyperCommand, TyperGroup, TyperOption
from typer.testing import Result

from safelora_cli import api
from safelora_cli.cli import _options, app
from safelora_cli.errors import ConfigError

Cli = Callable[..., Result]
Command = TyperCommand | TyperGroup

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BOX = re.compile(r"[╭╮╰╯│─┌┐└┘]")
# Rich decides a terminal from these as well as from isatty: the tests below say which they mean.
TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERMINAL_WIDTH")


def _commands() -> Iterator[tuple[list[str], Command]]:
    """Every command and group registered in the app, by its path of names (``["cache", "ls"]``)."""
    stack: list[tuple[list[str], Command]] = [([], typer.main.get_command(app))]
    while stack:
        path, command = stack.pop()
        yield path, command
        if isinstance(command, TyperGroup):
            stack.extend(([*path, name], sub) for name, sub in command.commands.items())


COMMANDS = sorted(_commands(), key=lambda found: found[0])
LEAVES = [(path, command) for path, command in COMMANDS if not isinstance(command, TyperGroup)]


def _ids(found: list[tuple[list[str], Command]]) -> list[str]:
    return [" ".join(path) or "safelora" for path, _ in found]


@pytest.fixture
def pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipe, whatever the environment of the test run says (CI sets FORCE_COLOR)."""
    for key in TERMINAL_ENV:
        monkeypatch.delenv(key, raising=False)


def _names(command: Command) -> list[str]:
    return [name for p in command.params for name in (*p.opts, *p.secondary_opts) if name.startswith("-")]


def _text(result: Result, stream: str = "stdout") -> str:
    return ANSI.sub("", getattr(result, stream))


# --- help that fits ------------------------------------------------------------------------------


def test_every_command_is_found() -> None:
    found = {" ".join(path) for path, _ in COMMANDS}
    assert {"project", "check", "inspect", "restore", "demo", "cache", "cache ls", "cache rm", "cache clear"} <= found


# project's panels hold option names too wide for Typer's table at 60 columns; these fit.
NARROW_NAMES = ("", "check", "inspect", "restore", "demo", "cache", "cache ls", "cache rm", "cache clear")
NARROW = [(path, command) for path, command in COMMANDS if " ".join(path) in NARROW_NAMES]


@pytest.mark.usefixtures("pipe")
@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=_ids(COMMANDS))
def test_help_fits_80_columns_and_names_every_option_in_full(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, path: list[str], command: Command
) -> None:
    _fits(cli, monkeypatch, path, command, 80)


@pytest.mark.usefixtures("pipe")
@pytest.mark.parametrize(("path", "command"), NARROW, ids=_ids(NARROW))
def test_help_of_the_smaller_commands_fits_60_columns(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, path: list[str], command: Command
) -> None:
    _fits(cli, monkeypatch, path, command, 60)


def _fits(cli: Cli, monkeypatch: pytest.MonkeyPatch, path: list[str], command: Command, columns: int) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    result = cli(*path, "--help")
    assert result.exit_code == 0, result.stderr
    text = _text(result)
    too_long = [line for line in text.splitlines() if len(line) > columns]
    assert not too_long, "\n".join(too_long)
    # Rich marks what it cuts with an ellipsis; no help text uses one, so any is a cut.
    assert "…" not in text, text
    assert not re.search(r"<(bool|list\[str\]|str|int|float|path)>", text), text
    for name in _names(command):
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} missing or cut:\n{text}"


@pytest.mark.parametrize(("path", "command"), LEAVES, ids=_ids(LEAVES))
def test_every_option_is_in_a_named_panel(path: list[str], command: Command) -> None:
    """A new option needs only its ``rich_help_panel``; one that has none (or a new name) fails here."""
    for param in command.params:
        if isinstance(param, TyperOption):
            assert getattr(param, "rich_help_panel", None) in _options.PANELS, (path, param.name)


@pytest.mark.usefixtures("pipe")
def test_project_help_shows_its_panels_in_order(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = _text(cli("project", "--help"))
    titles = re.findall(r"^╭─ (\w+)", text, re.M)
    assert titles == ["Arguments", "Inputs", "Selection", "Output", "Reports", "Hub", "Advanced"]
    inputs = text.split("╭─ Inputs", 1)[1].split("╰", 1)[0]
    assert "--base" in inputs and "--aligned" in inputs and "--config" in inputs and "--threshold" not in inputs
    hub = text.split("╭─ Hub", 1)[1].split("╰", 1)[0]
    assert "--aligned-revision" in hub and "--token" in hub and "--connections" in hub


# --- usage errors --------------------------------------------------------------------------------


@pytest.mark.usefixtures("pipe")
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("project", "--thresold", "0.3"), "No such option: --thresold. Did you mean --threshold?"),
        (("cache", "ls", "--modles"), "No such option: --modles. Did you mean --modules?"),
        (("check", "--trust-stmp"), "Did you mean --trust-stamp?"),
        (("projct",), "Did you mean 'project'?"),
        (("project", "a", "--threshold", "0.3", "--num-layers", "2"), "not both"),
        (("project", "a", "--precision", "float16"), "float32, float64"),
        (("cache", "rm"), "Missing argument"),
        (("--no-such-flag",), "No such option: --no-such-flag"),
    ],
)
def test_a_usage_error_on_a_pipe_is_three_plain_lines(cli: Cli, args: tuple[str, ...], said: str) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) <= 3, result.stderr
    assert not BOX.search(result.stderr) and not ANSI.search(result.stderr), result.stderr
    assert lines[0].startswith("Usage: ")  # the program's name is the runner's here
    assert re.fullmatch(r"Try '\w+( \w+)* -h' for help\.", lines[1]), lines[1]
    assert lines[2].startswith("error: ") and said in lines[2]
    assert result.stdout == ""


@pytest.mark.usefixtures("pipe")
def test_called_not_to_exit_the_app_raises_its_usage_errors_as_click_does() -> None:
    with pytest.raises(typer.BadParameter.__mro__[1], match="Did you mean --threshold"):  # Click's UsageError
        app(["project", "--thresold", "0.3"], standalone_mode=False)


@pytest.mark.usefixtures("pipe")
def test_on_a_terminal_a_usage_error_keeps_its_box_and_the_suggestion(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    result = cli("project", "--thresold", "0.3")
    assert result.exit_code == 2
    text = _text(result, "stderr")
    assert "╭" in text and "Did you mean --threshold?" in text
    assert "Possible options" not in text


@pytest.mark.usefixtures("pipe")
@pytest.mark.parametrize("spelling", ["num_layers", "num-layers"])
def test_a_conflict_in_a_config_names_the_file_and_line(cli: Cli, tmp_path: Path, spelling: str) -> None:
    cfg = tmp_path / "sanitize.yaml"
    cfg.write_text(f"base: ./llama-base\nthreshold: 0.3\n\n{spelling}: 2\n", encoding="utf-8")
    result = cli("project", tmp_path / "adapter", "--config", cfg)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {cfg}:4: {spelling}: give threshold or {spelling}, not both (threshold is on line 2)"
    ]


def test_a_conflict_in_a_config_names_the_file_and_line_in_the_api(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num-layers: 2\nthreshold: 0.3\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(cfg))}:2: threshold: .*not both \(num-layers is on line 1\)"
    ):
        api.project(tmp_path / "adapter", base="b", aligned="a", config=cfg)


@pytest.mark.usefixtures("pipe")
def test_a_flag_still_wins_over_a_config_of_the_other_mode(cli: Cli, tmp_path: Path) -> None:
    """Only a file that sets both is refused: --threshold on the line replaces a config's num_layers."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_layers: 2\n", encoding="utf-8")
    result = cli("project", tmp_path / "missing", "--config", cfg, "--threshold", "0.3")
    assert result.exit_code == 1
    assert "not both" not in result.stderr and "missing" in result.stderr


# --- inspect and cache ls on a pipe --------------------------------------------------------------


@pytest.mark.usefixtures("pipe")
def test_inspect_takes_its_width_from_columns_on_a_pipe(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, adapter_dir: Path
) -> None:
    unwrapped = cli("inspect", adapter_dir)
    assert unwrapped.exit_code == 0, unwrapped.stderr
    assert str(adapter_dir) in unwrapped.stdout  # no COLUMNS: lines as long as they are
    assert max(len(line) for line in unwrapped.stdout.splitlines()) > 60
    monkeypatch.setenv("COLUMNS", "60")
    narrow = cli("inspect", adapter_dir)
    assert narrow.exit_code == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 60, narrow.stdout


@pytest.mark.usefixtures("pipe")
def test_cache_ls_takes_its_width_from_columns_on_a_pipe(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    base, aligned = llama_pair
    done = cli("project", adapter_dir, "--base", base, "--aligned", aligned, "--quiet")
    assert done.exit_code == 0, done.stderr
    unwrapped = cli("cache", "ls", "--modules")
    assert unwrapped.exit_code == 0, unwrapped.stderr
    assert str(base) in unwrapped.stdout and str(adapter_dir) in unwrapped.stdout
    assert max(len(line) for line in unwrapped.stdout.splitlines()) > 60
    monkeypatch.setenv("COLUMNS", "60")
    narrow = cli("cache", "ls", "--modules")
    assert narrow.exit_code == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 60, narrow.stdout
