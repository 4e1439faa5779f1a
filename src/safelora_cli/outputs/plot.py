"""``--plot``: the per-module similarity chart as a PNG or SVG file (matplotlib, the ``plot`` extra).

matplotlib is imported only here and only when a chart is drawn, so a run without ``--plot``
never pays for it and an install without the extra works. The output is reproducible: fixed
figure size and resolution, no timestamps or software versions in the metadata, and SVG element
ids salted with a constant, so the same report gives the same bytes with the same matplotlib.
"""

from __future__ import annotations

import importlib
import io
import math
import re
import stat
import warnings
from pathlib import Path

from ..errors import ExtraFileError, MissingExtraError, PlotFileError, UsageError
from ..io import atomic, ranges, safefs
from ..results import Report, finite
from .markdown import clip
from .text import printable

FORMATS = (".png", ".svg")
INSTALL_HINT = "pip install 'safelora[plot]'"
# Element ids that tests (and anyone styling the SVG) can find.
GID_PROJECTED, GID_KEPT, GID_UNDEFINED, GID_TAU = (
    "safelora-projected",
    "safelora-kept",
    "safelora-undefined",
    "safelora-tau",
)
_SIZE, _DPI = (10.0, 4.5), 100
_RED, _BLUE, _GREY = "#c62828", "#1565c0", "#757575"


def require_matplotlib() -> None:
    """Raise ``MissingExtraError`` (a ``UsageError``: exit 2) with the install command when matplotlib is missing."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise MissingExtraError(
            f"plot needs matplotlib, which is not installed: {INSTALL_HINT}", option="plot"
        ) from None


def check_plot_path(path: Path) -> str:
    """The chart format ``path`` asks for (``png`` or ``svg``, by suffix, any case); anything else is
    a ``UsageError`` naming the choices."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS or not path.stem:
        raise UsageError(
            f"plot {printable(path)}: the chart is written as FILE.png or FILE.svg", option="plot", concerns=("plot",)
        )
    return suffix[1:]


def plot(report: Report, path: Path) -> None:
    """Draw the report's per-module similarities into ``path`` (PNG or SVG by suffix).

    Modules are grouped by layer along the x axis (shaded bands, one tick per layer), τ (or τ_k)
    is a dashed line, projected modules are red crosses and kept ones blue dots; a module with an
    undefined similarity is a grey mark at the bottom. The file is replaced atomically, never
    through a symbolic link. Raises ``UsageError`` (a bad suffix, no matplotlib) or ``ExtraFileError``.
    """
    fmt = check_plot_path(path)
    require_matplotlib()
    data = _render(report, fmt, path)
    _write(path, data)


