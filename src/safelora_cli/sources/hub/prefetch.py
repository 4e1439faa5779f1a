"""Fetching the tensors a run will read ahead of it, over N connections at once.

One HTTP connection carries a fraction of what a CDN can deliver, so remote ranges are fetched
ahead of the reads over several connections at once. ``Source.plan`` announces the reading order;
consecutive tensors that lie back to back in a file become one range, and ranges are cut into
pieces of a few tens of MB. The run's sources share N worker threads (N connections), which fetch
the pieces in reading order while the bytes fetched and not yet read stay within a budget;
``Pool.take`` waits for a read's pieces and copies them into the caller's buffer.
"""

from __future__ import annotations

import signal
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import httpx2
from huggingface_hub import constants as hf_constants

from ...errors import HubError
from .transport import POLL, Remote, Transport

_RANGE_BYTES = 32 << 20  # the largest piece asked for in one request
_MIN_RANGE = 4 << 20  # pieces stay this large however many connections share the budget
_IN_FLIGHT = 256 << 20  # what the connections fetch at once, together

T = TypeVar("T")


class _Call:
    """A function a worker runs for a waiting caller (documents, headers, whole-file downloads)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


_PENDING, _RUNNING, _DONE, _FAILED = range(4)


class _Piece:
    """Part of a planned range: fetched by one worker into a buffer of its own, read, then released."""

    def __init__(self, file: Remote, start: int, end: int, key: tuple[int, int, int], last: int) -> None:
        self.file, self.start, self.end = file, start, end
        self.key = key  # fetching order: (position of its first read, source, offset)
        self.last = last  # the last planned read it serves, by index
        self.state = _PENDING
        self.data: bytearray | None = None
        self.error: BaseException | None = None
        self.dropped = False  # nobody will read it: a worker stops fetching it
        self.awaited = False  # a reader waits for it: fetched even beyond the budget

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Read:
    """One planned tensor read of a remote shard."""

    position: int  # in the source's reading order
    name: str
    file: Remote
    start: int
    end: int


class Plan:
    """One source's planned remote reads, in reading order, and the pieces that fetch them."""

    def __init__(self, source: int, reads: Sequence[Read], piece_bytes: int, count: Callable[[int], None]) -> None:
        self.source = source
        self.names = [r.name for r in reads]
        self.bounds = [(r.start, r.end) for r in reads]
        self.count = count
        self.cursor = 0  # the next read expected
        self.pieces: deque[_Piece] = deque()  # not yet released, in order
        self.started = 0  # pieces[:started] have been handed to workers
        self.spans: list[tuple[int, int] | None] = [None] * len(reads)  # each read's pieces, by sequence number
        self._front = 0  # the sequence number of pieces[0]
        runs: list[list[int]] = []  # reads back to back in one file, read one after another
        for i, r in enumerate(reads):
            if r.end == r.start:
                continue
            prev = reads[runs[-1][-1]] if runs else None
            if prev is not None and prev.file is r.file and prev.end == r.start:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            k = 0
            for a in range(reads[run[0]].start, reads[run[-1]].end, piece_bytes):
                b = min(a + piece_bytes, reads[run[-1]].end)
                while reads[run[k]].end <= a:
                    k += 1
                m = k
                while m + 1 < len(run) and reads[run[m + 1]].start < b:
                    m += 1
                seq = len(self.pieces)
                first = reads[run[k]]
                self.pieces.append(_Piece(first.file, a, b, (first.position, source, a), run[m]))
                for i in run[k : m + 1]:
                    span = self.spans[i]
                    self.spans[i] = (seq if span is None else span[0], seq)

    def find(self, name: str) -> int | None:
        """The next planned read of ``name`` (reads planned before it and not made are skipped)."""
        try:
            return self.names.index(name, self.cursor)
        except ValueError:
            return None

    def piece(self, seq: int) -> _Piece:
        return self.pieces[seq - self._front]

    def pop(self) -> _Piece:
        piece = self.pieces.popleft()
        self._front += 1
        self.started = max(0, self.started - 1)
        return piece


_POOLS: dict[int, Pool] = {}  # the live pools, by connection count
_POOLS_LOCK = threading.Lock()


