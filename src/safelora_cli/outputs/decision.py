"""Seeing the decision: the similarity histogram, the step summary and the shared escaping.

Everything here is a pure function of a ``pipeline.Report`` except ``append_summary``. Module
names, paths, source labels, notes and error messages are attacker-controlled: in Markdown they
are written as text with every ASCII character that Markdown, GFM tables or HTML give a meaning
to (``|``, backticks, ``<``, ``&``, brackets, ``*``, ``\\``…) replaced by a character reference,
after control and bidi characters are made visible (``text.printable``). So a name can change
neither a table's columns, nor the fence, nor the HTML around it, and it never contains the text
``-->``. The Mermaid chart carries no name at all: its labels are built from a safe alphabet
(``chart_labels``), and the tables map each label to its module.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .._version import __version__
from ..errors import ExtraFileError
from ..io import safefs
from ..projection import rounded
from .text import printable

if TYPE_CHECKING:
    from ..run.pipeline import LayerResult, Report, SourceInfo


# --- the terminal histogram ---------------------------------------------------------------------

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


def finite(x: float | None) -> float | None:
    """The JSON report's rule: a number that is not finite is no number (null)."""
    return x if x is not None and math.isfinite(x) else None


# --- the table's order --------------------------------------------------------------------------

Sort = Literal["layer", "similarity"]


def table_rows(report: Report, sort: Sort = "layer", projected_only: bool = False) -> list[LayerResult]:
    """The report's modules for the table: in layer order (the report's), or by ascending similarity
    (undefined last, ties in layer order); with ``projected_only``, the projected modules only."""
    rows = [layer for layer in report.layers if layer.projected or not projected_only]
    if sort == "similarity":
        rows.sort(key=lambda layer: (finite(layer.similarity) is None, finite(layer.similarity) or 0.0))
    return rows


# --- chart labels -------------------------------------------------------------------------------

_LABEL_PART = re.compile(r"[A-Za-z0-9_]+")
_LABEL_MAX = 40


def chart_labels(layers: Sequence[LayerResult]) -> list[str]:
    """Short, unique labels for the chart's x axis, one per module, made only of ``[A-Za-z0-9_. ]``.

    A module is ``L<layer> <last part>`` (``L3 q_proj``), with as many trailing parts of its name
    as it takes to be unique among the report's modules (``L3 self_attn.q_proj``); without a layer,
    only the parts. A module whose parts use other characters, or whose label would pass 40
    characters, is ``module <n>``, its position in the report (from 1). The three forms cannot
    collide: a layer label starts ``L<digits> ``, a bare one has no space, the last one starts
    ``module ``. Labels depend only on the modules, so reruns label alike.
    """
    parts = [layer.module.split(".") for layer in layers]
    prefixes = [f"L{layer.layer} " if layer.layer is not None else "" for layer in layers]

    def candidate(i: int, n: int) -> str | None:
        tail = parts[i][-n:]
        if not all(_LABEL_PART.fullmatch(p) for p in tail):
            return None
        return prefixes[i] + ".".join(tail)

    labels: list[str | None] = [None] * len(layers)
    for n in range(1, max((len(p) for p in parts), default=0) + 1):
        round_ = [candidate(i, n) for i in range(len(layers))]
        seen: dict[str, int] = {}
        for c in round_:
            if c is not None:
                seen[c] = seen.get(c, 0) + 1
        for i, c in enumerate(round_):
            if labels[i] is None and c is not None and seen[c] == 1 and n <= len(parts[i]):
                labels[i] = c
    return [
        label if label is not None and len(label) <= _LABEL_MAX else f"module {i + 1}" for i, label in enumerate(labels)
    ]


# --- Markdown -----------------------------------------------------------------------------------

_MD_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,/:@=+-")
# ``_`` between letters or digits can neither open nor close emphasis: it stays, so that
# ``self_attn.q_proj`` reads as itself in the Markdown source too.
_INTRAWORD = re.compile(r"(?<=[A-Za-z0-9])_+(?=[A-Za-z0-9])")
_CLIP = 200  # characters of a name or message shown; the JSON report has them whole


