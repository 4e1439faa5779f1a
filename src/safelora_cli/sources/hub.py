"""Checkpoints on the Hugging Face Hub, read tensor by tensor without downloading the model.

A reference (``org/name``, ``org/name@revision``) is resolved to its commit sha once; every later
request names that sha, so a branch that moves mid-run cannot mix files. Then, shard by shard: a
file already in the Hugging Face cache is read there, with no network; any other safetensors shard
is read remotely, its header with two small ranged GETs and then only the byte ranges of the
tensors the run needs, straight into memory. ``.bin`` checkpoints cannot be read in pieces: their
shards are downloaded whole into the Hugging Face cache, with a warning.

One HTTP connection carries a fraction of what a CDN can deliver, so remote ranges are fetched
ahead of the reads over several connections at once. ``Source.plan`` announces the reading order;
consecutive tensors that lie back to back in a file become one range, and ranges are cut into
pieces of a few tens of MB. The run's sources share N worker threads (N connections), which fetch
the pieces in reading order while the bytes fetched and not yet read stay within a budget;
``read`` waits for its pieces and copies them into the caller's buffer.

Every answer is someone else's. A byte range is accepted only as a 206 whose Content-Range is
exactly the range asked, of the file's known size, and its body is never read past what was asked;
documents (the model info, an index) are read up to a size cap. Redirects are followed here, not by
the HTTP client: the token goes only to the endpoint's origin, never to the storage server a file
redirects to, and the signed URL found there is reused for that file until it is refused.
"""

from __future__ import annotations

import email.utils
import os
import platform
import re
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import httpx2
import huggingface_hub
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_token, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import hf_raise_for_status

from .._version import __version__
from ..errors import HubAccessError, HubError, HubRepoNotFoundError, HubUnreachableError, SourceError, UsageError
from ..io import safefs, stfile, strict
from .base import (
    BIN_INDEX,
    BIN_SINGLE,
    INDEX_LIMIT,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    Hub,
    HubRef,
    Source,
    Transfer,
    parse_index,
)
from .local import TorchBinSource

DEFAULT_CONNECTIONS = 8
MAX_CONNECTIONS = 64

_SHA = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20})")
_DIGITS = re.compile(r"\d{1,20}")
_RANGE_BYTES = 32 << 20  # the largest piece asked for in one request
_MIN_RANGE = 4 << 20  # pieces stay this large however many connections share the budget
_IN_FLIGHT = 256 << 20  # what the connections fetch at once, together
_RETRIES = 3  # per range, for dropped connections, 429 and 5xx; reset whenever bytes arrive
_BACKOFF = 1.0  # seconds before the first retry; doubles after each
_MAX_RETRY_AFTER = 300.0  # the Hub's rate-limit window; a server asking for more is not waited for
_MAX_REDIRECTS = 10
_INFO_LIMIT = 64 << 20  # the model info (one line per file of the repo)
_REF_LIMIT = 1024  # a commit sha in the Hugging Face cache's refs/
_ERROR_BODY = 16 << 10  # of an error answer, read for its message
_POLL = 0.05  # seconds between checks for Ctrl-C while waiting
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CACHE_FIX = "delete it from the Hugging Face cache and run again"
_USER_AGENT = f"safelora/{__version__}; hf_hub/{huggingface_hub.__version__}; python/{platform.python_version()}"

T = TypeVar("T")


def open_hub(ref: HubRef, hub: Hub, transfer: Transfer, connections: int = DEFAULT_CONNECTIONS) -> HubSource:
    """Resolve ``ref`` to its commit: one API call, none with HF_HUB_OFFLINE=1 or a cached commit sha.

    The token is the one given, else HF_TOKEN, else the stored login (looked up here, not at start-up).
    ``connections`` caps the run's HTTP connections: sources opened with the same count share them.
    """
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UsageError(f"connections {connections}: give a number from 1 to {MAX_CONNECTIONS}")
    hub = replace(hub, token=hub.token or get_token())
    revision = ref.revision or "main"
    if hub.offline:
        sha = _offline_sha(ref.repo_id, revision, hub)
        return HubSource(ref.repo_id, revision, sha, None, hub, transfer, connections)
    if _SHA.match(revision) and _complete(hub.snapshot(ref.repo_id, revision)):
        return HubSource(ref.repo_id, revision, revision, None, hub, transfer, connections)
    pool = _Pool.acquire(connections)
    try:
        sha, files = _model_info(pool, hub, ref.repo_id, revision)
    except BaseException:
        pool.release()
        raise
    if hub.refs is not None and sha != revision:
        hub.refs.put(hub.endpoint, ref.repo_id, revision, sha)
    return HubSource(ref.repo_id, revision, sha, files, hub, transfer, connections, pool)