def _render(report: Report, fmt: str, path: Path) -> bytes:
    import matplotlib
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    xs, groups = _positions(report)
    kinds, kind_of = _kinds(report)
    defined = [
        (x, s, layer.projected, kind)
        for x, layer, kind in zip(xs, report.layers, kind_of, strict=True)
        if (s := finite(layer.similarity)) is not None
    ]
    undefined = [x for x, layer in zip(xs, report.layers, strict=True) if finite(layer.similarity) is None]
    tau = finite(report.threshold)
    with warnings.catch_warnings(), matplotlib.rc_context({"svg.hashsalt": "safelora", "svg.fonttype": "path"}):
        # A name in the title may use glyphs the font lacks: matplotlib warns, the chart is still right.
        warnings.simplefilter("ignore")
        fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
        ax = fig.add_subplot()
        for i, (_, first, last) in enumerate(groups):
            if i % 2:
                ax.axvspan(first - 0.5, last + 0.5, color="#000000", alpha=0.05, linewidth=0)
        every = max(1, math.ceil(len(groups) / 32))
        ticks = groups[::every]
        ax.set_xticks([(first + last) / 2 for _, first, last in ticks], [name for name, _, _ in ticks])
        ax.tick_params(axis="x", length=0, labelsize=8)
        # One collection per (decision, kind), each with its own SVG id: a marker per module.
        for projected, gid, colour in ((False, GID_KEPT, _BLUE), (True, GID_PROJECTED, _RED)):
            for k, (_, marker) in enumerate(kinds):
                points = [(x, s) for x, s, p, kind in defined if p == projected and kind == k]
                if points:
                    px, py = [x for x, _ in points], [y for _, y in points]
                    ax.scatter(px, py, s=30, c=colour, marker=marker, gid=f"{gid}-{k}", zorder=3)
        if undefined:
            ax.scatter(
                undefined,
                [0.03] * len(undefined),
                s=30,
                c=_GREY,
                marker="x",
                gid=GID_UNDEFINED,
                transform=ax.get_xaxis_transform(),  # x in data, y in axes: along the bottom
                zorder=3,
            )
        values = [s for _, s, _, _ in defined] + ([tau] if tau is not None else [])
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        ax.set_ylim(max(-1.05, min(low, 0.0) - 0.05), min(1.05, max(high, 0.1) + 0.05))
        ax.set_xlim(-1, (xs[-1] + 1) if xs else 1)
        kept = len(defined) - report.projected_count
        handles: list[Artist] = [
            Patch(color=_RED, label=f"projected ({report.projected_count})"),
            Patch(color=_BLUE, label=f"kept ({kept})"),
        ]
        if undefined:
            handles.append(Line2D([], [], color=_GREY, marker="x", linestyle="", label=f"undefined ({len(undefined)})"))
        if tau is not None:
            name = f"τ_k = {tau:g} (k = {report.num_layers})" if report.mode == "number" else f"τ = {tau:g}"
            ax.axhline(tau, color=_RED, linestyle="--", linewidth=1, gid=GID_TAU)
            handles.append(Line2D([], [], color=_RED, linestyle="--", label=name))
        if len(kinds) > 1:
            handles += [Line2D([], [], color=_GREY, marker=marker, linestyle="", label=kind) for kind, marker in kinds]
        if not report.layers:
            ax.text(0.5, 0.5, "no modules", transform=ax.transAxes, ha="center", va="center", color=_GREY)
        ax.set_ylabel("similarity")
        ax.set_xlabel("modules, grouped by layer")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncols=min(len(handles), 6), frameon=False)
        title = clip(printable(report.adapter), 90) + (" (dry run)" if report.dry_run else "")
        fig.suptitle(f"Safe LoRA · {title}", parse_math=False, fontsize=10)
        buffer = io.BytesIO()
        metadata = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
        try:
            fig.savefig(buffer, format=fmt, metadata=metadata)
        except (ValueError, RuntimeError, OverflowError, MemoryError) as e:
            raise ExtraFileError(f"{path}: the chart could not be drawn ({e.__class__.__name__}: {e})") from None
    return buffer.getvalue()


_MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h")
_KIND = re.compile(r"[A-Za-z0-9_]{1,24}")


def _kinds(report: Report) -> tuple[list[tuple[str, str]], list[int]]:
    """Module kinds (the last part of a name: q_proj, down_proj…) with a marker shape each, and
    each module's kind. Past seven kinds, and for names outside ``[A-Za-z0-9_]`` (which the legend
    would have to escape), one shared shape: "other"."""
    shapes: list[tuple[str, str]] = []
    of: list[int] = []
    for layer in report.layers:
        kind = layer.module.rsplit(".", 1)[-1]
        if not _KIND.fullmatch(kind) or (kind not in (n for n, _ in shapes) and len(shapes) == len(_MARKERS) - 1):
            kind = "other"
        names = [n for n, _ in shapes]
        if kind not in names:
            shapes.append((kind, _MARKERS[len(shapes)] if kind != "other" else _MARKERS[-1]))
            names.append(kind)
        of.append(names.index(kind))
    return shapes, of


def _positions(report: Report) -> tuple[list[float], list[tuple[str, float, float]]]:
    """Each module's x (the report's order, with a gap between layers) and each layer's
    (label, first x, last x)."""
    xs: list[float] = []
    groups: list[tuple[str, float, float]] = []
    x = -1.0
    previous: object = object()
    for layer in report.layers:
        if layer.layer != previous:
            x += 2.0 if xs else 1.0  # one empty slot between layers
            groups.append(("—" if layer.layer is None else f"L{layer.layer}", x, x))
            previous = layer.layer
        else:
            x += 1.0
        name, first, _ = groups[-1]
        groups[-1] = (name, first, x)
        xs.append(x)
    return xs, groups


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` through its directory's descriptor (``atomic``): a link at
    ``path`` is refused, never followed, and the directory is fsync'd."""
    name = path.name
    with safefs.Directory(path.parent, ExtraFileError, fix="create the directory first") as directory:
        st = directory.lstat(name)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise PlotFileError(f"{path}: is {safefs.kind(st.st_mode)}, not a regular file; {PlotFileError.fix}")
        try:
            atomic.write_file(directory, name, [data], 0o644)
            ranges.fsync(directory.fd)
        except OSError as e:
            raise ExtraFileError(safefs.os_error(path, e)) from None