def clip(text: str, limit: int = _CLIP) -> str:
    """``text`` when short; else its start and end around ``…``, so a hostile name cannot bloat a summary."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return text[:half] + "…" + text[-half:]


def md(value: object) -> str:
    """``value`` as inert Markdown text: printable, clipped, with every ASCII character outside
    ``[A-Za-z0-9 .,/:@=+-]`` (and ``_`` inside a word) written as a numeric character reference
    (``|`` → ``&#124;``)."""
    text = clip(printable(value))
    keep = {i for m in _INTRAWORD.finditer(text) for i in range(m.start(), m.end())}
    return "".join(c if c in _MD_PLAIN or ord(c) > 0x7F or i in keep else f"&#{ord(c)};" for i, c in enumerate(text))


def code(value: object) -> str:
    """``value`` escaped by ``md`` and shown monospaced (an HTML ``<code>`` element)."""
    return f"<code>{md(value)}</code>"


def number(x: float) -> str:
    """A finite float in positional notation, digit for digit its shortest repr (1e-05 → 0.00001):
    Mermaid takes no exponents, and ``float(number(x)) == x``."""
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {x}")
    return format(Decimal(repr(x)), "f")


def similarity_text(layer: LayerResult) -> str:
    """The similarity as the table shows it: 5 decimals (the precision decisions use), or why it is undefined."""
    sim = finite(layer.similarity)
    if sim is None:
        return "— (" + md(layer.reason) + ")" if layer.reason else "—"
    return f"{sim:.5f}"


def source_text(info: SourceInfo) -> str:
    """A checkpoint as the summary and the card name it: the source and its commit or fingerprint."""
    if info.revision:
        return f"{code(info.source)} at commit {code(info.revision)}"
    return f"{code(info.source)}, fingerprint {code(info.fingerprint)}"


def settings_text(report: Report) -> str:
    """Mode and τ (or k and the τ_k it implied), as one line of Markdown."""
    tau = finite(report.threshold)
    tau_text = "—" if tau is None else number(tau)
    if report.mode == "number":
        return f"number mode: the {report.num_layers} least similar modules, τ_k = {tau_text}"
    return f"threshold mode: similarity ≤ τ = {tau_text} is projected"


def counts_text(report: Report) -> str:
    """How many modules were projected and kept, and how many had no similarity, in Markdown."""
    defined = sum(1 for layer in report.layers if finite(layer.similarity) is not None)
    kept = defined - report.projected_count
    undefined = len(report.layers) - defined
    text = f"**{report.projected_count} of {len(report.layers)}** modules projected, {kept} kept"
    if undefined:
        text += f", {undefined} with an undefined similarity (never projected)"
    return text


def _status(report: Report) -> str:
    if report.dry_run:
        return "**Dry run:** nothing was written."
    if report.written:
        return f"**Written:** {code(report.output or report.adapter)}."
    return "**Nothing written.**"


def _mermaid(report: Report, labels: list[str]) -> list[str]:
    """The xychart fence: a bar per module with a defined similarity, in layer order, and τ as a line."""
    charted = [
        (label, s)
        for label, layer in zip(labels, report.layers, strict=True)
        if (s := finite(layer.similarity)) is not None
    ]
    if not charted:
        return []
    tau = finite(report.threshold)
    values = [s for _, s in charted]
    bounds = [*values, 0.0] + ([tau] if tau is not None else [])
    low = max(-1.0, math.floor(min(bounds) * 10) / 10)
    high = min(1.0, math.ceil(max(bounds) * 10) / 10)
    if high <= low:
        high = low + 0.1
    tau_name = "τ_k" if report.mode == "number" else "τ"
    title = "similarity per module in layer order"
    if tau is not None:
        title += f"; line: {tau_name} = {number(tau)}"
    lines = [
        "```mermaid",
        "xychart-beta",
        f'  title "{title}"',
        "  x-axis [" + ", ".join(f'"{label}"' for label, _ in charted) + "]",
        f'  y-axis "similarity" {number(round(low, 1))} --> {number(round(high, 1))}',
        "  bar [" + ", ".join(number(s) for s in values) + "]",
    ]
    if tau is not None:
        lines.append("  line [" + ", ".join([number(tau)] * len(values)) + "]")
    lines.append("```")
    return lines


PROJECTED_HEADER = "| module | layer | similarity | ‖CB‖/‖B‖ | chart label |"
ALL_HEADER = "| # | chart label | module | layer | similarity | projected | ‖CB‖/‖B‖ |"


def _ratio(layer: LayerResult) -> str:
    ratio = finite(layer.norm_ratio)
    return "—" if ratio is None else f"{ratio:.4f}"


def _layer_cell(layer: LayerResult) -> str:
    return "" if layer.layer is None else str(layer.layer)


def summary_markdown(report: Report) -> str:
    """One adapter's section of a step summary, in GitHub-flavoured Markdown.

    The pair (commit shas or fingerprints), the settings and the counts; one Mermaid
    ``xychart-beta`` fence with a bar per module whose similarity is defined, in layer order, and
    τ as a line (no fence when no similarity is defined); the projected modules as a table; every
    module, with its chart label, in a collapsed table; the run's notes. Dry runs say so in the
    heading. Ends with a blank line, so sections can be appended one after another.
    """
    labels = chart_labels(report.layers)
    heading = f"## Safe LoRA · {code(report.adapter)}" + (" (dry run)" if report.dry_run else "")
    out = [heading, "", _status(report), ""]
    out += [
        f"- **Base:** {source_text(report.base)}",
        f"- **Aligned:** {source_text(report.aligned)}",
        f"- **Settings:** {settings_text(report)}; device {md(report.device)}",
        f"- **Result:** {counts_text(report)}"
        + (f"; {len(report.skipped)} other tensors passed through unchanged" if report.skipped else ""),
    ]
    if report.cache is not None:
        out.append(
            f"- **Projection cache:** {code(report.cache.pair)}, {report.cache.served} served, "
            f"{report.cache.computed} computed"
        )
    out.append("")
    chart = _mermaid(report, labels)
    if chart:
        out += [*chart, ""]
    projected = [(label, layer) for label, layer in zip(labels, report.layers, strict=True) if layer.projected]
    if report.layers:
        out += [f"### Projected modules ({len(projected)})", ""]
        if projected:
            out += [PROJECTED_HEADER, "| --- | ---: | ---: | ---: | --- |"]
            out += [
                f"| {code(layer.module)} | {_layer_cell(layer)} | {similarity_text(layer)} | {_ratio(layer)} "
                f"| {label} |"
                for label, layer in projected
            ]
        else:
            out.append("None: every module was kept as trained.")
        out += ["", f"<details><summary>All {len(report.layers)} modules</summary>", ""]
        out += [ALL_HEADER, "| ---: | --- | --- | ---: | ---: | --- | ---: |"]
        out += [
            f"| {i} | {label} | {code(layer.module)} | {_layer_cell(layer)} | {similarity_text(layer)} | "
            f"{'yes' if layer.projected else 'no'} | {_ratio(layer)} |"
            for i, (label, layer) in enumerate(zip(labels, report.layers, strict=True), 1)
        ]
        out += ["", "</details>", ""]
    if report.notes:
        out += ["**Notes:**", ""] + [f"- {md(note)}" for note in report.notes] + [""]
    out += [f"<sub>safelora {md(__version__)}</sub>", "", ""]
    return "\n".join(out)


def error_summary_markdown(adapter_path: Path | str, message: str) -> str:
    """The short section of an adapter whose run failed: its path and the error."""
    return "\n".join([f"## Safe LoRA · {code(adapter_path)} (failed)", "", f"**Error:** {md(message)}", "", ""])


# --- appending to a summary file ----------------------------------------------------------------

_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_SUMMARY_FIX = "name a regular file (or one that does not exist yet)"


def check_summary_path(path: Path) -> None:
    """Raise ``ExtraFileError`` unless ``path`` is a regular file or does not exist (not following a link)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ExtraFileError(safefs.os_error(path, e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ExtraFileError(f"{path}: is {safefs.kind(st.st_mode)}, not a regular file; {_SUMMARY_FIX}")


def append_summary(path: Path, text: str) -> None:
    """Append ``text`` to the Markdown file ``path`` (created if missing) in one write.

    The rule: ``path`` must be a regular file or not exist. A symbolic link there, even to a
    regular file, is refused and never followed (the directories above it are taken as given),
    and so are FIFOs, sockets, devices and directories: nothing is opened that could block or
    has side effects, and ``fstat`` of the open file is checked again before writing. One
    ``write`` per section: with ``O_APPEND``, sections of concurrent runs never interleave.
    Raises ``ExtraFileError`` with one line.
    """
    data = text.encode()
    check_summary_path(path)
    try:
        fd = os.open(path, _APPEND, 0o644)
    except OSError as e:
        # ELOOP: a link appeared since the stat; ENXIO: a FIFO without a reader did.
        what = {errno.ELOOP: "is a symbolic link", errno.ENXIO: "is a FIFO"}.get(e.errno or 0)
        raise ExtraFileError(
            f"{path}: {what}, not a regular file; {_SUMMARY_FIX}" if what else safefs.os_error(path, e)
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ExtraFileError(f"{path}: is {safefs.kind(st.st_mode)}, not a regular file; {_SUMMARY_FIX}")
        written = os.write(fd, data)
    except OSError as e:
        raise ExtraFileError(safefs.os_error(path, e)) from None
    finally:
        os.close(fd)
    if written != len(data):
        raise ExtraFileError(
            f"{path}: only {written} of {len(data)} bytes were appended; free some space and run again"
        )
