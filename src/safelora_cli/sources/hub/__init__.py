"""The Hub as a source kind: ``hf://org/name[@revision]`` always, ``org/name[@revision]`` when no
local path of that name exists.

This module and ``settings`` stay light: every run imports them. ``source`` (``HubSource``,
``open_hub``) and the modules it stands on, ``resolve``, ``prefetch`` and ``transport``, import
huggingface_hub and its HTTP stack (~0.25 s): only a run that opens a Hub source imports them.
"""

from __future__ import annotations

from ...errors import HubRepoNotFoundError, HubUnreachableError, SourceError, UsageError
from ..base import Source
from ..registry import Register, Request, SourceKind
from .settings import DEFAULT_CONNECTIONS, HF_PREFIX, Hub, HubRef, RefMemo, hf_cache_dir, parse_ref

__all__ = [
    "DEFAULT_CONNECTIONS",
    "HF_PREFIX",
    "Hub",
    "HubRef",
    "RefMemo",
    "hf_cache_dir",
    "parse_ref",
    "register_sources",
]


def register_sources(register: Register) -> None:
    """Register the Hub kind: every ``hf://`` spec, and the specs that read as a repo id."""
    register(
        SourceKind(
            name="hub",
            settings=Hub,
            defaults=lambda: Hub.from_env(None, None),
            open=_open,
            prefix=HF_PREFIX,
            claims=lambda spec: parse_ref(spec) is not None,
        )
    )


def _open(request: Request, hub: Hub) -> Source:
    spec, revision = request.spec, request.revision
    forced = spec.startswith(HF_PREFIX)
    ref = parse_ref(spec.removeprefix(HF_PREFIX))
    if ref is None:
        raise SourceError(f"{spec}: not a Hub repo id; write org/name or org/name@revision")
    if ref.revision is not None and revision is not None and ref.revision != revision:
        raise UsageError(
            f"{request.role}: revision given twice ({spec}, and revision {revision}); give one",
            concerns=(f"{request.role}_revision", request.role),
        )
    from .source import open_hub  # the HTTP stack: imported by the runs that use the Hub, only

    try:
        source = open_hub(HubRef(ref.repo_id, ref.revision or revision), hub, request.transfer)
    except HubRepoNotFoundError as e:
        if forced:
            raise
        # Not a local path, so taken for a Hub id: a typo in a path reads as one, so say both.
        raise HubRepoNotFoundError(f"{e}, nor a local directory of that name") from None
    except HubUnreachableError as e:
        if forced:
            raise
        raise HubUnreachableError(f"{spec}: no such local directory, and on the Hub: {e}") from None
    request.notes.append(f"{request.role} {ref.repo_id}@{source.requested} is commit {source.sha}")
    return source
