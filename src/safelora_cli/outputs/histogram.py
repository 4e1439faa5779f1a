"""The terminal histogram of a run's similarities: which side of τ each module fell on."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from ..projection import rounded
from ..results import finite
from .markdown import number

MAX_BINS = 12
_MAX_BAR = 48  # columns of the longest bar: compact on wide terminals


@dataclass(frozen=True)
class _Glyphs:
    projected: str
    kept: str
    undefined: str
    rule: str
    axis: str
    dot: str
    tau: str


_UNICODE = _Glyphs("█", "░", "·", "─", "│", "·", "τ")
_ASCII = _Glyphs("#", "=", ".", "-", "|", "|", "tau")


def histogram_lines(
    similarities: Sequence[float | None],
    tau: float | None,
    projected: Sequence[bool],
    width: int,
    *,
    k: int | None = None,
    ascii: bool = False,
) -> list[str]:
    """A compact histogram of the similarities as plain lines no wider than ``width`` (40 or more).

    Bins hold the rounded similarity that decisions use, lower-open and upper-closed, and τ is
    always a bin edge: the rule drawn at τ separates what ``similarity ≤ τ`` projects from what it
    keeps (above the first bin or below the last when τ lies outside the data). Bars show the
    projected modules (``█``) and the kept ones (``░``) of each bin; undefined similarities get a
    row of their own. ``k`` (number mode) labels τ as τ_k. ``ascii`` draws with ASCII only, for
    consoles that cannot encode the rest. No modules: no lines.
    """
    if len(similarities) != len(projected):
        raise ValueError("one projected flag per similarity")
    if not similarities:
        return []
    g = _ASCII if ascii else _UNICODE
    defined = [(rounded(v), p) for s, p in zip(similarities, projected, strict=True) if (v := finite(s)) is not None]
    undefined = len(similarities) - len(defined)
    finite_tau = finite(tau)
    shown_tau = "—" if finite_tau is None else number(rounded(finite_tau))
    tau_text = f"{g.tau}_k = {shown_tau} (k = {k})" if k is not None else f"{g.tau} = {shown_tau}"
    bins: list[tuple[str, int, int]] = []  # label, projected, kept
    rule_at: int | None = None  # the τ rule goes before bins[rule_at]
    if defined:
        anchor = finite_tau if finite_tau is not None else 0.0
        step, first, last = _binning([v for v, _ in defined], anchor)
        digits = _decimals(step, finite_tau)
        counts: dict[int, list[int]] = {i: [0, 0] for i in range(first, last + 1)}
        for value, chosen in defined:
            counts[_bin(value, anchor, step)][0 if chosen else 1] += 1
        for i in range(first, last + 1):
            low, high = anchor + i * float(step), anchor + (i + 1) * float(step)
            bins.append((f"({_edge(low, digits)}, {_edge(high, digits)}]", counts[i][0], counts[i][1]))
        if finite_tau is not None:
            rule_at = min(max(-first, 0), len(bins))
    label_width = max([len(label) for label, _, _ in bins] + ([len("undefined")] if undefined else []))
    biggest = max([p + q for _, p, q in bins] + [undefined])
    room = max(4, min(_MAX_BAR, width - label_width - len(str(biggest)) - 3))

    def row(label: str, bar: str, count: int) -> str:
        return f"{label:>{label_width}} {g.axis}{bar} {count}" if count else f"{label:>{label_width}} {g.axis}"

    legend = ["similarity:", f"{g.projected} projected", f"{g.kept} kept"] + (
        [f"{g.undefined} undefined"] if undefined else []
    )
    lines = _wrap(legend, "  ", width)
    if not defined:
        lines.append("no module has a defined similarity")
    rule = _rule(tau_text, min(width, label_width + room + len(str(biggest)) + 3), g)
    for i, (label, p, q) in enumerate(bins):
        if i == rule_at:
            lines.append(rule)
        cells = _cells(p + q, biggest, room)
        shown = _cells(p, p + q, cells) if p else 0
        lines.append(row(label, g.projected * shown + g.kept * (cells - shown), p + q))
    if rule_at == len(bins) and bins:
        lines.append(rule)
    if undefined:
        lines.append(row("undefined", g.undefined * _cells(undefined, biggest, room), undefined))
    n_kept = sum(1 for _, chosen in defined if not chosen)
    footer = [f"{sum(projected)} projected", f"{n_kept} kept"]
    if undefined:
        footer.append(f"{undefined} undefined")
    if finite_tau is not None:
        footer.append(tau_text)
    return lines + _wrap(footer, f" {g.dot} ", width)


def _wrap(parts: list[str], sep: str, width: int) -> list[str]:
    """``parts`` joined by ``sep`` into as few lines of at most ``width`` as it takes (a part is never split)."""
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return lines


def _binning(values: list[float], anchor: float) -> tuple[Decimal, int, int]:
    """The finest nice bin width (0.01, 0.02, 0.05, 0.1…) that covers ``values`` in at most
    ``MAX_BINS`` bins aligned on ``anchor``, and the first and last bin. τ is always an edge, so no
    width hides which side of it a module is on; finer than 0.01 would only split a cluster into
    bins of one module."""
    for exponent in itertools.count(-2):
        for mantissa in (1, 2, 5):
            step = Decimal(mantissa).scaleb(exponent)
            first = min(_bin(v, anchor, step) for v in values)
            last = max(_bin(v, anchor, step) for v in values)
            if last - first < MAX_BINS:
                return step, first, last
    raise AssertionError("unreachable: a wide enough bin holds every value")


def _bin(value: float, anchor: float, step: Decimal) -> int:
    """The bin (anchor + i·step, anchor + (i+1)·step] holding ``value``; ``value - anchor`` has an exact sign,
    so bin -1 ends exactly at τ and ``value ≤ τ`` always lands below the rule."""
    return math.ceil((value - anchor) / float(step)) - 1


def _decimals(step: Decimal, tau: float | None) -> int:
    """Decimals for bin edges: enough for the bin width and for τ, at most the 5 that decisions use."""
    places = _places(step)
    if tau is not None:
        places = max(places, _places(Decimal(repr(rounded(tau)))))
    return min(places, 5)


def _places(d: Decimal) -> int:
    exponent = d.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _edge(x: float, digits: int) -> str:
    text = f"{x:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def _cells(count: int, biggest: int, room: int) -> int:
    """Bar cells for ``count`` out of ``biggest``: proportional, and at least one for a non-empty bin."""
    return 0 if count == 0 else max(1, round(count / biggest * room))


def _rule(text: str, width: int, g: _Glyphs) -> str:
    head = g.rule * 4 + f" {text} "
    return head + g.rule * max(0, width - len(head))
