"""HTTP GETs done carefully, for any source that reads files over HTTP (the Hub's today).

It knows URLs, headers and byte ranges, not what is behind them: the caller describes the server
(``Server``: the headers every request carries, the origin its credentials belong to, how its
failures read) and names the file (``Remote``). Every answer is someone else's. A byte range is
accepted only as a 206 whose Content-Range is exactly the range asked, of the file's known size, and
its body is never read past what was asked; a document is read up to a size cap. Redirects are
followed here, not by the HTTP client: the credentials go only to the server's own origin, never to
the storage server a file redirects to, and the signed URL found there is reused for that file until
it is refused. Dropped connections, 429 and 5xx are retried; a Retry-After holds every request. A
body that trickles (less than ``STALL_BYTES`` in any ``STALL_WINDOW`` seconds) is cut and tried again
at most ``TRICKLE_RETRIES`` times: a server that sends a byte now and then never holds a run.
"""

from __future__ import annotations

import email.utils
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import NoReturn

import httpx2

from ...errors import SourceError

RETRIES = 3  # per range, for dropped connections, 429 and 5xx; reset when an attempt brought STALL_BYTES
# A body that delivers less than STALL_BYTES in any STALL_WINDOW seconds trickles: it is cut, and
# tried again at most TRICKLE_RETRIES times per piece (trickled bytes never count as progress).
STALL_WINDOW = 20.0
STALL_BYTES = 1 << 10
TRICKLE_RETRIES = 2
POLL = 0.05  # seconds between checks for an interrupt while waiting
_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20})")
_DIGITS = re.compile(r"\d{1,20}")
_BACKOFF = 1.0  # seconds before the first retry; doubles after each
_MAX_RETRY_AFTER = 300.0  # a rate-limit window (the Hub's is 5 min); a server asking for more is not waited for
_MAX_REDIRECTS = 10
_ERROR_BODY = 16 << 10  # of an error answer, read for its message
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Server:
    """A server as the source reading from it knows it: what every request carries, where its
    credentials may go, and how its failures read."""

    home: str  # its URL: only its origin (scheme, host, port) receives the credentials
    headers: Mapping[str, str]
    credentials: Mapping[str, str] = field(repr=False)
    error: type[SourceError]  # what every failure raises
    check: str  # the fix when it answers what no such server would: "check HF_ENDPOINT"
    ranges: str  # the fix when it does not answer byte ranges exactly
    storage: str  # what messages call the server its redirects lead to
    refuse: Callable[[httpx2.Response, bytes, str], NoReturn]  # an error status: (answer, start of body, where)
    unreachable: Callable[[BaseException], SourceError]  # no connection to it, retries spent


@dataclass(eq=False)
class Remote:
    """A file on a server: its URL, the signed URL that resolving it last led to, and its size."""

    server: Server
    where: str  # what messages call the file or document
    url: str
    size: int | None = None
    signed: str | None = field(default=None, init=False)  # reused for every range until the storage server refuses it


def one_line(text: str) -> str:
    """Text a server sent, for a message: one line, short."""
    return " ".join(text.split())[:160]


def reason(e: BaseException) -> str:
    return one_line(str(e)) or e.__class__.__name__


