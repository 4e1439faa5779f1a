"""Forks real ``safelora`` processes from one that has imported safelora (and torch) once.

Starting Python and importing torch takes ~3 s on a 2-core machine, a fork a few milliseconds. The
crash and concurrency tests need dozens of ``safelora project`` processes, so they start this
server once and ask it for them. One JSON document per line; the test writes

    {"runs": [{"argv": [...], "out": path, "err": path, "kill_at": seconds | null}, ...], "env": {...}}

and the server forks every run at once (``env`` added to each child's environment), sends SIGKILL
to each child still running ``kill_at`` seconds after the fork, and answers

    {"status": [exit code or -signal, ...], "seconds": [time from fork to exit, ...]}

The server does the killing because it alone knows whether a child is still unreaped, so a signal
can never reach an unrelated process that inherited a recycled pid.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import time
import traceback
from typing import Any

from safelora_cli import cli


def _child(run: dict[str, Any], env: dict[str, str]) -> None:
    os.environ.update(env)
    for fd, path in ((1, run["out"]), (2, run["err"])):
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

    def reap(i: int, flags: int) -> None:
        pid, wait_status = os.waitpid(pids[i], flags)
        if pid:
            status[i], ended[i] = os.waitstatus_to_exitcode(wait_status), time.monotonic()

    kills = sorted((run["kill_at"], i) for i, run in enumerate(runs) if run.get("kill_at") is not None)
    for at, i in kills:
        time.sleep(max(0.0, started[i] + at - time.monotonic()))
        reap(i, os.WNOHANG)
        if status[i] is None:  # still ours and unreaped: the pid cannot have been recycled
            os.kill(pids[i], signal.SIGKILL)
    for i in range(len(runs)):
        if status[i] is None:
            reap(i, 0)
    return {"status": status, "seconds": [e - s for s, e in zip(started, ended, strict=True)]}


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


if __name__ == "__main__":
    main()
