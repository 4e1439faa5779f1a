"""A local stand-in for the Hugging Face Hub: enough of it for huggingface_hub and safelora's ranged reads.

It serves ``root/<org>/<name>/<dir>/<files>``. Each ``<dir>`` is one commit with a deterministic sha,
and also a branch of the same name; ``move`` points a branch at another commit. Every body byte sent
for a file is counted per file, so tests and the benchmark can assert on traffic. Used by tests/ (as
a module) and benchmarks/bench_hub.py (through sys.path).

What huggingface_hub needs from it: ``X-Repo-Commit``, a quoted ``ETag``, ``Content-Length``,
``Accept-Ranges`` and 206 answers on ``resolve``; ``/api/models`` with ``sha`` and ``siblings``;
``paths-info``; ``X-Error-Code`` on 404s; never a body on HEAD.

Like the real Hub it can also:
- redirect ``resolve`` of weight files (``cdn=True``) to a second server on another port, with a
  signed URL that ``expire`` (or ``expire_after``) invalidates: the storage server then answers 403
  "Request has expired", as S3 does;
- throttle every connection to ``rate`` bytes per second and answer every request ``latency``
  seconds late, and record the peak number of requests served at once (both servers together) and
  when the first request came and the last body byte left;
- misbehave once, on request (``fault``): cut a range short, answer a range with 200 and an endless
  body, send a Content-Range or Content-Length that does not match, a body longer than asked, an
  error status, or a document that never ends.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from safelora_cli.io.stfile import read_header

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 20
_HASHED_UP_TO = 100 << 20  # files above this get a stat-based ETag instead of hashing gigabytes
_WEIGHTS = (".safetensors", ".bin")  # what the Hub stores in LFS/Xet and serves from its CDN
ENDLESS = 50 * 10**9  # the length a bogus endless body claims


def targeted(model_dir: Path, modules: list[str]) -> tuple[int, int]:
    """What a run on ``modules`` must fetch from a sharded checkpoint at least: (bytes of the modules'
    weights, bytes of the headers of the shards that hold them)."""
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    data, shards = 0, set()
    for m in modules:
        shard = model_dir / weight_map[f"{m}.weight"]
        data += read_header(shard).tensors[f"{m}.weight"].nbytes
        shards.add(shard)
    return data, sum(read_header(s).data_start for s in shards)


@dataclass
class Fault:
    """One misbehaviour, for the next request it applies to.

    ``target``: "data" (a ranged GET of tensor bytes), "header" (a ranged GET of the first bytes of a
    file), "index" (a GET of a ``*.index.json``) or "info" (the model info API).
    ``kind``:
    - "drop": send ``after`` bytes of the range, then close the connection;
    - "full": answer 200 with an endless body (it claims ``ENDLESS`` bytes);
    - "content-range": answer 206 with ``content_range`` (a format string of start, end, size);
    - "content-length": a correct Content-Range with a Content-Length one byte longer;
    - "longer": a correct Content-Range, no Content-Length, and after the range an endless body;
    - "status": answer ``status`` with ``headers`` and ``body``;
    - "stall": send ``after`` bytes of the range, then nothing for a minute (or until the hub stops);
    - "trickle": send ``after`` bytes of the range, then one byte every ``interval`` seconds (until
      the range ends, the client hangs up or the hub stops);
    - "endless": answer 200 with an endless body (for "index" and "info").
    """

    kind: str
    target: str = "data"
    after: int = 0
    content_range: str = "bytes {start}-{end}/{size}"
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    interval: float = 1.0


@dataclass(frozen=True)
class Answer:
    """One request served: when its answer ended, by which server, for what, with which status."""

    time: float  # time.monotonic()
    server: str  # "hub" or "storage"
    path: str
    status: int
    range: str | None  # the Range header asked


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server that takes a client hanging up mid-answer as normal (safelora does so
    on purpose), instead of printing a traceback into the stderr of whatever runs in this process."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class NotFound(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class FakeHub:
    """Start with ``with FakeHub(root) as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self, root: Path, *, cdn: bool = False, rate: float | None = None, latency: float = 0.0) -> None:
        self.root = root
        self.cdn = cdn  # resolve of weight files redirects to the storage server (a second port)
        self.rate = rate  # body bytes per second per connection; None: as fast as it goes
        self.latency = latency  # seconds before each answer
        self.branches: dict[str, dict[str, str]] = {}  # repo → branch → commit dir, beyond the defaults
        self.gated: dict[str, set[str]] = {}  # repo → tokens with access; no token: 401, other token: 403
        self.private: set[str] = set()  # answered 401 everywhere, like a repo the caller cannot see
        self.faults: list[Fault] = []  # applied in order, each once
        self.sent: Counter[str] = Counter()  # "org/name/file" → body bytes sent for that file
        self.bogus_sent = 0  # body bytes sent by faults' endless bodies
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request to the Hub
        self.storage_requests: list[tuple[str, str]] = []  # (method, path) of every request to the storage server
        self.authorizations: dict[str, list[str | None]] = {"hub": [], "storage": []}  # Authorization headers seen
        self.log: list[Answer] = []  # every answer, in the order they ended
        self.active = 0  # requests being served now, both servers together
        self.peak = 0
        self.first_request: float | None = None
        self.last_byte: float | None = None
        self.generation = 0  # signed URLs of an older generation have expired
        self.expire_after: int | None = None  # expire signed URLs after this many more storage answers
        self.data_requests = 0  # ranged GETs of tensor bytes received
        self.stopping = threading.Event()  # set on exit: stalled answers end
        self._secret = b"fake-hub-signing-key"
        self._lock = threading.Lock()
        self._etags: dict[Path, str] = {}
        self._server = _Server(("127.0.0.1", 0), _handler(self, storage=False))
        self._storage = _Server(("127.0.0.1", 0), _handler(self, storage=True))
        self._threads = [
            threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in (self._server, self._storage)
        ]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def storage_url(self) -> str:
        host, port = self._storage.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        for t in self._threads:
            t.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stopping.set()
        for server in (self._server, self._storage):
            server.shutdown()
            server.server_close()

    @staticmethod
    def sha(repo: str, commit_dir: str) -> str:
        """The commit sha of ``root/repo/commit_dir``."""
        return hashlib.sha1(f"{repo}@{commit_dir}".encode()).hexdigest()

    def move(self, repo: str, branch: str, commit_dir: str) -> None:
        self.branches.setdefault(repo, {})[branch] = commit_dir

    def fault(self, kind: str, **kw: object) -> Fault:
        """Misbehave once (see ``Fault``); returns the fault."""
        f = Fault(kind, **kw)  # type: ignore[arg-type]
        with self._lock:
            self.faults.append(f)
        return f

    def expire(self) -> None:
        """Every signed URL given so far stops working."""
        with self._lock:
            self.generation += 1

    def reset(self) -> None:
        with self._lock:
            self.sent.clear()
            self.requests.clear()
            self.storage_requests.clear()
            self.log.clear()
            for seen in self.authorizations.values():
                seen.clear()
            self.bogus_sent = self.peak = self.data_requests = 0
            self.first_request = self.last_byte = None

    def sent_bytes(self, suffix: str = "") -> int:
        """Body bytes sent for files whose name ends with ``suffix``."""
        with self._lock:
            return sum(n for path, n in self.sent.items() if path.endswith(suffix))

    # -- lookups -----------------------------------------------------------------------------------

    def commit_dir(self, repo: str, revision: str) -> Path:
        repo_dir = self.root / repo
        if repo.count("/") != 1 or not repo_dir.is_dir():
            raise NotFound("RepoNotFound")
        name = self.branches.get(repo, {}).get(revision)
        if name is None:
            dirs = [d.name for d in repo_dir.iterdir() if d.is_dir()]
            name = next((d for d in dirs if revision in (d, self.sha(repo, d))), None)
        if name is None:
            raise NotFound("RevisionNotFound")
        return repo_dir / name

    def etag(self, path: Path) -> str:
        tag = self._etags.get(path)
        if tag is None:
            st = path.stat()
            if st.st_size <= _HASHED_UP_TO:
                tag = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                tag = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
            self._etags[path] = tag
        return tag

    def signature(self, path: str, generation: int) -> str:
        return hmac.new(self._secret, f"{path}\0{generation}".encode(), hashlib.sha256).hexdigest()[:32]

    def take_fault(self, target: str) -> Fault | None:
        with self._lock:
            for i, f in enumerate(self.faults):
                if f.target == target:
                    return self.faults.pop(i)
        return None

    def count(self, key: str, n: int) -> None:
        with self._lock:
            self.sent[key] += n
            self.last_byte = time.monotonic()

    def begin(self, server: str, method: str, path: str, authorization: str | None) -> None:
        with self._lock:
            (self.storage_requests if server == "storage" else self.requests).append((method, path))
            self.authorizations[server].append(authorization)
            self.active += 1
            self.peak = max(self.peak, self.active)
            if self.first_request is None:
                self.first_request = time.monotonic()

    def end(self, server: str, path: str, status: int, range_header: str | None) -> None:
        with self._lock:
            self.active -= 1
            self.log.append(Answer(time.monotonic(), server, path, status, range_header))


