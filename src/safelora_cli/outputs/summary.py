"""A run's section of a GitHub step summary, and appending it to the summary file.

Everything here is a pure function of a ``Report`` except ``check_summary_path`` and
``append_summary``. Names are escaped by ``markdown.md``; the Mermaid chart carries no name at all:
its labels are built from a safe alphabet (``chart_labels``), and the tables map each label to its
module.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from .._version import __version__
from ..errors import ExtraFileError
from ..io import safefs
from ..results import LayerResult, Report, finite
from .markdown import code, counts_text, md, number, settings_text, similarity_text, source_text

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


def _shown(path: Path) -> str:
    """A path as a published summary shows it: as given when relative, else by its base name only."""
    return path.name if path.is_absolute() else str(path)


def _published(note: str, report: Report) -> str:
    """A note with the run's own absolute paths (adapter, output, base, aligned) shortened to base names."""
    given = [report.adapter, report.output, Path(report.base.source), Path(report.aligned.source)]
    for path in sorted((p for p in given if p is not None and p.is_absolute()), key=lambda p: -len(str(p))):
        note = note.replace(str(path), path.name)
    return note


def _status(report: Report) -> str:
    if report.dry_run:
        return "**Dry run:** nothing was written."
    if report.written:
        return f"**Written:** {code(_shown(report.output or report.adapter))}."
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
    heading = f"## Safe LoRA · {code(_shown(report.adapter))}" + (" (dry run)" if report.dry_run else "")
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
        out += ["**Notes:**", ""] + [f"- {md(_published(note, report))}" for note in report.notes] + [""]
    out += [f"<sub>safelora {md(__version__)}</sub>", "", ""]
    return "\n".join(out)


def error_summary_markdown(adapter_path: Path | str, message: str) -> str:
    """The short section of an adapter whose run failed: its path and the error."""
    return "\n".join(
        [f"## Safe LoRA · {code(_shown(Path(adapter_path)))} (failed)", "", f"**Error:** {md(message)}", "", ""]
    )


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
