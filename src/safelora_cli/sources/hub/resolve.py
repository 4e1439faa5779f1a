"""A Hub reference resolved to its commit sha, and the Hub's failures as one line that names the fix.

Online, one API call (the model info) names the commit and lists the repo's files with their sizes;
with HF_HUB_OFFLINE=1, the commit comes from the Hugging Face cache's ``refs/``, else from the ref
memo. The Hub as a ``transport.Server``: its user agent, its token (for its own origin only), and
its error answers understood (``translate``).
"""

from __future__ import annotations

import os
import platform
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import httpx2
import huggingface_hub
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import hf_raise_for_status

from ..._version import __version__
from ...errors import HubAccessError, HubError, HubRepoNotFoundError, HubUnreachableError, SourceError
from ...io import safefs, strict
from ..base import BIN_INDEX, BIN_SINGLE, INDEX_LIMIT, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, parse_index
from .prefetch import Pool
from .settings import Hub
from .transport import Remote, Server, one_line, reason

SHA = re.compile(r"^[0-9a-f]{40}$")
CACHE_FIX = "delete it from the Hugging Face cache and run again"
_INFO_LIMIT = 64 << 20  # the model info (one line per file of the repo)
_REF_LIMIT = 1024  # a commit sha in the Hugging Face cache's refs/
_USER_AGENT = f"safelora/{__version__}; hf_hub/{huggingface_hub.__version__}; python/{platform.python_version()}"


def server(hub: Hub, repo_id: str) -> Server:
    """The Hub, as the transport reaches it for one repo.

    Not huggingface_hub's ``build_hf_headers``: its user agent looks up a registry on the endpoint
    (a body of any size, read whole) and caches it in HF_HOME.
    """

    def refuse(resp: httpx2.Response, body: bytes, where: str) -> NoReturn:
        """An error answer as one line (the Hub's own error codes understood), given the start of its body."""
        kept = {
            k: v for k, v in resp.headers.items() if k.lower() in ("x-error-code", "x-error-message", "content-type")
        }
        capped = httpx2.Response(resp.status_code, headers=kept, content=body, request=resp.request)
        with translate(hub, repo_id, where):
            hf_raise_for_status(capped)
        raise HubError(f"{where}: the server answered HTTP {resp.status_code}; check HF_ENDPOINT")

    return Server(
        home=hub.endpoint,
        headers={"User-Agent": _USER_AGENT},
        credentials={"Authorization": f"Bearer {hub.token}"} if hub.token else {},
        error=HubError,
        check="check HF_ENDPOINT",
        ranges="ranged reads need a Hub endpoint or mirror that honours byte ranges; check HF_ENDPOINT",
        storage="the storage server the Hub redirects to",
        refuse=refuse,
        unreachable=lambda e: HubUnreachableError(unreachable(hub, e)),
    )


def model_info(pool: Pool, hub: Hub, repo_id: str, revision: str) -> tuple[str, dict[str, int | None]]:
    """The commit ``revision`` names and the repo's files with their sizes, from the Hub's API."""
    what = f"{repo_id}@{revision}"
    url = f"{hub.endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}?blobs=true"
    info = Remote(server(hub, repo_id), what, url)
    raw = pool.call(lambda: pool.transport.document(info, _INFO_LIMIT, reconnect=False))
    try:
        doc = strict.loads(raw)
    except strict.InvalidJSON as e:
        raise HubError(
            f"{what}: the Hub's model info is not valid JSON ({one_line(str(e))}); check HF_ENDPOINT"
        ) from None
    sha = doc.get("sha") if isinstance(doc, dict) else None
    if not isinstance(sha, str) or not SHA.match(sha):
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


def offline_sha(repo_id: str, revision: str, hub: Hub) -> str:
    """The commit ``revision`` names, without the network: the HF cache's ``refs/``, then the memo."""
    if SHA.match(revision):
        return revision
    ref_file = hub.repo_cache(repo_id) / "refs" / revision
    if not Path(revision).is_absolute() and ".." not in Path(revision).parts and exists(ref_file):
        sha = safefs.read_small(ref_file, HubError, _REF_LIMIT, fix=CACHE_FIX)[0].decode("utf-8", "replace").strip()
        if SHA.match(sha):
            return sha
    sha_memo = hub.refs.get(hub.endpoint, repo_id, revision) if hub.refs is not None else None
    if sha_memo is not None and SHA.match(sha_memo):
        return sha_memo
    raise HubUnreachableError(
        f"HF_HUB_OFFLINE=1: no commit is recorded for {repo_id}@{revision} in the Hugging Face cache "
        f"({hub.hf_cache}) or safelora's cache; run once online, or pass a commit sha"
    )


def exists(path: Path) -> bool:
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


def is_dir(snapshot: safefs.Directory, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=snapshot.fd).st_mode)
    except OSError:
        return False


def complete(path: Path) -> bool:
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
def translate(hub: Hub, repo_id: str, what: str) -> Iterator[None]:
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
        detail = f" ({one_line(e.server_message)})" if e.server_message else ""
        raise HubError(f"{what}: the Hub answered HTTP {status}{detail}") from None
    except httpx2.TransportError as e:
        raise HubUnreachableError(unreachable(hub, e)) from None


def unreachable(hub: Hub, e: BaseException) -> str:
    return (
        f"cannot reach {hub.endpoint} ({reason(e)}); check the network or proxy, "
        "or set HF_HUB_OFFLINE=1 to use cached files only"
    )


def _status(e: HfHubHTTPError) -> int | None:
    return e.response.status_code if e.response is not None else None


def _denied(hub: Hub, repo_id: str, status: int) -> HubError:
    what = f"{repo_id}: access denied (HTTP {status}); the repo is private or gated, or does not exist"
    if hub.token:
        return HubError(f"{what}: the token given has no access to it")
    return HubAccessError(f"{what}: pass a token with access")
