"""Checkpoints on the Hugging Face Hub, read tensor by tensor without downloading the model.

A reference (``org/name``, ``org/name@revision``) is resolved to its commit sha once
(``resolve``); every later request names that sha, so a branch that moves mid-run cannot mix files.
Then, shard by shard: a file already in the Hugging Face cache is read there, with no network; any
other safetensors shard is read remotely, its header with two small ranged GETs (``transport``) and
then only the byte ranges of the tensors the run needs, fetched ahead of the reads over several
connections (``prefetch``), straight into memory. ``.bin`` checkpoints cannot be read in pieces:
their shards are downloaded whole into the Hugging Face cache, with a warning.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from huggingface_hub import get_token, hf_hub_download, hf_hub_url

from ..._version import __version__
from ...errors import HubError, HubOfflineError, SourceError, UsageError
from ...io import safefs, stfile
from ..base import (
    BIN_INDEX,
    BIN_SINGLE,
    CONFIG_JSON,
    INDEX_LIMIT,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    Source,
    Transfer,
    parse_config,
    parse_index,
)
from ..local import TorchBinSource
from .prefetch import Plan, Pool, Read
from .resolve import CACHE_FIX, SHA, complete, exists, is_dir, model_info, offline_sha, server, translate
from .settings import MAX_CONNECTIONS, Hub, HubRef
from .transport import Remote


def open_hub(ref: HubRef, hub: Hub, transfer: Transfer) -> HubSource:
    """Resolve ``ref`` to its commit: one API call, none with HF_HUB_OFFLINE=1 or a cached commit sha.

    The token is the one given, else HF_TOKEN, else the stored login (looked up here, not at start-up).
    ``hub.connections`` caps the run's HTTP connections: sources opened with the same count share them.
    """
    if not 1 <= hub.connections <= MAX_CONNECTIONS:
        raise UsageError(f"connections {hub.connections}: give a number from 1 to {MAX_CONNECTIONS}")
    hub = replace(hub, token=hub.token or get_token())
    revision = ref.revision or "main"
    if hub.offline:
        sha = offline_sha(ref.repo_id, revision, hub)
        return HubSource(ref.repo_id, revision, sha, None, hub, transfer)
    if SHA.match(revision) and complete(hub.snapshot(ref.repo_id, revision)):
        return HubSource(ref.repo_id, revision, revision, None, hub, transfer)
    pool = Pool.acquire(hub.connections)
    try:
        sha, files = model_info(pool, hub, ref.repo_id, revision)
    except BaseException:
        pool.release()
        raise
    if hub.refs is not None and sha != revision:
        hub.refs.put(hub.endpoint, ref.repo_id, revision, sha)
    return HubSource(ref.repo_id, revision, sha, files, hub, transfer, pool)


class _LocalShard:
    """A shard already in the Hugging Face cache."""

    def __init__(self, path: Path, where: str) -> None:
        self.where = where
        self._file = safefs.open_file(path, HubError, where=where, fix=CACHE_FIX)
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

    def __init__(self, file: Remote, header: stfile.Header) -> None:
        self.file, self.header = file, header

    @classmethod
    def open(cls, pool: Pool, file: Remote, count: Callable[[int], None]) -> _RemoteShard:
        """Read the header (call on a worker): the 8-byte length, then the JSON."""
        where = file.where
        first = 8 if file.size is None else min(8, file.size)
        prefix = bytearray(first)
        if first:
            pool.transport.get(file, 0, first, memoryview(prefix), count)
        raw = bytearray(stfile.header_length(bytes(prefix), where, file.size))
        pool.transport.get(file, 8, 8 + len(raw), memoryview(raw), count)
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
        pool: Pool | None = None,
    ) -> None:
        super().__init__(repo_id, sha)
        self.repo_id, self.requested, self.sha = repo_id, requested, sha
        self.hub, self._transfer = hub, transfer
        self._server = server(hub, repo_id)
        self._files = files  # the repo's files and sizes; None: use the cached snapshot's names
        self._weight_map: dict[str, str] | None = None
        self._bin = False
        self._shards: dict[str, _LocalShard | _RemoteShard] = {}
        self._bins: dict[str, TorchBinSource] = {}
        self._pool = pool
        self._plan: Plan | None = None
        self._lock = threading.Lock()
        self._progress: Callable[[int], None] = lambda n: None

    def where(self, filename: str | None = None) -> str:
        at = f"{self.repo_id}@{self.sha[:12]}"
        return at if filename is None else f"{at}/{filename}"

    def fingerprint(self) -> str:
        return self.sha

    def cache_identity(self) -> str:
        return f"hub:{self.repo_id}@{self.sha}"

    def public_name(self) -> str:
        return self.repo_id

    # -- network -------------------------------------------------------------------------------

    def _net(self) -> Pool:
        if self._pool is None:
            self._pool = Pool.acquire(self.hub.connections)
        return self._pool

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_downloaded += n

    def _count_tensor(self, n: int) -> None:
        self._count(n)
        self._progress(n)

    def _remote(self, filename: str) -> Remote:
        size = self._files.get(filename) if self._files is not None else None
        url = hf_hub_url(self.repo_id, filename, revision=self.sha, endpoint=self.hub.endpoint)
        return Remote(self._server, self.where(filename), url, size)

    # -- files ---------------------------------------------------------------------------------

    def _cached(self, filename: str) -> Path | None:
        """The file in the Hugging Face cache at this commit, if there is one (not opened yet)."""
        path = self.hub.snapshot(self.repo_id, self.sha) / filename
        return path if exists(path) else None

    def _offline_missing(self, filenames: Collection[str]) -> HubOfflineError:
        return HubOfflineError(
            f"HF_HUB_OFFLINE=1: {self.where()} needs {', '.join(sorted(filenames))}, not in the Hugging Face "
            f"cache ({self.hub.hf_cache}); download once online",
            repo_id=self.repo_id,
            revision=self.sha,
        )

    def _listing(self) -> set[str]:
        if self._files is None:
            snapshot = self.hub.snapshot(self.repo_id, self.sha)
            if not exists(snapshot):
                return set()
            with safefs.Directory(snapshot, HubError, fix=CACHE_FIX) as d:
                # Whatever is not a directory counts: opening it says what is wrong with it.
                self._files = {n: None for n in d.names() if not is_dir(d, n)}
        return set(self._files)

    def _small_file(self, filename: str) -> bytes:
        """A JSON index: from the HF cache, else one GET into memory (at most ``INDEX_LIMIT`` bytes)."""
        local = self._cached(filename)
        if local is not None:
            return safefs.read_small(local, HubError, INDEX_LIMIT, where=self.where(filename), fix=CACHE_FIX)[0]
        if self.hub.offline:
            raise self._offline_missing([filename])
        pool, file = self._net(), self._remote(filename)
        raw = pool.call(lambda: pool.transport.document(file, INDEX_LIMIT))
        self._count(len(raw))
        return raw

    def read_model_config(self) -> Mapping[str, object] | None:
        if CONFIG_JSON not in self._listing() and self._files is not None:
            return None
        return parse_config(self._small_file(CONFIG_JSON), self.where(CONFIG_JSON))

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
            with translate(self.hub, self.repo_id, self.where(f)):
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
                reads.append(Read(position, name, shard.file, entry.start, entry.end))
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
                pool.call(lambda: pool.transport.get(file, entry.start, entry.end, view, self._count_tensor))
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
