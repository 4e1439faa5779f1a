"""Checkpoints on the Hugging Face Hub, read tensor by tensor without downloading the model.

A reference (``org/name``, ``org/name@revision``) is resolved to its commit sha once; every later
request names that sha, so a branch that moves mid-run cannot mix files. Then, shard by shard: a
file already in the Hugging Face cache is read there, with no network; any other safetensors shard
is read remotely, its header with a ranged GET and then only the byte ranges of the tensors the run
needs (consecutive ones in one request), straight into memory. ``.bin`` checkpoints cannot be read
in pieces: their shards are downloaded whole into the Hugging Face cache, with a warning.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx2
import torch
from huggingface_hub import HfApi, get_session, get_token, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

from . import __version__, stfile
from .errors import HubError, SourceError
from .sources import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    Hub,
    HubRef,
    Source,
    TorchBinSource,
    Transfer,
    open_shard,
    parse_index,
)

_SHA = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_CHUNK = 1 << 20
_RETRIES = 3  # per request, for dropped connections, 429 and 5xx
_BACKOFF = 1.0  # seconds before the first retry; doubles after each


def open_hub(ref: HubRef, hub: Hub, transfer: Transfer) -> HubSource:
    """Resolve ``ref`` to its commit: one API call, none with HF_HUB_OFFLINE=1 or a cached commit sha.

    The token is --token, else HF_TOKEN, else the stored login (looked up here, not at start-up).
    """
    hub = replace(hub, token=hub.token or get_token())
    revision = ref.revision or "main"
    if hub.offline:
        sha = _offline_sha(ref.repo_id, revision, hub)
        return HubSource(ref.repo_id, revision, sha, None, hub, transfer)
    if _SHA.match(revision) and _complete(hub.snapshot(ref.repo_id, revision)):
        return HubSource(ref.repo_id, revision, revision, None, hub, transfer)
    with _translate(hub, ref.repo_id, f"{ref.repo_id}@{revision}"):
        info = _api(hub).model_info(ref.repo_id, revision=revision)
    if info.sha is None:
        raise HubError(f"{ref.repo_id}@{revision}: the Hub did not say which commit this is")
    if hub.refs is not None and info.sha != revision:
        hub.refs.put(hub.endpoint, ref.repo_id, revision, info.sha)
    files = [s.rfilename for s in info.siblings or []]
    return HubSource(ref.repo_id, revision, info.sha, files, hub, transfer)


def _api(hub: Hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.token or False, library_name="safelora", library_version=__version__)


def _headers(hub: Hub) -> dict[str, str]:
    headers = build_hf_headers(token=hub.token or False, library_name="safelora", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # byte ranges of the file as stored
    return headers


def _offline_sha(repo_id: str, revision: str, hub: Hub) -> str:
    if _SHA.match(revision):
        return revision
    ref_file = hub.repo_cache(repo_id) / "refs" / revision
    if not Path(revision).is_absolute() and ".." not in Path(revision).parts and ref_file.is_file():
        sha = ref_file.read_text(encoding="utf-8").strip()
        if _SHA.match(sha):
            return sha
    sha_memo = hub.refs.get(hub.endpoint, repo_id, revision) if hub.refs is not None else None
    if sha_memo is not None and _SHA.match(sha_memo):
        return sha_memo
    raise HubError(
        f"HF_HUB_OFFLINE=1: no commit is recorded for {repo_id}@{revision} in the Hugging Face cache "
        f"({hub.hf_cache}) or safelora's cache; run once online, or pass a commit sha"
    )


def _complete(snapshot: Path) -> bool:
    """Whether a cached snapshot holds a whole checkpoint (so it can be used without asking the Hub)."""
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (snapshot / index).is_file():
            try:
                shards = set(parse_index((snapshot / index).read_bytes(), str(snapshot / index)).values())
            except (OSError, SourceError):
                return False
            return all((snapshot / s).is_file() for s in shards)
        if (snapshot / single).is_file():
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
            msg = f"{repo_id} is gated and the token's account has no access yet: request it at {page}"
        else:
            msg = f"{repo_id} is gated: request access at {page}, then pass that account's token (--token or HF_TOKEN)"
        raise HubError(msg) from None
    except RepositoryNotFoundError as e:
        if _status(e) == 401:
            raise HubError(_denied(hub, repo_id, 401)) from None
        raise HubError(f"{repo_id}: no such repository on {hub.endpoint}, nor a local directory of that name") from None
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
            raise HubError(_denied(hub, repo_id, status)) from None
        detail = f" ({e.server_message.strip()[:160]})" if e.server_message else ""
        raise HubError(f"{what}: the Hub answered HTTP {status}{detail}") from None
    except httpx2.TransportError as e:
        reason = str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__
        raise HubError(
            f"cannot reach {hub.endpoint} ({reason}); check the network or proxy, "
            "or set HF_HUB_OFFLINE=1 to use cached files only"
        ) from None


def _status(e: HfHubHTTPError) -> int | None:
    return e.response.status_code if e.response is not None else None


def _denied(hub: Hub, repo_id: str, status: int) -> str:
    fix = "the token given has no access to it" if hub.token else "pass a token with access (--token, HF_TOKEN)"
    return f"{repo_id}: access denied (HTTP {status}); the repo is private or gated, or does not exist: {fix}"


class _Retry(Exception):
    """A response worth retrying (429, 5xx) or a stream that ended early."""


def _check_range(resp: httpx2.Response, start: int, where: str) -> int:
    """The file's total size from a 206's Content-Range; anything else is an error."""
    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if resp.status_code != 206 or m is None or int(m[1]) != start:
        raise HubError(
            f"{where}: the server did not honour the byte range (HTTP {resp.status_code}); "
            "ranged reads need a Hub endpoint that supports them"
        )
    return int(m[3])


class _Stream:
    """One ranged GET read front to back, reopened where it stopped if the connection drops."""

    def __init__(self, shard: _RemoteShard, start: int, end: int) -> None:
        self.shard, self.pos, self.end = shard, start, end
        self._resp: httpx2.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._left = memoryview(b"")

    def _open(self) -> Iterator[bytes]:
        client = get_session()
        headers = {**_headers(self.shard.source.hub), "Range": f"bytes={self.pos}-{self.end - 1}"}
        resp = client.send(client.build_request("GET", self.shard.url, headers=headers), stream=True)
        if resp.status_code == 429 or resp.status_code >= 500:
            resp.close()
            raise _Retry(f"HTTP {resp.status_code}")
        if resp.status_code >= 400:
            resp.read()
            resp.close()
            hf_raise_for_status(resp)
        try:
            _check_range(resp, self.pos, self.shard.where)
        except HubError:
            resp.close()
            raise
        self._resp = resp
        return resp.iter_raw(_CHUNK)

    def _chunk(self) -> bytes:
        attempt = 0
        while True:
            try:
                if self._chunks is None:
                    self._chunks = self._open()
                chunk = next(self._chunks, b"")
                if not chunk:
                    raise _Retry("the response ended early")
                return chunk
            except (httpx2.TransportError, _Retry) as e:
                self.close()
                if attempt == _RETRIES:
                    raise HubError(
                        f"{self.shard.where}: lost the connection to {self.shard.source.hub.endpoint} "
                        f"at byte {self.pos} ({e}), {_RETRIES} retries failed; check the network and run again"
                    ) from None
                time.sleep(_BACKOFF * 2**attempt)
                attempt += 1

    def readinto(self, view: memoryview, progress: Callable[[int], None]) -> None:
        got = 0
        while got < len(view):
            if not self._left:
                chunk = self._chunk()
                self.shard.source.bytes_downloaded += len(chunk)
                self._left = memoryview(chunk)
            n = min(len(self._left), len(view) - got)
            view[got : got + n] = self._left[:n]
            self._left = self._left[n:]
            got += n
            self.pos += n
            progress(n)

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp, self._chunks, self._left = None, None, memoryview(b"")


class _LocalShard:
    """A shard already in the Hugging Face cache."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = stfile.read_header(path)
        self._file = open_shard(path)

    def read(self, entry: stfile.TensorEntry, buf: bytearray | None, progress: Callable[[int], None]) -> torch.Tensor:
        """Read from disk; ``progress`` counts downloads only, so it is not advanced."""
        return stfile.read_tensor(self._file, entry, str(self.path), buf)

    def close(self) -> None:
        self._file.close()