class Pool:
    """The run's HTTP connections: N worker threads over one client, shared by the sources opened
    with the same connection count.

    Workers run calls first (a caller waits for them), then the planned pieces of every source, in
    reading order: the pieces of a source's read i come before those of read i + 1 and, across
    sources, base before aligned for the same i, which is how the pipeline reads them. A piece is
    started only while the bytes started and not yet released stay within the budget, unless a
    reader is waiting for it.
    """

    @staticmethod
    def acquire(n: int) -> Pool:
        """The live pool of ``n`` connections, or a new one; each acquire is paired with a release."""
        with _POOLS_LOCK:
            pool = _POOLS.get(n)
            if pool is None or not pool.live():  # an interrupted pool serves no one any more
                pool = _POOLS[n] = Pool(n)
            pool.users += 1
            return pool

    def release(self) -> None:
        with _POOLS_LOCK:
            self.users -= 1
            if self.users:
                return
            if _POOLS.get(self.n) is self:
                del _POOLS[self.n]
        self._stop()

    def __init__(self, n: int) -> None:
        self.n = n
        self.users = 0
        self.piece_bytes = min(_RANGE_BYTES, max(_IN_FLIGHT // n, _MIN_RANGE))
        self.budget = (n + 2) * self.piece_bytes  # every connection busy, and the next two ready
        self.used = 0
        self.spare: list[bytearray] = []  # full-size piece buffers, free for the next pieces
        timeout = float(hf_constants.HF_HUB_DOWNLOAD_TIMEOUT)
        # trust_env: HTTP(S)_PROXY, NO_PROXY, SSL_CERT_FILE… as every Hugging Face client honours them.
        client = httpx2.Client(
            follow_redirects=False,
            timeout=httpx2.Timeout(timeout),
            limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n),
            trust_env=True,
        )
        self.transport = Transport(client, self.live)
        self.cond = threading.Condition()
        self.calls: deque[_Call] = deque()
        self.plans: list[Plan] = []
        self.sources = 0
        self.stopped = False
        self.interrupted = False  # set by Ctrl-C, without a lock (a signal handler must not take one)
        self._live = n
        self._sigint = self._catch_interrupt()
        for i in range(n):
            threading.Thread(target=self._work, name=f"safelora-hub-{i}", daemon=True).start()

    # -- lifetime ----------------------------------------------------------------------------

    def _catch_interrupt(self) -> tuple[Any, Any] | None:
        """On Ctrl-C, stop every transfer, then let the previous handler raise KeyboardInterrupt.

        The pipeline joins its reader thread before the sources are closed; a reader waiting for a
        range must notice the interrupt itself rather than wait for the bytes.
        """
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):
            return None

        def on_interrupt(signum: int, frame: FrameType | None) -> Any:
            self.interrupted = True
            return previous(signum, frame)

        signal.signal(signal.SIGINT, on_interrupt)
        return on_interrupt, previous

    def _stop(self) -> None:
        with self.cond:
            self.stopped = True
            for plan in self.plans:
                self._release(plan, len(plan.names))
            self.plans.clear()
            self.cond.notify_all()
        if (
            self._sigint is not None
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is self._sigint[0]
        ):
            signal.signal(signal.SIGINT, self._sigint[1])

    def live(self) -> bool:
        return not (self.stopped or self.interrupted)

    def _wait(self) -> None:
        """Wait for a change (the condition held); raises once the run is interrupted or over."""
        if not self.live():
            raise HubError("the transfer was interrupted")
        self.cond.wait(POLL)

    # -- callers ---------------------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a worker (so at most N requests run at once), ahead of every planned piece."""
        result: T = self.call_all([fn])[0]
        return result

    def call_all(self, fns: Sequence[Callable[[], T]]) -> list[T]:
        """Each of ``fns`` on a worker, in parallel; the first failure (in order) is raised."""
        calls = [_Call(fn) for fn in fns]
        with self.cond:
            self.calls.extend(calls)
            self.cond.notify_all()
            while not all(c.done for c in calls):
                self._wait()
        for c in calls:
            if c.error is not None:
                raise c.error
        return [c.result for c in calls]

    def attach(self, reads: Sequence[Read], count: Callable[[int], None], old: Plan | None) -> Plan:
        """Plan a source's reads (replacing its previous plan); fetching starts at once."""
        with self.cond:
            if old is not None:
                self.detach(old)
                source = old.source
            else:
                self.sources += 1
                source = self.sources
            plan = Plan(source, reads, self.piece_bytes, count)
            self.plans.append(plan)
            self.cond.notify_all()
            return plan

    def detach(self, plan: Plan) -> None:
        """Forget a plan: its pieces not yet read are dropped, those in flight stopped."""
        with self.cond:
            self._release(plan, len(plan.names))
            if plan in self.plans:
                self.plans.remove(plan)
            self.cond.notify_all()

    def take(self, plan: Plan, name: str, view: memoryview) -> bool:
        """Fill ``view`` with the next planned read of ``name``; False when none is planned."""
        with self.cond:
            i = plan.find(name)
            if i is None:
                return False
            self._release(plan, i - 1)  # reads planned before this one were skipped
        start, end = plan.bounds[i]
        span = plan.spans[i]
        for seq in range(span[0], span[1] + 1) if span is not None else ():
            with self.cond:
                piece = plan.piece(seq)
                piece.awaited = True
                self.cond.notify_all()
                while piece.state in (_PENDING, _RUNNING):
                    self._wait()
                data = piece.data
                if piece.state != _DONE or data is None:
                    raise piece.error or HubError("the transfer was cancelled")
            a, b = max(piece.start, start), min(piece.end, end)
            view[a - start : b - start] = memoryview(data)[a - piece.start : b - piece.start]
        with self.cond:
            plan.cursor = i + 1
            self._release(plan, i)
        return True

    def _release(self, plan: Plan, upto: int) -> None:
        """Free the pieces that serve no read after ``upto`` (the condition held)."""
        while plan.pieces and plan.pieces[0].last <= upto:
            piece = plan.pop()
            piece.dropped = True
            if piece.state == _DONE:
                self.used -= piece.size
                self._recycle(piece.data)
                piece.data = None
            elif piece.state == _PENDING:
                piece.state, piece.error = _FAILED, HubError("the transfer was cancelled")
        self.cond.notify_all()

    # -- workers ---------------------------------------------------------------------------

    def _next(self) -> _Call | tuple[Plan, _Piece] | None:
        with self.cond:
            while self.live():
                if self.calls:
                    return self.calls.popleft()
                chosen = self._choose()
                if chosen is not None:
                    plan, piece = chosen
                    plan.started += 1
                    piece.state = _RUNNING
                    self.used += piece.size
                    return chosen
                self.cond.wait()
            return None

    def _choose(self) -> tuple[Plan, _Piece] | None:
        """The next piece to fetch, if the budget allows it (or a reader waits for it)."""
        heads = [(plan.pieces[plan.started], plan) for plan in self.plans if plan.started < len(plan.pieces)]
        if not heads:
            return None
        piece, plan = min(heads, key=lambda h: h[0].key)
        if self.used + piece.size <= self.budget:
            return plan, piece
        waited = [(p, pl) for p, pl in heads if p.awaited]
        return (waited[0][1], waited[0][0]) if waited else None

    def _work(self) -> None:
        try:
            while (task := self._next()) is not None:
                if isinstance(task, _Call):
                    self._run_call(task)
                else:
                    self._run_piece(*task)
        finally:
            with self.cond:
                self._live -= 1
                last = self._live == 0
            if last:
                self.transport.client.close()

    def _run_call(self, call: _Call) -> None:
        try:
            call.result = call.fn()
        except Exception as e:  # handed to the caller, which raises it in its own thread
            call.error = e
        with self.cond:
            call.done = True
            self.cond.notify_all()

    def _run_piece(self, plan: Plan, piece: _Piece) -> None:
        data = None
        if piece.size == self.piece_bytes:
            with self.cond:
                data = self.spare.pop() if self.spare else None
        data = data or bytearray(piece.size)
        error: BaseException | None = None
        try:
            self.transport.get(
                piece.file, piece.start, piece.end, memoryview(data), plan.count, lambda: not piece.dropped
            )
        except Exception as e:  # handed to the reader that waits for this piece
            error = e
        with self.cond:
            if piece.dropped or error is not None:
                self.used -= piece.size
                self._recycle(data)
                piece.state, piece.error = _FAILED, error or HubError("the transfer was cancelled")
            else:
                piece.state, piece.data = _DONE, data
            self.cond.notify_all()

    def _recycle(self, data: bytearray | None) -> None:
        """Keep a full-size piece buffer for the next piece (the condition held): a fresh one costs
        a page fault per 4 KiB, which on 2 cores slowed the 7B benchmark's transfers measurably."""
        if data is not None and len(data) == self.piece_bytes:
            self.spare.append(data)
