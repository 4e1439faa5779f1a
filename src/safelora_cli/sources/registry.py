"""Which kind of source opens what the user typed: an ordered registry of source kinds.

A kind claims a spec by its prefix (``hf://``; later ``s3://``), which always wins, or else by a
rule, the rules asked in the order the kinds were registered (local: an existing path; Hub:
``org/name[@revision]``). A spec that no kind claims goes to the fallback kind (local: its error says
what is not there). Each kind opens a spec with settings of its own, so ``open_source`` takes no
kind's settings as loose parameters. The built-in kinds register through ``register`` as any other
kind would (``local.register_sources``, ``hub.register_sources``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .base import Source, Transfer

S = TypeVar("S")


@dataclass(frozen=True)
class Request:
    """What to open and what for, as ``open_source`` was asked: what every kind's opener gets."""

    spec: str
    revision: str | None
    role: str  # "base" or "aligned": messages and notes name it
    transfer: Transfer
    notes: list[str]  # the report's notes: what a kind found that the user should know


def _claims_nothing(spec: str) -> bool:
    return False


@dataclass(frozen=True)
class SourceKind(Generic[S]):
    """A kind of source: the specs it claims, its settings, and how it opens one."""

    name: str
    settings: type[S]  # its settings dataclass: ``open_source`` picks them, by type, from those it is given
    defaults: Callable[[], S]  # its settings when ``open_source`` is given none
    open: Callable[[Request, S], Source]
    prefix: str | None = None  # a spec that starts with it is this kind's, whatever else it is
    claims: Callable[[str], bool] = _claims_nothing  # else: whether a spec is this kind's
    fallback: bool = False  # opens the specs no kind claims


Register = Callable[[SourceKind[Any]], None]  # what a module's ``register_sources`` is handed

_KINDS: list[SourceKind[Any]] = []


def register(kind: SourceKind[Any]) -> None:
    """Add a source kind: its rule is asked after those of the kinds registered before it."""
    if any(k.name == kind.name for k in _KINDS):
        raise ValueError(f"a source kind named {kind.name!r} is registered already")
    _KINDS.append(kind)


def kinds() -> tuple[SourceKind[Any], ...]:
    """The registered kinds, in the order their rules are asked."""
    return tuple(_KINDS)


def kind_for(spec: str) -> SourceKind[Any]:
    """The kind that claims ``spec``: by prefix, else by the first rule that holds, else the fallback."""
    for kind in _KINDS:
        if kind.prefix is not None and spec.startswith(kind.prefix):
            return kind
    return next((k for k in _KINDS if k.claims(spec)), None) or next(k for k in _KINDS if k.fallback)


def open_source(
    spec: str,
    revision: str | None,
    *,
    role: str,
    transfer: Transfer,
    notes: list[str],
    settings: Sequence[object] = (),
) -> Source:
    """The checkpoint ``spec`` names, opened by the kind that claims it with its settings from
    ``settings`` (a ``Hub``…), else with its defaults.

    ``hf://org/name`` is always the Hub; an existing local path is always local (as in transformers);
    otherwise ``org/name[@revision]`` is the Hub. The report names which one was used.
    """
    kind = kind_for(spec)
    given = next((s for s in settings if isinstance(s, kind.settings)), None)
    source = kind.open(Request(spec, revision, role, transfer, notes), kind.defaults() if given is None else given)
    source.given = spec
    return source