def _model_info(pool: _Pool, hub: Hub, repo_id: str, revision: str) -> tuple[str, dict[str, int | None]]:
    """The commit ``revision`` names and the repo's files with their sizes, from the Hub's API."""
    what = f"{repo_id}@{revision}"
    url = f"{hub.endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}?blobs=true"
    raw = pool.call(lambda: pool.document(_Origin(hub, repo_id, what), url, _INFO_LIMIT, reconnect=False))
    try:
        doc = strict.loads(raw)
    except strict.InvalidJSON as e:
        raise HubError(
            f"{what}: the Hub's model info is not valid JSON ({_one_line(str(e))}); check HF_ENDPOINT"
        ) from None
    sha = doc.get("sha") if isinstance(doc, dict) else None
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise HubError(f"{what}: the Hub did not say which commit this is")
    siblings = doc.get("siblings") or []
    files: dict[str, int | None] = {}
    for s in siblings if isinstance(siblings, list) else [None]:
        name = s.get("rfilename") if isinstance(s, dict) else None
        if not isinstance(name, str):
            raise HubError(f"{what}: the Hub's list of the repo's files is malformed; check HF_ENDPOINT")
        size = s.get("size") if isinstance(s, dict) else None
        files[name] = size if type(size) is int and size >= 0 else None
    return sha, files


def _headers(hub: Hub, *, token: bool) -> dict[str, str]:
    """Request headers; the token only when ``token`` (the request goes to the endpoint's origin).

    Not huggingface_hub's ``build_hf_headers``: its user agent looks up a registry on the endpoint
    (a body of any size, read whole) and caches it in HF_HOME.
    """
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}  # ranges of the file as stored
    if token and hub.token:
        headers["Authorization"] = f"Bearer {hub.token}"
    return headers


def _offline_sha(repo_id: str, revision: str, hub: Hub) -> str:
    if _SHA.match(revision):
        return revision
    ref_file = hub.repo_cache(repo_id) / "refs" / revision
    if not Path(revision).is_absolute() and ".." not in Path(revision).parts and _exists(ref_file):
        sha = safefs.read_small(ref_file, HubError, _REF_LIMIT, fix=_CACHE_FIX)[0].decode("utf-8", "replace").strip()
        if _SHA.match(sha):
            return sha
    sha_memo = hub.refs.get(hub.endpoint, repo_id, revision) if hub.refs is not None else None
    if sha_memo is not None and _SHA.match(sha_memo):
        return sha_memo
    raise HubUnreachableError(
        f"HF_HUB_OFFLINE=1: no commit is recorded for {repo_id}@{revision} in the Hugging Face cache "
        f"({hub.hf_cache}) or safelora's cache; run once online, or pass a commit sha"
    )


def _exists(path: Path) -> bool:
    """Whether ``path`` names something (a dangling link names nothing); other OS errors are one line."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise HubError(safefs.os_error(path, e)) from None
    return True


def _regular(snapshot: safefs.Directory, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=snapshot.fd).st_mode)
    except OSError:
        return False


def _is_dir(snapshot: safefs.Directory, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=snapshot.fd).st_mode)
    except OSError:
        return False


def _complete(path: Path) -> bool:
    """Whether a cached snapshot holds a whole checkpoint (so it can be used without asking the Hub)."""
    try:
        snapshot = safefs.Directory(path, HubError)
    except HubError:
        return False
    with snapshot:
        for index, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            if _regular(snapshot, index):
                try:
                    raw = snapshot.read_small(index, INDEX_LIMIT)[0]
                    shards = set(parse_index(raw, str(path / index)).values())
                except SourceError:
                    return False
                return all(_regular(snapshot, s) for s in shards)
            if _regular(snapshot, single):
                return True
    return False


@contextmanager
def _translate(hub: Hub, repo_id: str, what: str) -> Iterator[None]:
    """Hub and network failures → one line that names the fix (and never the token)."""
    page = f"{hub.endpoint}/{repo_id}"
    try:
        yield
    except GatedRepoError:
        if hub.token:
            raise HubError(
                f"{repo_id} is gated and the token's account has no access yet: request it at {page}"
            ) from None
        raise HubAccessError(f"{repo_id} is gated: request access at {page}, then pass that account's token") from None
    except RepositoryNotFoundError as e:
        if _status(e) == 401:
            raise _denied(hub, repo_id, 401) from None
        raise HubRepoNotFoundError(f"{repo_id}: no such repository on {hub.endpoint}") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: no such revision on {hub.endpoint}; pass a branch, tag or commit sha") from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{what}: cannot download it from {hub.endpoint} and it is not in the Hugging Face cache "
            f"({hub.hf_cache}); check the network"
        ) from None
    except EntryNotFoundError:
        raise HubError(f"{what}: no such file in the repository") from None
    except HfHubHTTPError as e:
        status = _status(e)
        if status in (401, 403):
            raise _denied(hub, repo_id, status) from None
        detail = f" ({_one_line(e.server_message)})" if e.server_message else ""
        raise HubError(f"{what}: the Hub answered HTTP {status}{detail}") from None
    except httpx2.TransportError as e:
        raise HubUnreachableError(_unreachable(hub, e)) from None


def _one_line(text: str) -> str:
    """Text a server sent, for a message: one line, short."""
    return " ".join(text.split())[:160]


def _reason(e: BaseException) -> str:
    return _one_line(str(e)) or e.__class__.__name__


def _unreachable(hub: Hub, e: BaseException) -> str:
    return (
        f"cannot reach {hub.endpoint} ({_reason(e)}); check the network or proxy, "
        "or set HF_HUB_OFFLINE=1 to use cached files only"
    )


def _status(e: HfHubHTTPError) -> int | None:
    return e.response.status_code if e.response is not None else None


def _denied(hub: Hub, repo_id: str, status: int) -> HubError:
    what = f"{repo_id}: access denied (HTTP {status}); the repo is private or gated, or does not exist"
    if hub.token:
        return HubError(f"{what}: the token given has no access to it")
    return HubAccessError(f"{what}: pass a token with access")


# -- HTTP ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """Whom a request is for, to name it in messages and to decide where the token goes."""

    hub: Hub
    repo_id: str
    where: str  # what messages call the file or document


class _File:
    """A remote file: its resolve URL, the signed URL that resolving it last led to, and its size."""

    def __init__(self, origin: _Origin, url: str, size: int | None) -> None:
        self.origin, self.url, self.size = origin, url, size
        self.signed: str | None = None  # reused for every range until the storage server refuses it


class _Retry(Exception):
    """A failure worth another try: a dropped connection, a 429 or 5xx, a body that ended early."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class _Stale(Exception):
    """The storage server a file redirected to refused its signed URL: resolve the file again."""


