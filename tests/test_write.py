"""Rewriting the adapter: readers and failures see the old file or the new one, never a mix or a mess."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from support.run import project_adapter
from typer.testing import Result

from safelora_cli.adapters import rewrite_lock
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.api import Report
from safelora_cli.errors import AdapterError, OutputError
from safelora_cli.io import atomic, ranges
from safelora_cli.io.atomic import TMP_MARK, clean_stale
from safelora_cli.io.safefs import Directory
from safelora_cli.results import Settings
from safelora_cli.sources import open_local

Pair = tuple[Path, Path]


def project(pair: Pair, adapter: Path, **settings: Any) -> Report:
    """An in-place run without a backup: the failures injected here are the adapter's own write's
    (tests/test_backups.py injects them into the backup's)."""
    with closing(open_local(pair[0])) as base, closing(open_local(pair[1])) as aligned:
        return project_adapter(adapter, base, aligned, Settings(**{"backup": False, **settings}))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's name and bytes: temp files left behind show up as extra names."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def temp_name(pid: int | str) -> str:
    return f".{ADAPTER_FILE}{TMP_MARK}{pid}-x1y2"


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def _raise(error: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


def test_failed_rename_leaves_the_original_and_no_temp_file(
    llama_pair: Pair, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step before the new file exists: a full disk there must change nothing."""
    before = snapshot(adapter_dir)
    monkeypatch.setattr(atomic.os, "rename", _raise(OSError(errno.ENOSPC, "No space left on device")))

    with pytest.raises(AdapterError, match=r"No space left on device.*original file is unchanged"):
        project(llama_pair, adapter_dir)

    assert snapshot(adapter_dir) == before


@pytest.mark.parametrize("existing", [False, True], ids=["new", "empty"])
@pytest.mark.parametrize(
    "failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["full-disk", "interrupt"]
)
def test_failed_output_leaves_no_directory_and_no_temp_files(
    llama_pair: Pair,
    adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    existing: bool,
    failure: BaseException,
) -> None:
    """--output appears whole or not at all: a failure at its last step leaves a new one absent and
    an empty one empty, with no half-written adapter that a rerun would have to --force over."""
    before = snapshot(adapter_dir)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    monkeypatch.setattr(atomic.os, "rename", _raise(failure))

    with (
        pytest.raises(type(failure))
        if isinstance(failure, KeyboardInterrupt)
        else pytest.raises(AdapterError, match=r"No space left on device.*nothing was written there")
    ):
        project(llama_pair, adapter_dir, output=out)

    assert snapshot(adapter_dir) == before
    assert (out.is_dir() and not any(out.iterdir())) if existing else not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if TMP_MARK in p.name]
    monkeypatch.undo()
    assert project(llama_pair, adapter_dir, output=out).written, "a rerun needs no --force"


@pytest.mark.parametrize("existing", [False, True], ids=["new", "empty"])
def test_output_is_a_complete_directory_with_the_usual_modes(
    llama_pair: Pair, adapter_dir: Path, tmp_path: Path, existing: bool
) -> None:
    out = tmp_path / "nested" / "out"
    if existing:
        out.mkdir(parents=True)
    project(llama_pair, adapter_dir, output=out)
    assert set(snapshot(out)) == set(snapshot(adapter_dir))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / ADAPTER_FILE).stat().st_mode & 0o777 == (adapter_dir / ADAPTER_FILE).stat().st_mode & 0o777


def test_a_run_to_an_output_removes_what_killed_runs_left_beside_it(
    llama_pair: Pair, adapter_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stale = tmp_path / f".out{TMP_MARK}{dead_pid()}-abcd"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    live = tmp_path / f".out{TMP_MARK}{os.getpid()}-abcd"  # a concurrent run's: kept
    live.mkdir()

    project(llama_pair, adapter_dir, output=out)

    assert not stale.exists() and live.is_dir()
    assert (out / ADAPTER_FILE).is_file()


def test_interrupt_before_the_rename_leaves_the_original_and_no_temp_file(
    llama_pair: Pair, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(adapter_dir)
    monkeypatch.setattr(atomic.os, "rename", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        project(llama_pair, adapter_dir)
    assert snapshot(adapter_dir) == before


def test_failure_after_the_rename_does_not_claim_the_original_survived(
    llama_pair: Pair, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    monkeypatch.setattr(ranges, "fsync", _raise(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(AdapterError) as info:
        project(llama_pair, adapter_dir)
    assert "written" in str(info.value) and "unchanged" not in str(info.value)
    assert (adapter_dir / ADAPTER_FILE).read_bytes() != before


def test_open_readers_keep_seeing_the_old_file(llama_pair: Pair, adapter_dir: Path) -> None:
    """The rewrite replaces the directory entry; it never writes into the file a reader has open."""
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    with (adapter_dir / ADAPTER_FILE).open("rb") as reader:
        project(llama_pair, adapter_dir)
        assert reader.read() == before
    assert (adapter_dir / ADAPTER_FILE).read_bytes() != before


def test_in_place_rewrite_keeps_the_file_mode(llama_pair: Pair, adapter_dir: Path) -> None:
    (adapter_dir / ADAPTER_FILE).chmod(0o640)
    project(llama_pair, adapter_dir)
    assert (adapter_dir / ADAPTER_FILE).stat().st_mode & 0o777 == 0o640


@pytest.fixture(params=["chmod", "injected"])
def read_only_adapter(request: pytest.FixtureRequest, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``adapter_dir`` where no new file can be created: a real read-only directory where
    permissions apply, and an injected EACCES that also runs as root (root ignores them)."""
    if request.param == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        adapter_dir.chmod(0o555)
        request.addfinalizer(lambda: adapter_dir.chmod(0o755))
    else:
        real_open = os.open
        adapter_fd = os.open(adapter_dir, os.O_RDONLY)
        request.addfinalizer(lambda: os.close(adapter_fd))

        def denied(path: Any, flags: int, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> int:
            """Creating a file through a descriptor of ``adapter_dir`` fails as a read-only directory fails it."""
            if flags & os.O_CREAT and dir_fd is not None and os.path.samestat(os.fstat(dir_fd), os.fstat(adapter_fd)):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

        monkeypatch.setattr(atomic.os, "open", denied)
    return adapter_dir


def test_read_only_adapter_directory(
    read_only_adapter: Path, llama_pair: Pair, cli: Callable[..., Result], tmp_path: Path
) -> None:
    """In place fails with one line that names the way out (--output), and that way works."""
    before = snapshot(read_only_adapter)
    args = ("project", "--base", llama_pair[0], "--aligned", llama_pair[1], "--adapter", read_only_adapter)

    refused = cli(*args)
    assert refused.exit_code == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Permission denied" in lines[0] and "--output" in lines[0]
    assert snapshot(read_only_adapter) == before

    written = cli(*args, "--output", tmp_path / "safe")
    assert written.exit_code == 0, written.stderr
    assert (tmp_path / "safe" / ADAPTER_FILE).is_file()
    assert snapshot(read_only_adapter) == before


def test_clean_stale_removes_only_files_of_dead_runs(tmp_path: Path) -> None:
    """A temp file names the pid that wrote it: a live pid may be a concurrent run, so it stays."""
    dead, live, unparsable = temp_name(dead_pid()), temp_name(os.getpid()), temp_name("x")
    for name in (dead, live, unparsable, ADAPTER_FILE, "notes.txt"):
        (tmp_path / name).write_bytes(b"")

    with Directory(tmp_path, AdapterError) as directory:
        removed = clean_stale(directory, f".{ADAPTER_FILE}{TMP_MARK}")

    assert sorted(removed) == sorted([dead, unparsable])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, ADAPTER_FILE, "notes.txt"])


def test_an_in_place_run_cleans_up_after_killed_runs(llama_pair: Pair, adapter_dir: Path) -> None:
    dead, live = temp_name(dead_pid()), temp_name(os.getpid())
    for name in (dead, live):
        (adapter_dir / name).write_bytes(b"partial")
    project(llama_pair, adapter_dir)
    assert not (adapter_dir / dead).exists()
    assert (adapter_dir / live).exists()


def test_output_must_not_be_the_adapter_itself(llama_pair: Pair, adapter_dir: Path) -> None:
    before = snapshot(adapter_dir)
    with pytest.raises(OutputError, match="is the adapter directory itself; to patch it in place, give no output"):
        project(llama_pair, adapter_dir, output=adapter_dir / ".." / adapter_dir.name)
    assert snapshot(adapter_dir) == before


def test_output_is_not_overwritten_without_force(llama_pair: Pair, adapter_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match="not empty"):
        project(llama_pair, adapter_dir, output=out)
    assert snapshot(out) == {"keep.txt": b"mine"}

    report = project(llama_pair, adapter_dir, output=out, force=True)
    assert report.written and (out / ADAPTER_FILE).is_file()


def test_output_that_is_a_file_is_refused(llama_pair: Pair, adapter_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("mine")
    with pytest.raises(AdapterError, match="not a directory"):
        project(llama_pair, adapter_dir, output=tmp_path / "out")
    assert (tmp_path / "out").read_text() == "mine"


def test_a_run_that_waits_for_the_adapter_lock_says_so(adapter_dir: Path) -> None:
    holder = os.open(adapter_dir, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    waited, entered = threading.Event(), threading.Event()

    def second_run() -> None:
        with Directory(adapter_dir, AdapterError) as directory, rewrite_lock(directory, on_wait=waited.set):
            entered.set()

    thread = threading.Thread(target=second_run)
    thread.start()
    assert waited.wait(5)
    assert not entered.wait(0.2)  # still waiting while the first run holds the lock
    os.close(holder)
    thread.join(5)
    assert entered.is_set()
