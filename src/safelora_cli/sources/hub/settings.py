"""What names a Hub checkpoint, and the Hub kind's settings: where the Hub is and how to reach it.

Light on purpose: the registry imports it on every run, local ones included; the HTTP stack is
imported only when a Hub source is opened.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ...errors import SourceError

HF_PREFIX = "hf://"
DEFAULT_CONNECTIONS = 8
MAX_CONNECTIONS = 64
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_TRUE = {"1", "ON", "YES", "TRUE"}
_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_HEADER_SAFE = re.compile(r"[\x21-\x7e]*")  # visible ASCII; surrounding whitespace is stripped, as the Hub client does


@dataclass(frozen=True)
class HubRef:
    """``org/name`` with an optional branch, tag or commit sha."""

    repo_id: str
    revision: str | None


def parse_ref(text: str) -> HubRef | None:
    """``org/name`` or ``org/name@revision`` as a ``HubRef``; None when ``text`` is not one."""
    repo_id, at, revision = text.partition("@")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or (at and not revision):
        return None
    return HubRef(repo_id, revision or None)


def hf_cache_dir() -> Path:
    """The Hugging Face cache, as huggingface_hub finds it: HF_HUB_CACHE, HF_HOME/hub, XDG, ~/.cache."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


class RefMemo(Protocol):
    """A record of the commit each branch or tag last resolved to, so offline runs can name it.

    A Protocol, so that a source takes the projection cache's memo without knowing the cache.
    """

    def get(self, endpoint: str, repo_id: str, revision: str) -> str | None:
        """The commit ``revision`` last named, if recorded."""

    def put(self, endpoint: str, repo_id: str, revision: str, sha: str) -> None:
        """Record that ``revision`` names ``sha`` (best effort)."""


@dataclass(frozen=True)
class Hub:
    """Where and how to reach the Hub. Read from the environment when a run starts (not at import)."""

    endpoint: str
    token: str | None = field(repr=False)  # the one given; ``open_hub`` falls back to HF_TOKEN, then the login
    hf_cache: Path
    offline: bool
    refs: RefMemo | None  # the record of branch → commit for offline runs; None when the run keeps no cache
    connections: int = DEFAULT_CONNECTIONS  # the run's HTTP connections, shared by its Hub sources

    @classmethod
    def from_env(cls, token: str | None, refs: RefMemo | None, connections: int = DEFAULT_CONNECTIONS) -> Hub:
        """HF_ENDPOINT, HF_HUB_OFFLINE and the Hugging Face cache, and the token given (if any).

        A token (the one given, HF_TOKEN) that cannot go into an HTTP header is refused here, at the
        start of every run that may use it, with a message that never shows it.
        """
        for where, value in (("the token given", token), *((name, os.environ.get(name)) for name in _TOKEN_VARIABLES)):
            if value is not None and not _HEADER_SAFE.fullmatch(value.strip()):
                raise SourceError(
                    f"{where}: the token holds characters an HTTP header cannot carry (control characters, "
                    "spaces or non-ASCII); pass the token exactly as the Hub shows it"
                )
        return cls(
            endpoint=(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            token=token,
            hf_cache=hf_cache_dir(),
            offline=os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE,
            refs=refs,
            connections=connections,
        )

    def repo_cache(self, repo_id: str) -> Path:
        """The repo's folder in the Hugging Face cache (``refs/``, ``snapshots/``)."""
        return self.hf_cache / f"models--{repo_id.replace('/', '--')}"

    def snapshot(self, repo_id: str, sha: str) -> Path:
        return self.repo_cache(repo_id) / "snapshots" / sha
