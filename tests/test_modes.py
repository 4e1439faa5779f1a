"""Every command in each of the three output modes: human (tables and lines on stdout), --json (one
JSON document on stdout, nothing else there) and --quiet (nothing on stdout or stderr when it
succeeds; with --json, the JSON alone). One sink does this for all of them, so a command that
branches on its own shows up here."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

Cli = Callable[..., Result]
MODES = {"human": [], "json": ["--json"], "quiet": ["-q"], "quiet json": ["--json", "-q"]}


def _setup(cli: Cli, llama_pair: tuple[Path, Path], adapter: Path, tmp_path: Path) -> dict[str, list[object]]:
    """Each command's arguments, with what it needs done first: a projected adapter whose original
    is kept (for restore and the backups), and a cached pair (for cache ls and rm)."""
    base, aligned = llama_pair
    pair = ["--base", base, "--aligned", aligned]
    done = cli("project", adapter, *pair, "--json")
    assert done.exit_code == 0, done.stderr
    key = json.loads(done.stdout)["cache"]["pair"]
    other = tmp_path / "other"
    return {
        "project": [adapter, *pair, "--output", other],
        "demo": [],
        "check": [adapter, *pair],
        "inspect": [adapter],
        "restore": [adapter],
        "cache ls": [],
        "cache rm": [key],
        "cache rm --backups": ["--backups", adapter, "--yes"],
        "cache clear": [],
        "cache clear --backups": ["--backups", "--yes"],
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "command",
    [
        "project",
        "demo",
        "check",
        "inspect",
        "restore",
        "cache ls",
        "cache rm",
        "cache rm --backups",
        "cache clear",
        "cache clear --backups",
    ],
)
def test_every_command_in_every_mode(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path, command: str, mode: str
) -> None:
    args = _setup(cli, llama_pair, adapter_dir, tmp_path)[command]
    argv = [w for w in command.split() if not w.startswith("--")]  # the flags are in args
    r = cli(*argv, *args, *MODES[mode])
    assert r.exit_code == 0, (command, mode, r.stdout, r.stderr)
    if "json" in mode:
        doc = json.loads(r.stdout)  # the whole of stdout is one document
        assert isinstance(doc, dict | list) and doc
        if mode == "quiet json":
            assert r.stderr == ""
    elif mode == "quiet":
        assert r.stdout == "" and r.stderr == "", (command, r.stdout, r.stderr)
    else:
        assert r.stdout.strip(), command
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.stdout)
        assert not re.search(r"\x1b\[", r.stdout)  # not a terminal: plain


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("command", ["project", "check", "inspect", "restore"])
def test_a_failure_in_every_mode(
    cli: Cli, llama_pair: tuple[Path, Path], tmp_path: Path, command: str, mode: str
) -> None:
    """A failed adapter: one line on stderr in every mode; with --json, its {"adapter", "error"} object."""
    missing = tmp_path / "missing"
    extra = ["--base", llama_pair[0], "--aligned", llama_pair[1]] if command == "project" else []
    r = cli(command, missing, *extra, *MODES[mode])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    if "json" in mode:
        assert json.loads(r.stdout) == {"adapter": str(missing), "error": lines[0].removeprefix("error: ")}
    else:
        assert r.stdout == ""