class _RemoteShard:
    """A safetensors file on the Hub: its header from two small ranged GETs, then tensors on demand."""

    def __init__(self, source: HubSource, filename: str) -> None:
        self.source, self.where = source, source.where(filename)
        self.url = hf_hub_url(source.repo_id, filename, revision=source.sha, endpoint=source.hub.endpoint)
        prefix, size = self._get(0, 8)
        raw, _ = self._get(8, 8 + stfile.header_length(prefix, self.where, size))
        self.header = stfile.parse_header(raw, self.where, size)
        self.run_end: dict[int, int] = {}  # planned coalesced runs: first tensor's start → run's end
        self._stream: _Stream | None = None

    def _get(self, start: int, end: int) -> tuple[bytes, int]:
        headers = {**_headers(self.source.hub), "Range": f"bytes={start}-{end - 1}"}
        with _translate(self.source.hub, self.source.repo_id, self.where):
            resp = http_backoff("GET", self.url, headers=headers, max_retries=_RETRIES, base_wait_time=_BACKOFF)
            hf_raise_for_status(resp)
        size = _check_range(resp, start, self.where)
        self.source.bytes_downloaded += len(resp.content)
        if len(resp.content) != end - start:
            raise HubError(f"{self.where}: asked for {end - start} bytes, got {len(resp.content)}; run again")
        return resp.content, size

    def read(self, entry: stfile.TensorEntry, buf: bytearray | None, progress: Callable[[int], None]) -> torch.Tensor:
        if buf is None or len(buf) < entry.nbytes:
            buf = bytearray(entry.nbytes)
        view = memoryview(buf)[: entry.nbytes]
        if self._stream is None or self._stream.pos != entry.start:
            self.close()
            self._stream = _Stream(self, entry.start, max(self.run_end.get(entry.start, 0), entry.end))
        with _translate(self.source.hub, self.source.repo_id, self.where):
            self._stream.readinto(view, progress)
        if self._stream.pos == self._stream.end:
            self.close()
        return stfile.tensor_from_bytes(entry, view)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _coalesce(entries: Sequence[tuple[str, stfile.TensorEntry]]) -> dict[str, dict[int, int]]:
    """Runs of tensors read one after another that also lie back to back in one file: one GET each.

    Returns, per file, each run's first start → the run's end.
    """
    runs: dict[str, dict[int, int]] = {}
    first = prev = None
    for filename, e in entries:
        if prev is not None and first is not None and prev[0] == filename and prev[1].end == e.start:
            runs[filename][first] = e.end
        else:
            runs.setdefault(filename, {})[e.start] = e.end
            first = e.start
        prev = (filename, e)
    return runs


