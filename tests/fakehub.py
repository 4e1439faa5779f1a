"""A local stand-in for the Hugging Face Hub: enough of it for huggingface_hub and safelora's ranged reads.

It serves ``root/<org>/<name>/<dir>/<files>``. Each ``<dir>`` is one commit with a deterministic sha,
and also a branch of the same name; ``move`` points a branch at another commit. Every body byte sent
from a ``resolve`` URL is counted per file, so tests and the benchmark can assert on traffic. Used by
tests/ (as a module) and benchmarks/bench_hub.py (through sys.path).

What huggingface_hub 2.4 needs from it is written down in HUB_TESTING.md: ``X-Repo-Commit``, a quoted
``ETag``, ``Content-Length``, ``Accept-Ranges`` and 206 answers on ``resolve``; ``/api/models`` with
``sha`` and ``siblings``; ``paths-info``; ``X-Error-Code`` on 404s; never a body on HEAD.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

from safelora_cli.stfile import read_header

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 20
_HASHED_UP_TO = 100 << 20  # files above this get a stat-based ETag instead of hashing gigabytes


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


class NotFound(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class FakeHub:
    """Start with ``with FakeHub(root) as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.branches: dict[str, dict[str, str]] = {}  # repo → branch → commit dir, beyond the defaults
        self.gated: dict[str, set[str]] = {}  # repo → tokens with access; no token: 401, other token: 403
        self.private: set[str] = set()  # answered 401 everywhere, like a repo the caller cannot see
        self.drop_after: int | None = None  # cut the next tensor-data response after this many bytes
        self.sent: Counter[str] = Counter()  # "org/name/file" → body bytes sent from resolve URLs
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._lock = threading.Lock()
        self._etags: dict[Path, str] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def sha(repo: str, commit_dir: str) -> str:
        """The commit sha of ``root/repo/commit_dir``."""
        return hashlib.sha1(f"{repo}@{commit_dir}".encode()).hexdigest()

    def move(self, repo: str, branch: str, commit_dir: str) -> None:
        self.branches.setdefault(repo, {})[branch] = commit_dir

    def reset(self) -> None:
        with self._lock:
            self.sent.clear()
            self.requests.clear()

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

    def count(self, key: str, n: int) -> None:
        with self._lock:
            self.sent[key] += n


def _files(commit: Path) -> list[Path]:
    return sorted(p for p in commit.rglob("*") if p.is_file())


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else every small body waits ~40 ms for a delayed ACK

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_POST(self) -> None:
            self._route(head=False)

        # -- plumbing -------------------------------------------------------------------------

        def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
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

        def _route(self, head: bool) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            with hub._lock:
                hub.requests.append((self.command, url.path))
            try:
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    self._api(parts[2] + "/" + parts[3], parts[4:], url.query, head)
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
            size = path.stat().st_size
            headers = {
                "X-Repo-Commit": hub.sha(repo, commit.name),
                "ETag": f'"{hub.etag(path)}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if size >= 10 * 1024 * 1024:
                headers["X-Linked-Etag"] = headers["ETag"]
                headers["X-Linked-Size"] = str(size)
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
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not head:
                self._copy(path, start, end, f"{repo}/{filename}")

        def _copy(self, path: Path, start: int, end: int, key: str) -> None:
            limit = None
            if hub.drop_after is not None and start > 0 and end - start > hub.drop_after:
                limit, hub.drop_after = hub.drop_after, None
            with path.open("rb") as f:
                f.seek(start)
                left = end - start
                while left:
                    n = min(_CHUNK, left) if limit is None else min(_CHUNK, left, limit)
                    chunk = f.read(n)
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    hub.count(key, len(chunk))
                    left -= len(chunk)
                    if limit is not None:
                        limit -= len(chunk)
                        if limit == 0:
                            self.close_connection = True
                            self.wfile.flush()
                            self.connection.shutdown(2)
                            return

    return Handler