class _Dropped(Exception):
    """Nobody wants this range any more (its source closed, or the run was interrupted)."""


def _origin_of(url: httpx2.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


def _redirect(url: httpx2.URL, location: str | None, where: str) -> httpx2.URL:
    """Where a redirect leads: http(s) only, and never from https down to http."""
    if not location:
        raise HubError(f"{where}: the server redirected without saying where; check HF_ENDPOINT")
    try:
        target = url.join(location)
    except (httpx2.InvalidURL, ValueError, TypeError):
        raise HubError(f"{where}: the server redirected to an invalid URL; check HF_ENDPOINT") from None
    if target.scheme not in ("http", "https") or (url.scheme == "https" and target.scheme != "https"):
        raise HubError(f"{where}: the server redirected from {url.scheme} to {target.scheme[:16]}:; check HF_ENDPOINT")
    return target


def _retry_after(resp: httpx2.Response) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), or None when absent or unreadable."""
    value = resp.headers.get("Retry-After", "").strip()
    if _DIGITS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read_at_most(resp: httpx2.Response, limit: int) -> bytes:
    """The start of a body, for an error message; a broken connection gives what came."""
    out = bytearray()
    try:
        for data in resp.iter_raw():
            out += data[: limit - len(out)]
            if len(out) >= limit:
                break
    except httpx2.HTTPError:
        pass
    return bytes(out)


def _refuse(resp: httpx2.Response, body: bytes, origin: _Origin) -> NoReturn:
    """An error answer as one line (the Hub's own error codes understood), given the start of its body."""
    kept = {k: v for k, v in resp.headers.items() if k.lower() in ("x-error-code", "x-error-message", "content-type")}
    capped = httpx2.Response(resp.status_code, headers=kept, content=body, request=resp.request)
    with _translate(origin.hub, origin.repo_id, origin.where):
        hf_raise_for_status(capped)
    raise HubError(f"{origin.where}: the server answered HTTP {resp.status_code}; check HF_ENDPOINT")


def _check_range(resp: httpx2.Response, start: int, end: int, size: int | None, where: str) -> int:
    """The file's size, from a 206 whose Content-Range is exactly ``start``–``end`` of a file of ``size``
    bytes (when known) and whose Content-Length, if given, agrees; anything else is refused."""
    fix = "ranged reads need a Hub endpoint or mirror that honours byte ranges; check HF_ENDPOINT"
    if resp.status_code != 206:
        raise HubError(f"{where}: the server did not honour the byte range (HTTP {resp.status_code}); {fix}")
    asked = f"bytes {start}-{end - 1}" + (f" of {size}" if size is not None else "")
    m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if m is None:
        raise HubError(f"{where}: asked for {asked}, the answer has no valid Content-Range; {fix}")
    first, last, total = int(m[1]), int(m[2]), int(m[3])
    if (first, last + 1) != (start, end) or total < end or (size is not None and total != size):
        raise HubError(f"{where}: asked for {asked}, the server sent bytes {first}-{last} of {total}; {fix}")
    length = resp.headers.get("Content-Length")
    if length is not None and length.strip() != str(end - start):
        raise HubError(f"{where}: asked for {end - start} bytes, the server announced {_one_line(length)[:24]}; {fix}")
    return total


@dataclass
class _Range:
    """Bytes ``start``–``end`` of a remote file, going into ``sink``; ``pos`` is how far they came."""

    file: _File
    start: int
    end: int
    sink: memoryview
    wanted: Callable[[], bool]  # false once nobody will read the bytes
    count: Callable[[int], None]  # called with each received byte count
    pos: int = field(init=False)

    def __post_init__(self) -> None:
        self.pos = self.start


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

    def __init__(self, file: _File, start: int, end: int, key: tuple[int, int, int], last: int) -> None:
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
class _Read:
    """One planned tensor read of a remote shard."""

    position: int  # in the source's reading order
    name: str
    file: _File
    start: int
    end: int


class _Plan:
    """One source's planned remote reads, in reading order, and the pieces that fetch them."""

    def __init__(self, source: int, reads: Sequence[_Read], piece_bytes: int, count: Callable[[int], None]) -> None:
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


_POOLS: dict[int, _Pool] = {}  # the live pools, by connection count
_POOLS_LOCK = threading.Lock()


class _Pool:
    """The run's HTTP connections: N worker threads over one client, shared by the sources opened
    with the same connection count.

    Workers run calls first (a caller waits for them), then the planned pieces of every source, in
    reading order: the pieces of a source's read i come before those of read i + 1 and, across
    sources, base before aligned for the same i, which is how the pipeline reads them. A piece is
    started only while the bytes started and not yet released stay within the budget, unless a
    reader is waiting for it.
    """

    @staticmethod
    def acquire(n: int) -> _Pool:
        """The live pool of ``n`` connections, or a new one; each acquire is paired with a release."""
        with _POOLS_LOCK:
            pool = _POOLS.get(n)
            if pool is None or not pool.live():  # an interrupted pool serves no one any more
                pool = _POOLS[n] = _Pool(n)
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
        self.client = httpx2.Client(
            follow_redirects=False,
            timeout=httpx2.Timeout(timeout),
            limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n),
            trust_env=True,
        )
        self.cond = threading.Condition()
        self.calls: deque[_Call] = deque()
        self.plans: list[_Plan] = []
        self.sources = 0
        self.stopped = False
        self.interrupted = False  # set by Ctrl-C, without a lock (a signal handler must not take one)
        self.resume_at = 0.0  # no request starts before (a server asked to wait: Retry-After)
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
        self.cond.wait(_POLL)

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

    def attach(self, reads: Sequence[_Read], count: Callable[[int], None], old: _Plan | None) -> _Plan:
        """Plan a source's reads (replacing its previous plan); fetching starts at once."""
        with self.cond:
            if old is not None:
                self.detach(old)
                source = old.source
            else:
                self.sources += 1
                source = self.sources
            plan = _Plan(source, reads, self.piece_bytes, count)
            self.plans.append(plan)
            self.cond.notify_all()
            return plan

    def detach(self, plan: _Plan) -> None:
        """Forget a plan: its pieces not yet read are dropped, those in flight stopped."""
        with self.cond:
            self._release(plan, len(plan.names))
            if plan in self.plans:
                self.plans.remove(plan)
            self.cond.notify_all()

    def take(self, plan: _Plan, name: str, view: memoryview) -> bool:
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

    def _release(self, plan: _Plan, upto: int) -> None:
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

    def _next(self) -> _Call | tuple[_Plan, _Piece] | None:
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

    def _choose(self) -> tuple[_Plan, _Piece] | None:
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
                self.client.close()

    def _run_call(self, call: _Call) -> None:
        try:
            call.result = call.fn()
        except Exception as e:  # handed to the caller, which raises it in its own thread
            call.error = e
        with self.cond:
            call.done = True
            self.cond.notify_all()

    def _run_piece(self, plan: _Plan, piece: _Piece) -> None:
        data = None
        if piece.size == self.piece_bytes:
            with self.cond:
                data = self.spare.pop() if self.spare else None
        data = data or bytearray(piece.size)
        error: BaseException | None = None
        try:
            self.get(piece.file, piece.start, piece.end, memoryview(data), plan.count, lambda: not piece.dropped)
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

    # -- requests --------------------------------------------------------------------------

    def _send(self, url: str, origin: _Origin, extra: dict[str, str]) -> tuple[httpx2.Response, str]:
        """GET ``url``, following redirects here: the token goes only to the endpoint's origin.

        Returns the response (its body not read yet) and the URL that gave it.
        """
        at = httpx2.URL(url)
        home = _origin_of(httpx2.URL(origin.hub.endpoint))
        for _ in range(_MAX_REDIRECTS + 1):
            headers = {**_headers(origin.hub, token=_origin_of(at) == home), **extra}
            resp = self.client.send(self.client.build_request("GET", at, headers=headers), stream=True)
            if resp.status_code not in _REDIRECT_CODES:
                return resp, str(at)
            location = resp.headers.get("Location")
            resp.close()
            at = _redirect(at, location, origin.where)
        raise HubError(f"{origin.where}: more than {_MAX_REDIRECTS} redirects; check HF_ENDPOINT")

    def _pause(self, wanted: Callable[[], bool]) -> None:
        """Wait while a server's Retry-After holds (for every connection), or until unwanted."""
        while (left := self.resume_at - time.monotonic()) > 0:
            self._sleep(left, wanted)

    def _sleep(self, seconds: float, wanted: Callable[[], bool]) -> None:
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if not (self.live() and wanted()):
                raise _Dropped
            time.sleep(min(left, _POLL))

    def _retry_wait(self, e: _Retry | httpx2.TransportError, failures: int, where: str) -> float:
        wait = e.wait if isinstance(e, _Retry) else None
        if wait is None:
            return float(_BACKOFF * 2**failures)
        if wait > _MAX_RETRY_AFTER:
            raise HubError(f"{where}: the server asks to wait {wait:.0f} s before trying again ({e}); run again later")
        self.resume_at = max(self.resume_at, time.monotonic() + wait)
        return 0.0

    def get(
        self,
        file: _File,
        start: int,
        end: int,
        sink: memoryview,
        count: Callable[[int], None],
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        """Fill ``sink`` with bytes ``start``–``end`` of ``file``: one ranged GET, resumed where it
        stopped when the connection drops, retried on 429 and 5xx."""
        rng = _Range(file, start, end, sink, lambda: self.live() and wanted(), count)
        failures = stale = 0
        while rng.pos < rng.end:
            before = rng.pos
            try:
                self._pause(rng.wanted)
                self._attempt(rng)
            except _Stale as e:
                stale = 0 if rng.pos > before else stale + 1
                if stale > _MAX_REDIRECTS:
                    raise HubError(
                        f"{file.origin.where}: the storage server the Hub redirects to refuses its signed URLs "
                        f"({e}); run again later"
                    ) from None
                continue
            except _Dropped:
                raise HubError(f"{file.origin.where}: the transfer was cancelled") from None
            except (_Retry, httpx2.TransportError) as e:
                if rng.pos > before:
                    failures = 0
                if failures == _RETRIES:
                    raise HubError(
                        f"{file.origin.where}: the transfer broke off at byte {rng.pos} ({_reason(e)}) and "
                        f"{_RETRIES} retries failed; check the network and run again"
                    ) from None
                try:
                    self._sleep(self._retry_wait(e, failures, file.origin.where), rng.wanted)
                except _Dropped:
                    raise HubError(f"{file.origin.where}: the transfer was cancelled") from None
                failures += 1

    def _attempt(self, rng: _Range) -> None:
        file = rng.file
        resp, url = self._send(file.signed or file.url, file.origin, {"Range": f"bytes={rng.pos}-{rng.end - 1}"})
        try:
            status = resp.status_code
            if status == 429 or 500 <= status < 600:
                raise _Retry(f"HTTP {status}", _retry_after(resp) if status in (429, 503) else None)
            if status >= 400:
                body = _read_at_most(resp, _ERROR_BODY)
                # A storage server says a signed URL is no longer valid with 403 (S3, Azure), 410, or
                # a 400 that says "expired" (GCS).
                if url != file.url and (status in (403, 410) or b"expire" in body.lower()):
                    if file.signed == url:
                        file.signed = None
                    raise _Stale(f"HTTP {status}")
                _refuse(resp, body, file.origin)
            file.size = _check_range(resp, rng.pos, rng.end, file.size, file.origin.where)
            if url != file.url:
                file.signed = url
            framed = "Content-Length" in resp.headers
            for data in resp.iter_raw():
                if not rng.wanted():
                    raise _Dropped
                n = min(len(data), rng.end - rng.pos)
                at = rng.pos - rng.start
                rng.sink[at : at + n] = memoryview(data)[:n]
                rng.pos += n
                rng.count(n)
                # A body without a length is cut where the range ends; one with a length is read to
                # its end (never more than asked, as checked), so the connection can serve again.
                if rng.pos == rng.end and not framed:
                    break
            if rng.pos < rng.end:
                raise _Retry("the response ended early")
        finally:
            resp.close()

    def document(self, origin: _Origin, url: str, limit: int, *, reconnect: bool = True) -> bytes:
        """A whole small document (model info, index), refused beyond ``limit`` bytes.

        429 and 5xx are tried again (``_RETRIES`` times), then reported like any other error
        status; a failed connection too, with ``reconnect`` (the first request of a run fails at once).
        """
        failures = 0
        while True:
            try:
                self._pause(lambda: True)
                return self._document_once(origin, url, limit, last=failures >= _RETRIES)
            except _Dropped:
                raise HubError(f"{origin.where}: the transfer was cancelled") from None
            except (_Retry, httpx2.TransportError) as e:
                if failures >= _RETRIES or (isinstance(e, httpx2.TransportError) and not reconnect):
                    raise HubUnreachableError(_unreachable(origin.hub, e)) from None
                self._sleep(self._retry_wait(e, failures, origin.where), lambda: True)
                failures += 1

    def _document_once(self, origin: _Origin, url: str, limit: int, last: bool) -> bytes:
        resp, _ = self._send(url, origin, {})
        try:
            status = resp.status_code
            if (status == 429 or 500 <= status < 600) and not last:
                raise _Retry(f"HTTP {status}", _retry_after(resp) if status in (429, 503) else None)
            if status >= 400:
                _refuse(resp, _read_at_most(resp, _ERROR_BODY), origin)
            if status != 200:
                raise HubError(f"{origin.where}: the server answered HTTP {status}, not the file; check HF_ENDPOINT")
            too_big = f"{origin.where}: larger than {limit} bytes, more than such a file may have; check HF_ENDPOINT"
            length = resp.headers.get("Content-Length", "").strip()
            if length and (not _DIGITS.fullmatch(length) or int(length) > limit):
                raise HubError(too_big)
            body = bytearray()
            for data in resp.iter_raw():
                if not self.live():
                    raise _Dropped
                body += data
                if len(body) > limit:
                    raise HubError(too_big)
            return bytes(body)
        finally:
            resp.close()


# -- shards ----------------------------------------------------------------------------------------


class _LocalShard:
    """A shard already in the Hugging Face cache."""

    def __init__(self, path: Path, where: str) -> None:
        self.where = where
        self._file = safefs.open_file(path, HubError, where=where, fix=_CACHE_FIX)
        try:
            self.header = stfile.header_of(self._file, where, os.fstat(self._file.fileno()).st_size)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as e:
            self._file.close()
            raise HubError(safefs.os_error(where, e)) from None
        except BaseException:
            self._file.close()
            raise

    def read(self, entry: stfile.TensorEntry, buf: bytearray | None) -> torch.Tensor:
        return stfile.read_tensor(self._file, entry, self.where, buf)

    def close(self) -> None:
        self._file.close()


class _RemoteShard:
    """A safetensors file on the Hub: its header from two small ranged GETs; tensors through the pool."""

    def __init__(self, file: _File, header: stfile.Header) -> None:
        self.file, self.header = file, header

    @classmethod
    def open(cls, pool: _Pool, file: _File, count: Callable[[int], None]) -> _RemoteShard:
        """Read the header (call on a worker): the 8-byte length, then the JSON."""
        where = file.origin.where
        first = 8 if file.size is None else min(8, file.size)
        prefix = bytearray(first)
        if first:
            pool.get(file, 0, first, memoryview(prefix), count)
        raw = bytearray(stfile.header_length(bytes(prefix), where, file.size))
        pool.get(file, 8, 8 + len(raw), memoryview(raw), count)
        return cls(file, stfile.parse_header(bytes(raw), where, file.size))


class HubSource(Source):
    """A checkpoint in a Hub repo at one commit; shards come from the HF cache or ranged GETs."""

    def __init__(
        self,
        repo_id: str,
        requested: str,
        sha: str,
        files: dict[str, int | None] | None,
        hub: Hub,
        transfer: Transfer,
        connections: int = DEFAULT_CONNECTIONS,
        pool: _Pool | None = None,
    ) -> None:
        super().__init__(repo_id, sha)
        self.repo_id, self.requested, self.sha = repo_id, requested, sha
        self.hub, self._transfer = hub, transfer
        self._files = files  # the repo's files and sizes; None: use the cached snapshot's names
        self._weight_map: dict[str, str] | None = None
        self._bin = False
        self._shards: dict[str, _LocalShard | _RemoteShard] = {}
        self._bins: dict[str, TorchBinSource] = {}
        self._connections = connections
        self._pool = pool
        self._plan: _Plan | None = None
        self._lock = threading.Lock()
        self._progress: Callable[[int], None] = lambda n: None

    def where(self, filename: str | None = None) -> str:
        at = f"{self.repo_id}@{self.sha[:12]}"
        return at if filename is None else f"{at}/{filename}"

    def fingerprint(self) -> str:
        return self.sha

    def cache_identity(self) -> str:
        return f"hub:{self.repo_id}@{self.sha}"

    # -- network -------------------------------------------------------------------------------

    def _net(self) -> _Pool:
        if self._pool is None:
            self._pool = _Pool.acquire(self._connections)
        return self._pool

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_downloaded += n

    def _count_tensor(self, n: int) -> None:
        self._count(n)
        self._progress(n)

    def _remote(self, filename: str) -> _File:
        size = self._files.get(filename) if self._files is not None else None
        url = hf_hub_url(self.repo_id, filename, revision=self.sha, endpoint=self.hub.endpoint)
        return _File(_Origin(self.hub, self.repo_id, self.where(filename)), url, size)

    # -- files ---------------------------------------------------------------------------------

    def _cached(self, filename: str) -> Path | None:
        """The file in the Hugging Face cache at this commit, if there is one (not opened yet)."""
        path = self.hub.snapshot(self.repo_id, self.sha) / filename
        return path if _exists(path) else None

    def _offline_missing(self, filenames: Collection[str]) -> HubError:
        return HubError(
            f"HF_HUB_OFFLINE=1: {self.where()} needs {', '.join(sorted(filenames))}, not in the Hugging Face "
            f"cache ({self.hub.hf_cache}); download once online (hf download {self.repo_id} --revision "
            f"{self.sha}) or unset HF_HUB_OFFLINE"
        )

    def _listing(self) -> set[str]:
        if self._files is None:
            snapshot = self.hub.snapshot(self.repo_id, self.sha)
            if not _exists(snapshot):
                return set()
            with safefs.Directory(snapshot, HubError, fix=_CACHE_FIX) as d:
                # Whatever is not a directory counts: opening it says what is wrong with it.
                self._files = {n: None for n in d.names() if not _is_dir(d, n)}
        return set(self._files)

    def _small_file(self, filename: str) -> bytes:
        """A JSON index: from the HF cache, else one GET into memory (at most ``INDEX_LIMIT`` bytes)."""
        local = self._cached(filename)
        if local is not None:
            return safefs.read_small(local, HubError, INDEX_LIMIT, where=self.where(filename), fix=_CACHE_FIX)[0]
        if self.hub.offline:
            raise self._offline_missing([filename])
        pool, file = self._net(), self._remote(filename)
        raw = pool.call(lambda: pool.document(file.origin, file.url, INDEX_LIMIT))
        self._count(len(raw))
        return raw

    def _map(self) -> dict[str, str]:
        """Tensor name → file, from the index or the single file's header (read once)."""
        if self._weight_map is None:
            files = self._listing()
            if SAFETENSORS_INDEX in files:
                self._weight_map = parse_index(self._small_file(SAFETENSORS_INDEX), self.where(SAFETENSORS_INDEX))
            elif SAFETENSORS_SINGLE in files:
                self._weight_map = dict.fromkeys(self._shard(SAFETENSORS_SINGLE).header.tensors, SAFETENSORS_SINGLE)
            elif BIN_INDEX in files:
                self._bin = True
                self._weight_map = parse_index(self._small_file(BIN_INDEX), self.where(BIN_INDEX))
            elif BIN_SINGLE in files:
                self._bin = True
                self._weight_map = dict.fromkeys(self._bin_file(BIN_SINGLE).names(), BIN_SINGLE)
            elif self.hub.offline:
                raise self._offline_missing([f"{SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} and its shards"])
            else:
                raise HubError(
                    f"{self.where()}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX} at "
                    "the repo root; pass a transformers checkpoint"
                )
        return self._weight_map

    def _open_shards(self, filenames: Collection[str]) -> None:
        """Open shards not open yet: cached ones from disk, the others' headers fetched in parallel."""
        remote = []
        for f in sorted(set(filenames) - self._shards.keys()):
            local = self._cached(f)
            if local is not None:
                self._shards[f] = _LocalShard(local, self.where(f))
            elif self.hub.offline:
                raise self._offline_missing([f])
            else:
                remote.append(f)
        if remote:
            pool = self._net()
            files = [self._remote(f) for f in remote]
            opened = pool.call_all([partial(_RemoteShard.open, pool, file, self._count) for file in files])
            self._shards.update(zip(remote, opened, strict=True))

    def _shard(self, filename: str) -> _LocalShard | _RemoteShard:
        self._open_shards([filename])
        return self._shards[filename]

    def _bin_file(self, filename: str) -> TorchBinSource:
        source = self._bins.get(filename)
        if source is None:
            self._download_bins([filename])
            source = self._bins[filename]
        return source

    def _download_bins(self, filenames: Collection[str]) -> None:
        """Whole .bin files into the HF cache (they cannot be read in pieces), after saying how much."""
        missing = []
        for f in sorted(set(filenames) - self._bins.keys()):
            local = self._cached(f)
            if local is None:
                missing.append(f)
            else:
                self._bins[f] = self._bin_source(f, local)
        if not missing:
            return
        if self.hub.offline:
            raise self._offline_missing(missing)
        sizes = {f: (self._files or {}).get(f) or 0 for f in missing}
        self._transfer.warn(
            f"{self.where()} has only PyTorch .bin weights, which cannot be read in pieces: downloading "
            f"{len(missing)} whole file(s), {sum(sizes.values()) / 1e9:.2f} GB, into the Hugging Face cache "
            f"({self.hub.hf_cache})"
        )
        pool = self._net()
        for f in missing:
            with _translate(self.hub, self.repo_id, self.where(f)):
                path = pool.call(partial(self._download, f))
            self._count(sizes[f])
            self._bins[f] = self._bin_source(f, Path(path))

    def _download(self, filename: str) -> str:
        return hf_hub_download(
            self.repo_id,
            filename,
            revision=self.sha,
            cache_dir=self.hub.hf_cache,
            endpoint=self.hub.endpoint,
            token=self.hub.token or False,
            library_name="safelora",
            library_version=__version__,
        )

    def _bin_source(self, filename: str, path: Path) -> TorchBinSource:
        if filename == BIN_SINGLE and self._weight_map is None:
            return TorchBinSource(self.label, None, [path])
        names = [n for n, f in self._map().items() if f == filename]
        return TorchBinSource(self.label, dict.fromkeys(names, path), [path])

    def _entry(self, name: str) -> tuple[_LocalShard | _RemoteShard, stfile.TensorEntry]:
        filename = self._map()[name]
        shard = self._shard(filename)
        entry = shard.header.tensors.get(name)
        if entry is None:
            raise SourceError(
                f"{self.where(filename)}: the index maps {name!r} to this shard but the shard does not hold it; "
                "the repo's index and shards are out of step"
            )
        return shard, entry

    # -- Source --------------------------------------------------------------------------------

    def names(self) -> Collection[str]:
        return self._map().keys()

    def plan(self, names: Sequence[str]) -> None:
        """Open every shard the run needs (offline: name all missing files at once; remote headers in
        parallel), start the progress bar for the bytes to download and start fetching them, in this
        order. .bin shards are downloaded here."""
        weight_map = self._map()
        files = {weight_map[n] for n in names}
        if self._bin:
            self._download_bins(files)
            return
        if self.hub.offline:
            missing = [f for f in files if f not in self._shards and self._cached(f) is None]
            if missing:
                raise self._offline_missing(missing)
        self._open_shards(files)
        reads = []
        for position, name in enumerate(names):
            shard, entry = self._entry(name)
            if isinstance(shard, _RemoteShard):
                reads.append(_Read(position, name, shard.file, entry.start, entry.end))
        if reads:
            total = sum(r.end - r.start for r in reads)
            self._progress = self._transfer.task(self.repo_id, total) if total else lambda n: None
            self._plan = self._net().attach(reads, self._count_tensor, self._plan)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._bin:
            return self._bin_file(self._map()[name]).shape(name)
        return self._entry(name)[1].shape

    def nbytes(self, name: str) -> int:
        if self._bin:
            return self._bin_file(self._map()[name]).nbytes(name)
        return self._entry(name)[1].nbytes

    def read(self, name: str, buf: bytearray | None = None) -> torch.Tensor:
        """One tensor; a planned one from the pieces fetched ahead. Reads come from one thread."""
        if self._bin:
            t = self._bin_file(self._map()[name]).read(name)
            self.bytes_read += t.numel() * t.element_size()
            return t
        shard, entry = self._entry(name)
        if isinstance(shard, _LocalShard):
            t = shard.read(entry, buf)
        else:
            if buf is None or len(buf) < entry.nbytes:
                buf = bytearray(entry.nbytes)
            view = memoryview(buf)[: entry.nbytes]
            pool = self._net()
            if (self._plan is None or not pool.take(self._plan, name, view)) and entry.nbytes:
                file = shard.file
                pool.call(lambda: pool.get(file, entry.start, entry.end, view, self._count_tensor))
            t = stfile.tensor_from_bytes(entry, view)
        self.bytes_read += entry.nbytes
        return t

    def close(self) -> None:
        """Close cached files and stop this source's transfers; the last source closes the connections."""
        for shard in self._shards.values():
            if isinstance(shard, _LocalShard):
                shard.close()
        for source in self._bins.values():
            source.close()
        if self._pool is not None:
            if self._plan is not None:
                self._pool.detach(self._plan)
                self._plan = None
            self._pool.release()
            self._pool = None