class _Retry(Exception):
    """A failure worth another try: a dropped connection, a 429 or 5xx, a body that ended early."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class _Stale(Exception):
    """The storage server a file redirected to refused its signed URL: resolve the file again."""


class _Trickle(Exception):
    """Less than ``STALL_BYTES`` arrived in ``STALL_WINDOW`` seconds: the answer was cut."""


class _Pace:
    """What one answer's body delivered over the last ``STALL_WINDOW`` seconds.

    The reading thread counts what arrives (``add``); the transport's watchdog looks at it between
    arrivals (``watch``) and, once it trickles, shuts the connection's socket down, so that a read
    blocked on a server that sends a byte every few seconds returns at once.
    """

    def __init__(self, resp: httpx2.Response) -> None:
        stream = resp.extensions.get("network_stream")
        self.sock = stream.get_extra_info("socket") if stream is not None else None
        self.start = time.monotonic()
        self.arrivals: deque[tuple[float, int]] = deque()
        self.recent = 0  # bytes in ``arrivals``
        self.cut = False
        self.lock = threading.Lock()

    def _slow(self, now: float) -> bool:
        while self.arrivals and self.arrivals[0][0] <= now - STALL_WINDOW:
            self.recent -= self.arrivals.popleft()[1]
        return now - self.start >= STALL_WINDOW and self.recent < STALL_BYTES

    def add(self, n: int) -> None:
        """Count ``n`` bytes just received; raises ``_Trickle`` once the answer trickles."""
        with self.lock:
            now = time.monotonic()
            self.arrivals.append((now, n))
            self.recent += n
            self.cut = self.cut or self._slow(now)
            if self.cut:
                raise _Trickle

    def watch(self) -> None:
        """Cut the answer if it trickles (from the watchdog's thread)."""
        with self.lock:
            if self.cut or not self._slow(time.monotonic()):
                return
            self.cut = True
        if isinstance(self.sock, socket.socket):
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


class _Dropped(Exception):
    """Nobody wants this range any more (its reader went away, or the run was interrupted)."""


@dataclass
class _Range:
    """Bytes ``start``–``end`` of a remote file, going into ``sink``; ``pos`` is how far they came."""

    file: Remote
    start: int
    end: int
    sink: memoryview
    wanted: Callable[[], bool]  # false once nobody will read the bytes
    count: Callable[[int], None]  # called with each received byte count
    pos: int = field(init=False)

    def __post_init__(self) -> None:
        self.pos = self.start


def _origin_of(url: httpx2.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


def _redirect(url: httpx2.URL, location: str | None, server: Server, where: str) -> httpx2.URL:
    """Where a redirect leads: http(s) only, and never from https down to http."""
    if not location:
        raise server.error(f"{where}: the server redirected without saying where; {server.check}")
    try:
        target = url.join(location)
    except (httpx2.InvalidURL, ValueError, TypeError):
        raise server.error(f"{where}: the server redirected to an invalid URL; {server.check}") from None
    if target.scheme not in ("http", "https") or (url.scheme == "https" and target.scheme != "https"):
        raise server.error(f"{where}: the server redirected from {url.scheme} to {target.scheme[:16]}:; {server.check}")
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


def _check_range(resp: httpx2.Response, start: int, end: int, file: Remote) -> int:
    """The file's size, from a 206 whose Content-Range is exactly ``start``–``end`` of a file of the
    size known (if it is) and whose Content-Length, if given, agrees; anything else is refused."""
    server, where, size = file.server, file.where, file.size
    if resp.status_code != 206:
        raise server.error(
            f"{where}: the server did not honour the byte range (HTTP {resp.status_code}); {server.ranges}"
        )
    asked = f"bytes {start}-{end - 1}" + (f" of {size}" if size is not None else "")
    m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if m is None:
        raise server.error(f"{where}: asked for {asked}, the answer has no valid Content-Range; {server.ranges}")
    first, last, total = int(m[1]), int(m[2]), int(m[3])
    if (first, last + 1) != (start, end) or total < end or (size is not None and total != size):
        raise server.error(
            f"{where}: asked for {asked}, the server sent bytes {first}-{last} of {total}; {server.ranges}"
        )
    length = resp.headers.get("Content-Length")
    if length is not None and length.strip() != str(end - start):
        raise server.error(
            f"{where}: asked for {end - start} bytes, the server announced {one_line(length)[:24]}; {server.ranges}"
        )
    return total


class Transport:
    """GETs over one HTTP client, made from any number of threads: byte ranges and small documents.

    ``live`` says whether the requests' owner still runs (not closed, not interrupted); once it is
    false, every request and every wait stops.
    """

    def __init__(self, client: httpx2.Client, live: Callable[[], bool]) -> None:
        self.client = client
        self.live = live
        self.resume_at = 0.0  # no request starts before (a server asked to wait: Retry-After)
        self._paces: set[_Pace] = set()  # the bodies being read, for the watchdog
        self._watchdog: threading.Thread | None = None
        self._watch_lock = threading.Lock()

    @contextmanager
    def _paced(self, resp: httpx2.Response) -> Iterator[_Pace]:
        """Watch ``resp``'s body for a trickle while it is read; a cut answer raises ``_Trickle``."""
        pace = _Pace(resp)
        with self._watch_lock:
            self._paces.add(pace)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="safelora-hub-watch", daemon=True)
                self._watchdog.start()
        try:
            yield pace
        except (_Retry, httpx2.TransportError):
            if pace.cut:
                raise _Trickle from None
            raise
        finally:
            with self._watch_lock:
                self._paces.discard(pace)

    def _watch(self) -> None:
        """The watchdog: looks at every body being read a few times a second; ends when none is."""
        while True:
            time.sleep(min(POLL * 5, STALL_WINDOW / 20))
            with self._watch_lock:
                paces = list(self._paces)
                if not paces:
                    self._watchdog = None
                    return
            for pace in paces:
                pace.watch()

    def _send(self, url: str, server: Server, where: str, extra: dict[str, str]) -> tuple[httpx2.Response, str]:
        """GET ``url``, following redirects here: the credentials go only to the server's origin.

        Returns the response (its body not read yet) and the URL that gave it.
        """
        at = httpx2.URL(url)
        home = _origin_of(httpx2.URL(server.home))
        for _ in range(_MAX_REDIRECTS + 1):
            # Accept-Encoding: identity, so that byte ranges are ranges of the file as stored.
            headers = {**server.headers, "Accept-Encoding": "identity"}
            if _origin_of(at) == home:
                headers.update(server.credentials)
            resp = self.client.send(self.client.build_request("GET", at, headers={**headers, **extra}), stream=True)
            if resp.status_code not in _REDIRECT_CODES:
                return resp, str(at)
            location = resp.headers.get("Location")
            resp.close()
            at = _redirect(at, location, server, where)
        raise server.error(f"{where}: more than {_MAX_REDIRECTS} redirects; {server.check}")

    def _pause(self, wanted: Callable[[], bool]) -> None:
        """Wait while a server's Retry-After holds (for every connection), or until unwanted."""
        while (left := self.resume_at - time.monotonic()) > 0:
            self._sleep(left, wanted)

    def _sleep(self, seconds: float, wanted: Callable[[], bool]) -> None:
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if not (self.live() and wanted()):
                raise _Dropped
            time.sleep(min(left, POLL))

    def _retry_wait(self, e: _Retry | httpx2.TransportError, failures: int, file: Remote) -> float:
        wait = e.wait if isinstance(e, _Retry) else None
        if wait is None:
            return float(_BACKOFF * 2**failures)
        if wait > _MAX_RETRY_AFTER:
            raise file.server.error(
                f"{file.where}: the server asks to wait {wait:.0f} s before trying again ({e}); run again later"
            )
        self.resume_at = max(self.resume_at, time.monotonic() + wait)
        return 0.0

    def get(
        self,
        file: Remote,
        start: int,
        end: int,
        sink: memoryview,
        count: Callable[[int], None],
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        """Fill ``sink`` with bytes ``start``–``end`` of ``file``: one ranged GET, resumed where it
        stopped when the connection drops, retried on 429 and 5xx."""
        rng = _Range(file, start, end, sink, lambda: self.live() and wanted(), count)
        error = file.server.error
        failures = stale = trickles = 0
        while rng.pos < rng.end:
            before = rng.pos
            try:
                self._pause(rng.wanted)
                self._attempt(rng)
            except _Trickle:
                trickles += 1
                if trickles > TRICKLE_RETRIES:
                    raise error(
                        f"{file.where}: the transfer trickled (less than {STALL_BYTES} bytes in {STALL_WINDOW:g} s) at "
                        f"byte {rng.pos}, and {TRICKLE_RETRIES} retries did too; check the network and run again"
                    ) from None
                try:
                    self._sleep(_BACKOFF * 2 ** (trickles - 1), rng.wanted)
                except _Dropped:
                    raise error(f"{file.where}: the transfer was cancelled") from None
            except _Stale as e:
                stale = 0 if rng.pos > before else stale + 1
                if stale > _MAX_REDIRECTS:
                    raise error(
                        f"{file.where}: {file.server.storage} refuses its signed URLs ({e}); run again later"
                    ) from None
                continue
            except _Dropped:
                raise error(f"{file.where}: the transfer was cancelled") from None
            except (_Retry, httpx2.TransportError) as e:
                if rng.pos - before >= min(STALL_BYTES, rng.end - before):
                    failures = 0
                if failures == RETRIES:
                    raise error(
                        f"{file.where}: the transfer broke off at byte {rng.pos} ({reason(e)}) and "
                        f"{RETRIES} retries failed; check the network and run again"
                    ) from None
                try:
                    self._sleep(self._retry_wait(e, failures, file), rng.wanted)
                except _Dropped:
                    raise error(f"{file.where}: the transfer was cancelled") from None
                failures += 1

    def _attempt(self, rng: _Range) -> None:
        file = rng.file
        resp, url = self._send(
            file.signed or file.url, file.server, file.where, {"Range": f"bytes={rng.pos}-{rng.end - 1}"}
        )
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
                file.server.refuse(resp, body, file.where)
            file.size = _check_range(resp, rng.pos, rng.end, file)
            if url != file.url:
                file.signed = url
            framed = "Content-Length" in resp.headers
            with self._paced(resp) as pace:
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
                    pace.add(len(data))
                if rng.pos < rng.end:
                    raise _Retry("the response ended early")
        finally:
            resp.close()

    def document(self, file: Remote, limit: int, *, reconnect: bool = True) -> bytes:
        """A whole small document (model info, index), refused beyond ``limit`` bytes.

        429 and 5xx are tried again (``RETRIES`` times), then reported like any other error status;
        a failed connection too, with ``reconnect`` (the first request of a run fails at once).
        """
        failures = trickles = 0
        while True:
            try:
                self._pause(lambda: True)
                return self._document_once(file, limit, last=failures >= RETRIES)
            except _Dropped:
                raise file.server.error(f"{file.where}: the transfer was cancelled") from None
            except _Trickle:
                trickles += 1
                if trickles > TRICKLE_RETRIES:
                    raise file.server.error(
                        f"{file.where}: the transfer trickled (less than {STALL_BYTES} bytes in {STALL_WINDOW:g} s), "
                        f"and {TRICKLE_RETRIES} retries did too; check the network and run again"
                    ) from None
                self._sleep(_BACKOFF * 2 ** (trickles - 1), lambda: True)
            except (_Retry, httpx2.TransportError) as e:
                if failures >= RETRIES or (isinstance(e, httpx2.TransportError) and not reconnect):
                    raise file.server.unreachable(e) from None
                self._sleep(self._retry_wait(e, failures, file), lambda: True)
                failures += 1

    def _document_once(self, file: Remote, limit: int, last: bool) -> bytes:
        server, where = file.server, file.where
        resp, _ = self._send(file.url, server, where, {})
        try:
            status = resp.status_code
            if (status == 429 or 500 <= status < 600) and not last:
                raise _Retry(f"HTTP {status}", _retry_after(resp) if status in (429, 503) else None)
            if status >= 400:
                server.refuse(resp, _read_at_most(resp, _ERROR_BODY), where)
            if status != 200:
                raise server.error(f"{where}: the server answered HTTP {status}, not the file; {server.check}")
            too_big = f"{where}: larger than {limit} bytes, more than such a file may have; {server.check}"
            length = resp.headers.get("Content-Length", "").strip()
            if length and (not _DIGITS.fullmatch(length) or int(length) > limit):
                raise server.error(too_big)
            body = bytearray()
            with self._paced(resp) as pace:
                for data in resp.iter_raw():
                    if not self.live():
                        raise _Dropped
                    body += data
                    if len(body) > limit:
                        raise server.error(too_big)
                    pace.add(len(data))
            return bytes(body)
        finally:
            resp.close()