class HubSource(Source):
    """A checkpoint in a Hub repo at one commit; shards come from the HF cache or ranged GETs."""

    def __init__(
        self, repo_id: str, requested: str, sha: str, files: list[str] | None, hub: Hub, transfer: Transfer
    ) -> None:
        super().__init__(repo_id, sha)
        self.repo_id, self.requested, self.sha = repo_id, requested, sha
        self.hub, self._transfer = hub, transfer
        self._files = files  # the repo's file list; None: use the cached snapshot's
        self._weight_map: dict[str, str] | None = None
        self._bin = False
        self._shards: dict[str, _LocalShard | _RemoteShard] = {}
        self._bins: dict[str, TorchBinSource] = {}
        self._progress: Callable[[int], None] = lambda n: None

    def where(self, filename: str | None = None) -> str:
        at = f"{self.repo_id}@{self.sha[:12]}"
        return at if filename is None else f"{at}/{filename}"

    def fingerprint(self) -> str:
        return self.sha

    def cache_identity(self) -> str:
        return f"hub:{self.repo_id}@{self.sha}"

    # -- files ---------------------------------------------------------------------------------

    def _cached(self, filename: str) -> Path | None:
        found = try_to_load_from_cache(self.repo_id, filename, cache_dir=self.hub.hf_cache, revision=self.sha)
        return Path(found) if isinstance(found, str) else None

    def _offline_missing(self, filenames: Collection[str]) -> HubError:
        return HubError(
            f"HF_HUB_OFFLINE=1: {self.where()} needs {', '.join(sorted(filenames))}, not in the Hugging Face "
            f"cache ({self.hub.hf_cache}); download once online (hf download {self.repo_id} --revision "
            f"{self.sha}) or unset HF_HUB_OFFLINE"
        )

    def _listing(self) -> set[str]:
        if self._files is None:
            snapshot = self.hub.snapshot(self.repo_id, self.sha)
            self._files = [p.name for p in snapshot.iterdir() if p.is_file()] if snapshot.is_dir() else []
        return set(self._files)

    def _small_file(self, filename: str) -> bytes:
        """A JSON index: from the HF cache, else one GET into memory."""
        local = self._cached(filename)
        if local is not None:
            return local.read_bytes()
        if self.hub.offline:
            raise self._offline_missing([filename])
        url = hf_hub_url(self.repo_id, filename, revision=self.sha, endpoint=self.hub.endpoint)
        with _translate(self.hub, self.repo_id, self.where(filename)):
            resp = http_backoff("GET", url, headers=_headers(self.hub), max_retries=_RETRIES, base_wait_time=_BACKOFF)
            hf_raise_for_status(resp)
        self.bytes_downloaded += len(resp.content)
        return resp.content

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

    def _shard(self, filename: str) -> _LocalShard | _RemoteShard:
        shard = self._shards.get(filename)
        if shard is None:
            local = self._cached(filename)
            if local is not None:
                shard = _LocalShard(local)
            elif self.hub.offline:
                raise self._offline_missing([filename])
            else:
                shard = _RemoteShard(self, filename)
            self._shards[filename] = shard
        return shard

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
        with _translate(self.hub, self.repo_id, self.where()):
            infos = _api(self.hub).get_paths_info(self.repo_id, missing, revision=self.sha)
        sizes = {i.path: getattr(i, "size", 0) for i in infos}
        total = sum(sizes.values())
        self._transfer.warn(
            f"{self.where()} has only PyTorch .bin weights, which cannot be read in pieces: downloading "
            f"{len(missing)} whole file(s), {total / 1e9:.2f} GB, into the Hugging Face cache ({self.hub.hf_cache})"
        )
        for f in missing:
            with _translate(self.hub, self.repo_id, self.where(f)):
                path = hf_hub_download(
                    self.repo_id,
                    f,
                    revision=self.sha,
                    cache_dir=self.hub.hf_cache,
                    endpoint=self.hub.endpoint,
                    token=self.hub.token or False,
                    library_name="safelora",
                    library_version=__version__,
                )
            self.bytes_downloaded += sizes.get(f, 0)
            self._bins[f] = self._bin_source(f, Path(path))

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
        """Open every shard the run needs (offline: name all missing files at once), plan coalesced
        ranges and start the progress bar for the bytes to download. .bin shards are downloaded here."""
        weight_map = self._map()
        files = {weight_map[n] for n in names}
        if self._bin:
            self._download_bins(files)
            return
        if self.hub.offline:
            missing = [f for f in files if f not in self._shards and self._cached(f) is None]
            if missing:
                raise self._offline_missing(missing)
        remote = [(weight_map[n], self._entry(n)[1]) for n in names]
        remote = [(f, e) for f, e in remote if isinstance(self._shards[f], _RemoteShard)]
        for filename, runs in _coalesce(remote).items():
            shard = self._shards[filename]
            if isinstance(shard, _RemoteShard):
                shard.run_end = runs
        total = sum(e.nbytes for _, e in remote)
        if total:
            self._progress = self._transfer.task(self.repo_id, total)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._bin:
            return self._bin_file(self._map()[name]).shape(name)
        return self._entry(name)[1].shape

    def nbytes(self, name: str) -> int:
        if self._bin:
            return self._bin_file(self._map()[name]).nbytes(name)
        return self._entry(name)[1].nbytes

    def read(self, name: str, buf: bytearray | None = None) -> torch.Tensor:
        if self._bin:
            t = self._bin_file(self._map()[name]).read(name)
            self.bytes_read += t.numel() * t.element_size()
            return t
        shard, entry = self._entry(name)
        t = shard.read(entry, buf, self._progress)
        self.bytes_read += entry.nbytes
        return t

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        for source in self._bins.values():
            source.close()