def _files(commit: Path) -> list[Path]:
    return sorted(p for p in commit.rglob("*") if p.is_file())


def _handler(hub: FakeHub, storage: bool) -> type[BaseHTTPRequestHandler]:
    server = "storage" if storage else "hub"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else every small body waits ~40 ms for a delayed ACK
        status = 0
        finished = False

        def log_message(self, format: str, *args: object) -> None:
            pass

        def send_response(self, code: int, message: str | None = None) -> None:
            self.status = code
            super().send_response(code, message)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_POST(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            url = urlsplit(self.path)
            self.finished = False
            hub.begin(server, self.command, url.path, self.headers.get("Authorization"))
            try:
                if hub.latency:
                    time.sleep(hub.latency)
                if storage:
                    self._storage(url.path, url.query, head)
                else:
                    self._route(url.path, url.query, head)
            finally:
                self._finish()

        def _finish(self) -> None:
            """Count the request as served; called before its last bytes leave, so that a client
            that has the whole answer can never find it still counted."""
            if not self.finished:
                self.finished = True
                hub.end(server, urlsplit(self.path).path, self.status, self.headers.get("Range"))

        # -- plumbing -------------------------------------------------------------------------

        def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            if head or not body:
                self._finish()
            self.end_headers()
            if not head and body:
                self._finish()
                self.wfile.write(body)

        def _json(self, doc: object, head: bool) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(doc).encode(), head)

        def _error(self, status: int, code: str | None, head: bool, message: str = "") -> None:
            headers = {"Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            if message:
                headers["X-Error-Message"] = message
            self._send(status, headers, json.dumps({"error": message or code or str(status)}).encode(), head)

        def _access(self, repo: str, files: bool) -> tuple[int, str | None, str] | None:
            """401/403 like the Hub: private repos everywhere, gated repos on file downloads."""
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if repo in hub.private:
                return 401, None, "Invalid username or password."
            if files and repo in hub.gated and token not in hub.gated[repo]:
                message = f"Access to model {repo} is restricted and you are not in the authorized list."
                return (403 if token else 401), "GatedRepo", message
            return None

        def _route(self, path: str, query: str, head: bool) -> None:
            parts = [unquote(p) for p in path.strip("/").split("/")]
            try:
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    self._api(parts[2] + "/" + parts[3], parts[4:], query, head)
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head)
                else:
                    self._error(404, None, head, "no such route")
            except NotFound as e:
                self._error(404, e.code, head, e.code)

        def _api(self, repo: str, rest: list[str], query: str, head: bool) -> None:
            denied = self._access(repo, files=False)
            if denied:
                self._error(denied[0], denied[1], head, denied[2])
                return
            if not rest:
                rest = ["revision", "main"]
            kind, revision, sub = rest[0], rest[1] if len(rest) > 1 else "main", "/".join(rest[2:])
            commit = hub.commit_dir(repo, revision)
            sha = hub.sha(repo, commit.name)
            files = _files(commit)
            if kind == "revision":
                if self._document_fault("info", head):
                    return
                siblings = [{"rfilename": str(p.relative_to(commit)), "size": p.stat().st_size} for p in files]
                self._json({"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings}, head)
            elif kind == "tree":
                found = [p for p in files if str(p.relative_to(commit)).startswith(sub)]
                if "recursive" not in parse_qs(query):
                    found = [p for p in found if "/" not in str(p.relative_to(commit / sub if sub else commit))]
                self._json([self._file_info(commit, p) for p in found], head)
            elif kind == "paths-info":
                length = int(self.headers.get("Content-Length", "0"))
                wanted = parse_qs(self.rfile.read(length).decode()).get("paths", [])
                found = [commit / w for w in wanted if (commit / w).is_file()]
                self._json([self._file_info(commit, p) for p in found], head)
            else:
                self._error(404, None, head, "no such route")

        def _file_info(self, commit: Path, p: Path) -> dict[str, object]:
            return {"type": "file", "oid": hub.etag(p), "size": p.stat().st_size, "path": str(p.relative_to(commit))}

        def _resolve(self, repo: str, revision: str, filename: str, head: bool) -> None:
            denied = self._access(repo, files=True)
            if denied:
                self._error(denied[0], denied[1], head, denied[2])
                return
            commit = hub.commit_dir(repo, revision)
            path = commit / filename
            if ".." in Path(filename).parts or not path.is_file():
                raise NotFound("EntryNotFound")
            headers = self._file_headers(path, hub.sha(repo, commit.name))
            if hub.cdn and filename.endswith(_WEIGHTS):
                where = quote(f"/{repo}/{commit.name}/{filename}")
                with hub._lock:
                    generation = hub.generation
                signed = f"{where}?generation={generation}&signature={hub.signature(where, generation)}"
                self._send(302, {**headers, "Location": hub.storage_url + signed}, b"", head)
                return
            if filename.endswith(".index.json") and self._document_fault("index", head):
                return
            self._serve_file(path, headers, f"{repo}/{filename}", head)

        def _storage(self, path: str, query: str, head: bool) -> None:
            """The storage server: a file by signed URL, no token needed, refused once expired."""
            args = parse_qs(query)
            generation = args.get("generation", ["-1"])[0]
            signature = args.get("signature", [""])[0]
            with hub._lock:
                current = hub.generation
                if hub.expire_after is not None:
                    if hub.expire_after == 0:
                        hub.generation += 1
                        hub.expire_after = None
                    else:
                        hub.expire_after -= 1
            expected = hub.signature(path, int(generation)) if generation.isdigit() else ""
            if not hmac.compare_digest(signature, expected):
                self._send(403, {"Content-Type": "application/xml"}, b"<Error>SignatureDoesNotMatch</Error>", head)
                return
            if int(generation) != current:
                body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
                self._send(403, {"Content-Type": "application/xml"}, body, head)
                return
            org, name, commit, filename = unquote(path).lstrip("/").split("/", 3)  # signed: one we issued
            repo = f"{org}/{name}"
            file = hub.root / repo / commit / filename
            if not file.is_file():
                self._send(404, {}, b"<Error>NoSuchKey</Error>", head)
                return
            self._serve_file(file, self._file_headers(file, hub.sha(repo, commit)), f"{repo}/{filename}", head)

        def _file_headers(self, path: Path, sha: str) -> dict[str, str]:
            headers = {
                "X-Repo-Commit": sha,
                "ETag": f'"{hub.etag(path)}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if path.name.endswith(_WEIGHTS):
                headers["X-Linked-Etag"] = headers["ETag"]
                headers["X-Linked-Size"] = str(path.stat().st_size)
            return headers

        def _serve_file(self, path: Path, headers: dict[str, str], key: str, head: bool) -> None:
            size = path.stat().st_size
            start, end, status = 0, size, 200
            range_header = self.headers.get("Range")
            if range_header:
                m = _RANGE.match(range_header.strip())
                if m is None or (not m[1] and not m[2]):
                    self._error(416, None, head)
                    return
                if m[1]:
                    start, end = int(m[1]), (min(int(m[2]) + 1, size) if m[2] else size)
                else:
                    start, end = max(size - int(m[2]), 0), size
                if start >= size or start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
                if start > 8:
                    with hub._lock:
                        hub.data_requests += 1
                fault = None if head else hub.take_fault("data" if start > 8 else "header")
                if fault is not None and self._range_fault(fault, path, headers, start, end, size, key):
                    return
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(end - start))
            if head:
                self._finish()
            self.end_headers()
            if not head:
                self._copy(path, start, end, key)

        # -- misbehaviour -----------------------------------------------------------------------

        def _range_fault(
            self, fault: Fault, path: Path, headers: dict[str, str], start: int, end: int, size: int, key: str
        ) -> bool:
            """Answer a ranged GET as ``fault`` says; False when the answer is the normal one, cut short."""
            if fault.kind == "drop":
                self.send_response(206)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                self._copy(path, start, min(end, start + fault.after), key, whole=False)
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)
                return True
            if fault.kind == "stall":
                self.send_response(206)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                self._copy(path, start, min(end, start + fault.after), key, whole=False)
                self.wfile.flush()
                hub.stopping.wait(60)
                self.close_connection = True
            elif fault.kind == "trickle":
                self.send_response(206)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                self.close_connection = True
                self._copy(path, start, min(end, start + fault.after), key, whole=False)
                data = path.read_bytes()[start + fault.after : end]
                try:
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        hub.count(key, 1)
                        if hub.stopping.wait(fault.interval):
                            return True
                except OSError:
                    return True
            elif fault.kind == "full":
                self._endless(200, {k: v for k, v in headers.items() if k != "Content-Range"})
            elif fault.kind == "content-range":
                headers["Content-Range"] = fault.content_range.format(start=start, end=end - 1, size=size)
                self._send(206, headers, path.read_bytes()[start:end], head=False)
            elif fault.kind == "content-length":
                self.send_response(206)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                self._copy(path, start, end, key)
                self.close_connection = True
            elif fault.kind == "longer":
                self.send_response(206)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._chunked(path.read_bytes()[start:end], key)
            elif fault.kind == "status":
                self._send(fault.status, fault.headers, fault.body, head=False)
            else:
                raise ValueError(f"unknown range fault {fault.kind!r}")
            return True

        def _document_fault(self, target: str, head: bool) -> bool:
            fault = None if head else hub.take_fault(target)
            if fault is None:
                return False
            if fault.kind == "endless":
                self._endless(200, {"Content-Type": "application/json"})
            elif fault.kind == "status":
                self._send(fault.status, fault.headers, fault.body, head=False)
            else:
                raise ValueError(f"unknown document fault {fault.kind!r}")
            return True

        def _endless(self, status: int, headers: dict[str, str]) -> None:
            """A body that goes on until the client hangs up (it claims ``ENDLESS`` bytes)."""
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(ENDLESS))
            self.end_headers()
            block = b"\0" * (64 << 10)
            self.close_connection = True
            try:
                while hub.bogus_sent < ENDLESS:
                    self.wfile.write(block)
                    with hub._lock:
                        hub.bogus_sent += len(block)
            except OSError:
                return

        def _chunked(self, data: bytes, key: str) -> None:
            """``data`` in chunked encoding, then zeros until the client hangs up."""
            self.close_connection = True
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                hub.count(key, len(data))
                block = b"\0" * (64 << 10)
                while hub.bogus_sent < ENDLESS:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    with hub._lock:
                        hub.bogus_sent += len(block)
            except OSError:
                return

        def _copy(self, path: Path, start: int, end: int, key: str, whole: bool = True) -> None:
            """Bytes ``start``–``end`` of ``path``, at most ``hub.rate`` bytes per second; ``whole``:
            they end the answer."""
            rate = hub.rate
            piece = _CHUNK if rate is None else int(min(256 << 10, max(512, rate // 50)))
            began, sent = time.monotonic(), 0
            with path.open("rb") as f:
                f.seek(start)
                left = end - start
                while left:
                    chunk = f.read(min(piece, left))
                    if whole and len(chunk) == left:
                        self._finish()
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True
                        return
                    hub.count(key, len(chunk))
                    left -= len(chunk)
                    sent += len(chunk)
                    if rate is not None and left:
                        delay = began + sent / rate - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)

    return Handler


class Proxy:
    """A forward HTTP proxy (``HTTP_PROXY=proxy.url``) that records the URLs it fetched."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self._server = _Server(("127.0.0.1", 0), _proxy_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def _proxy_handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._forward()

        def do_HEAD(self) -> None:
            self._forward()

        def _forward(self) -> None:
            url = urlsplit(self.path)
            proxy.urls.append(self.path)
            upstream = http.client.HTTPConnection(url.netloc, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, url.path + (f"?{url.query}" if url.query else ""), headers=headers)
            resp = upstream.getresponse()
            body = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            upstream.close()

    return Handler
