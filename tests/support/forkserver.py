"""Forks real ``safelora`` processes from one that has imported safelora (and torch) once.

Starting Python and importing torch takes ~3 s on a 2-core machine, a fork a few milliseconds. The
crash and concurrency tests need dozens of ``safelora project`` processes, so they start this
server once and ask it for them. One JSON document per line; the test writes

    {"runs": [{"argv": [...], "out": path, "err": path, "kill_at": seconds | null}, ...], "env": {...}}

and the server forks every run at once (``env`` is each child's whole environment: the test's own
with the run's additions, as a process the test started would have), sends SIGKILL to each child
still running ``kill_at`` seconds after the fork, and answers

    {"status": [exit code or -signal, ...], "seconds": [time from fork to exit, ...],
     "maxrss": [peak resident set size in bytes, ...]}

An ``out`` of null runs the child with a stdout that every write fails on.

The server does the killing because it alone knows whether a child is still unreaped, so a signal
can never reach an unrelated process that inherited a recycled pid.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from safelora_cli import cli


def _child(run: dict[str, Any], env: dict[str, str]) -> None:
    # The test's environment, not the server's: its own HOME, XDG directories, caches and backup
    # store, and no CI step summary unless the run sets one.
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, run["out"]), (2, run["err"])):
        if path is None:
            # Opened for reading, so every write fails; the descriptor stays taken, so no file the
            # run opens can land on it.
            closed = os.open(os.devnull, os.O_RDONLY)
            os.dup2(closed, fd)
            os.close(closed)
            continue
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["safelora", *run["argv"]]
    code = 70  # an exception escaped the CLI: the tests treat this as a crash
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(request: dict[str, Any]) -> dict[str, list[Any]]:
    runs = request["runs"]
    started, pids = [], []
    for run in runs:
        sys.stdout.flush()  # the child must not inherit unflushed output
        pid = os.fork()
        if pid == 0:
            _child(run, request.get("env", {}))
        started.append(time.monotonic())
        pids.append(pid)
    status: list[int | None] = [None] * len(runs)
    ended = [0.0] * len(runs)
    maxrss = [0] * len(runs)

    def reap(i: int, flags: int) -> None:
        pid, wait_status, usage = os.wait4(pids[i], flags)
        if pid:
            status[i], ended[i] = os.waitstatus_to_exitcode(wait_status), time.monotonic()
            maxrss[i] = usage.ru_maxrss * 1024  # kilobytes on Linux

    # Reap children as they end (so each one's time is its own), and kill each one still running
    # at its ``kill_at``; only an unreaped child is ever signalled.
    while None in status:
        now = time.monotonic()
        for i, run in enumerate(runs):
            if status[i] is not None:
                continue
            reap(i, os.WNOHANG)
            if status[i] is None and run.get("kill_at") is not None and now >= started[i] + run["kill_at"]:
                os.kill(pids[i], signal.SIGKILL)
                reap(i, 0)
        time.sleep(0.002)
    return {"status": status, "seconds": [e - s for s, e in zip(started, ended, strict=True)], "maxrss": maxrss}


def _warm_up() -> None:
    """Let typer import what it loads lazily on its first parse (~0.3 s) here, not in every child.

    The run fails at once (no such checkpoint) and so never starts torch's thread pool, which a
    fork must not inherit.
    """
    sys.argv = ["safelora", "project", "--adapter", "-", "--base", "-", "--aligned", "-"]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        cli.main()


def main() -> None:
    _warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_serve(json.loads(line))), flush=True)


# --- the client: what tests use ------------------------------------------------------------------------


@dataclass
class Run:
    """One ``safelora`` invocation for the fork server; ``out``/``err`` receive its stdout/stderr."""

    argv: list[str]
    out: Path | None  # None: stdout closed
    err: Path
    kill_at: float | None = None

    def report(self) -> Any:
        assert self.out is not None
        return json.loads(self.out.read_text())


@dataclass
class Outcome:
    status: list[int]
    seconds: list[float]
    maxrss: list[int]


class ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._answer(120) == {"ready": True}

    def _answer(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            pytest.fail(f"the fork server gave no answer in {timeout} s (a run hangs?)")
        return json.loads(self.proc.stdout.readline())

    def run(self, runs: list[Run], env: dict[str, str] | None = None) -> Outcome:
        """Fork every run at once and wait for all of them."""
        assert self.proc.stdin is not None
        # The server started before this test's fixtures: hand the children this test's environment.
        request = {
            "runs": [
                {"argv": r.argv, "out": r.out and str(r.out), "err": str(r.err), "kill_at": r.kill_at} for r in runs
            ],
            "env": {**os.environ, **(env or {})},
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._answer(60)
        return Outcome(answer["status"], answer["seconds"], answer["maxrss"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    main()
