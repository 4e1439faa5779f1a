"""Rendering: the Rich tables for people, the JSON documents for pipelines, and the sink that
sends each command's output where its mode (human, JSON, quiet) says."""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from .. import api
from ..api import printable
from ..errors import SafeLoraError
from .console import console as make_console
from .console import line

if TYPE_CHECKING:
    from ..api import Backup, CheckResult, Inspection, LayerResult, PairSummary, Report, Restored, Signed, Sort


class Sink:
    """Where a command's output goes, in one of its modes, so no command branches on them itself.

    Human: tables and lines on stdout. ``as_json``: JSON on stdout, what people read on stderr; with
    ``lines`` (the adapter commands), JSON Lines: one object per adapter, each on a line of its own,
    whatever the count; else one document (an array for several results). ``quiet``: nothing but
    errors (and the JSON with ``as_json``). Errors are always one line on stderr, and in JSON an
    ``{"adapter", "error"}`` object. ``fit``: on a pipe, tables take their width from COLUMNS when it
    is set (``console``).
    """

    def __init__(self, *, as_json: bool, quiet: bool, lines: bool = False, fit: bool = False) -> None:
        self.as_json, self.quiet, self.lines = as_json, quiet, lines
        self.console = make_console(stderr=as_json, fit=fit)
        self.docs: list[dict[str, Any]] = []
        self.failed = 0
        self._emitted = False

    def show(self, render: Callable[[Console], None]) -> None:
        """Something for people, unless quiet."""
        if not self.quiet:
            render(self.console)

    def add(self, doc: dict[str, Any], render: Callable[[Console], None]) -> None:
        """One result: its JSON document, and how people see it."""
        self.docs.append(doc)
        self.show(render)

    def fail(self, adapter: Path | None, message: str, *, echo: bool = True) -> None:
        """One adapter's failure (``adapter`` None: a failure of the whole command)."""
        self.failed += 1
        self.docs.append({"adapter": None if adapter is None else str(adapter), "error": message})
        if echo:
            error_line(message)

    def emit(self, *, batch: bool = False) -> None:
        """The JSON, once: a line per result with ``lines``; else the one result, or an array when ``batch``."""
        if not self.as_json or self._emitted:
            return
        self._emitted = True
        if self.lines:
            sys.stdout.write("".join(json.dumps(doc, allow_nan=False) + "\n" for doc in self.docs))
        else:
            doc: Any = self.docs if batch or len(self.docs) != 1 else self.docs[0]
            sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()


def error_line(message: str) -> None:
    make_console(stderr=True).print(line(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def dumps(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2, allow_nan=False)


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def render(report: Report, console: Console, *, sort: Sort = "layer", projected_only: bool = False) -> None:
    """The per-module table (in ``sort`` order, all modules or ``projected_only``), the histogram of
    the similarities, the skipped tensors, notes and a one-line summary."""
    if report.layers:
        rows = api.table_rows(report, sort, projected_only)
        # The heading is a line of its own, not the table's title, which would wrap a long path.
        console.print(line(("Safe LoRA · ", "italic"), (report.adapter, "italic")), highlight=False, soft_wrap=True)
        if rows:
            console.print(_table(rows, console))
        else:
            console.print(line(("no module projected", "dim")))
        _histogram(report, console)
    if report.skipped:
        console.print(line((f"{len(report.skipped)} tensor(s) passed through unchanged:", "dim")))
        for key, reason in report.skipped:
            console.print(line((f"  {key}: {reason}", "dim")), highlight=False)
    for note in report.notes:
        console.print(line(("note:", "yellow"), " ", note), highlight=False)
    if report.cache is not None:
        c = report.cache
        console.print(line((f"projection cache {c.pair}: {c.served} served, {c.computed} computed", "dim")))
    if report.bytes_downloaded:
        console.print(line((f"downloaded {size(report.bytes_downloaded)}", "dim")))
    if report.backup is not None:
        how = "kept" if report.backup_created else "already kept"
        kept = f"original {how}: {size(report.backup.nbytes)}, sha256 {report.backup.sha256[:12]}…"
        console.print(line((f"{kept}; safelora restore puts it back", "dim")), highlight=False)
    console.print(line(summary(report)), highlight=False)


_BAR_WIDTH = 8
# What the table drops when the console is narrow, in order: the bar, the ratio, then the layer, so
# that module, similarity and projected stay whole (down to 60 columns for a Llama module name).
_LAYOUTS = ((True, True, True), (False, True, True), (False, False, True), (False, False, False))


def _histogram(report: Report, console: Console) -> None:
    """The similarities' histogram below the table: bars of projected (red) and kept (green) modules,
    drawn in ASCII when the console's encoding cannot show the block characters."""
    try:
        "█░·─│τ—".encode(console.encoding)
        ascii = False
    except (UnicodeEncodeError, LookupError):
        ascii = True
    k = report.num_layers if report.mode == "number" else None
    lines = api.histogram_lines(
        [layer.similarity for layer in report.layers],
        report.threshold,
        [layer.projected for layer in report.layers],
        max(40, console.width),
        k=k,
        ascii=ascii,
    )
    # A bar starts at the axis: projected cells first, then kept ones.
    projected, kept = (r"(?<=\|)#+", r"(?<=[|#])=+") if ascii else ("(?<=│)█+", "(?<=[│█])░+")
    for text in lines:
        styled = Text(text)
        styled.highlight_regex(projected, "red")
        styled.highlight_regex(kept, "green")
        console.print(styled, highlight=False)


def _table(rows: list[LayerResult], console: Console) -> Table:
    """The widest layout whose natural width fits the console (the narrowest when none does)."""
    for bar, ratio, layer_col in _LAYOUTS:
        table = _layout(rows, bar=bar, ratio=ratio, layer_col=layer_col)
        # Measured without the console's limit, which would clamp what it reports.
        if Measurement.get(console, console.options.update_width(1 << 20), table).maximum <= console.width:
            break
    return table


def _layout(rows: list[LayerResult], *, bar: bool, ratio: bool, layer_col: bool) -> Table:
    modules = [printable(layer.module) for layer in rows]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("module", no_wrap=True, min_width=len(max(modules, key=len)))
    if layer_col:
        table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("similarity", justify="right", no_wrap=True)
    table.add_column("proj.", justify="center", no_wrap=True)
    if ratio:
        table.add_column("‖CB‖/‖B‖", justify="right", no_wrap=True)
    for layer, module in zip(rows, modules, strict=True):
        projected = Text("yes", style="bold red") if layer.projected else Text("no", style="dim")
        sim = line((f"— ({layer.reason})", "yellow")) if layer.reason else _similarity_cell(layer, bar=bar)
        row: list[Text | str] = [Text(module)]
        if layer_col:
            row.append("" if layer.layer is None else str(layer.layer))
        row += [sim, projected]
        if ratio:
            row.append(_fmt(layer.norm_ratio, ".4f"))
        table.add_row(*row)
    return table


def _similarity_cell(layer: LayerResult, *, bar: bool = True) -> Text:
    """The similarity and an inline bar (red when projected), so a glance finds the projected layers."""
    cell = Text(_fmt(layer.similarity, ".5f") + (" " if bar else ""))
    if bar and layer.similarity is not None and math.isfinite(layer.similarity):
        filled = round(min(max(layer.similarity, 0.0), 1.0) * _BAR_WIDTH)
        cell.append("█" * filled, style="red" if layer.projected else "green")
        cell.append("·" * (_BAR_WIDTH - filled), style="dim")
    return cell


def summary(report: Report) -> str:
    """One line: n of m projected, τ used, where it went, the median ‖CB‖/‖B‖ of the projected modules, time."""
    tau = _fmt(report.threshold, ".5g")
    how = f"τ = {tau}" if report.mode == "threshold" else f"k = {report.num_layers}, τ_k = {tau}"
    # How much of the fine-tune the projected modules keep: a figure, not a warning.
    ratio = "" if report.median_norm_ratio is None else f"median ‖CB‖/‖B‖ {report.median_norm_ratio:.4f}; "
    end = f"{ratio}{report.seconds:.2f} s"
    if report.status == "unchanged":
        done = (
            f"{report.projected_count} of {len(report.layers)} modules" if report.layers_known else "modules unrecorded"
        )
        where = f"copied to {report.output}" if report.written else "nothing written"
        return f"already projected ({done}, {how}); {where}; {end}"
    if report.dry_run:
        return (
            f"would project {report.projected_count} of {len(report.layers)} modules ({how}); dry run, nothing "
            f"written; {end}"
        )
    if report.written:
        where = f"wrote {report.output or report.adapter}"
        if report.backup is not None and report.output is None:
            where += f" (original kept, {size(report.backup.nbytes)})"
    else:
        where = "nothing written"
    return f"{report.projected_count} of {len(report.layers)} modules projected ({how}); {where}; {end}"


def size(nbytes: int) -> str:
    """Bytes for people: 1.23 GB (powers of 1000, as download tools print them)."""
    if nbytes < 1000:
        return f"{nbytes} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6)):
        if nbytes < scale * 1000:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1e9:.2f} GB"


class RunDisplay:
    """What a terminal shows while a run works: a byte bar per Hub download above the module bar.

    Implements ``sources.Transfer`` (bars are advanced from the reading thread; Rich locks internally)
    and gives the pipeline's ``on_module`` callback. Transient; nothing at all is drawn when
    ``console`` is not a terminal, and nothing is printed when disabled (--quiet).
    """

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.console, self.enabled = console, enabled
        self._downloads = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._modules = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        live = enabled and console.is_terminal
        self._live = Live(Group(self._downloads, self._modules), console=console, transient=True) if live else None
        # Until the first module is done (imports, headers, the first reads), a spinner says the run is alive.
        self._module_task = self._modules.add_task("reading the adapter and the checkpoints", total=None)

    def __enter__(self) -> RunDisplay:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()

    def on_module(self, layer: LayerResult, count: int) -> None:
        """The pipeline's per-module callback: one more module done."""
        if self._live is not None:
            # Progress descriptions are markup templates: the name goes in escaped.
            description = escape(printable(layer.module))
            self._modules.update(self._module_task, advance=1, total=count, description=description)

    def task(self, label: str, total: int) -> Callable[[int], None]:
        task_id = self._downloads.add_task(escape(printable(label)), total=total)
        return lambda n: self._downloads.advance(task_id, n)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(line(("warning:", "yellow"), " ", message), highlight=False, soft_wrap=True)

    def say(self, message: str) -> None:
        """A dim line now, above the bars (unless --quiet)."""
        if self.enabled:
            self.console.print(line((message, "dim")), highlight=False, soft_wrap=True)


def pair_to_json(pair: PairSummary) -> dict[str, Any]:
    return {
        "pair": pair.key,
        "base": pair.base,
        "aligned": pair.aligned,
        "path": str(pair.path),
        "bytes": pair.nbytes,
        "modules": [
            {"module": e.module, "kind": e.kind, "shape": list(e.shape), "bytes": e.nbytes, "problem": e.problem}
            for e in pair.entries
        ],
    }


def cache_to_json(pairs: list[PairSummary], backups: list[Backup]) -> dict[str, Any]:
    """``safelora cache ls --json``: every pair with its modules, and every kept original."""
    return {"pairs": [pair_to_json(p) for p in pairs], "backups": [b.to_json() for b in backups]}


def _render_backups(backups: list[Backup], root: Path, console: Console) -> None:
    """The kept originals: adapter directory, when, size; and their total."""
    if not backups:
        console.print(line((f"no original is kept in {root}", "dim")), highlight=False)
        return
    table = Table(title=line("kept originals · ", root), title_justify="left")
    table.add_column("adapter", overflow="fold")
    table.add_column("kept", no_wrap=True)
    table.add_column("sha256", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for b in backups:
        for adapter, t in sorted(b.adapters.items()) or [("?", b.created)]:
            kept = time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
            table.add_row(line(adapter), kept, b.sha256[:12], size(b.nbytes))
    console.print(table)
    total = sum(b.nbytes for b in backups)
    console.print(
        line(f"{len(backups)} kept original(s), {size(total)}; remove with safelora cache rm --backups ADAPTER"),
        highlight=False,
    )


def render_cache(
    pairs: list[PairSummary], backups: list[Backup], backup_root: Path, console: Console, *, modules: bool
) -> None:
    """The pairs table (with ``modules``, each pair's modules too), then the kept originals."""
    _render_pairs(pairs, console, modules=modules)
    _render_backups(backups, backup_root, console)


def _render_pairs(pairs: list[PairSummary], console: Console, *, modules: bool) -> None:
    if not pairs:
        console.print(line(("the projection cache is empty", "dim")))
        return
    table = Table(title="safelora projection cache", title_justify="left")
    table.add_column("pair", no_wrap=True)
    table.add_column("base", overflow="fold")
    table.add_column("aligned", overflow="fold")
    table.add_column("modules", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for p in pairs:
        table.add_row(line(p.key), line(p.base), line(p.aligned), str(len(p.entries)), size(p.nbytes))
    console.print(table)
    if modules:
        for p in pairs:
            t = Table(title=line("pair ", p.key), title_justify="left")
            # A narrow console folds a module's name rather than cut it: every part of it stays.
            t.add_column("module", overflow="fold")
            for col in ("operator", "shape", "size"):
                t.add_column(col, justify="right" if col == "size" else "left", no_wrap=True)
            for e in p.entries:
                label = line(e.module) if e.problem is None else line((f"? ({e.problem})", "yellow"))
                t.add_row(label, line(e.kind), "×".join(map(str, e.shape)), size(e.nbytes))
            console.print(t)
    total = sum(p.nbytes for p in pairs)
    console.print(f"{len(pairs)} pair(s), {size(total)}", highlight=False)


def render_check(result: CheckResult, console: Console, *, by_signature: bool = False) -> None:
    style = "bold green" if result.ok else "bold red"
    how = f" (verified by {result.verified_by})" if result.verified_by else ""
    if result.status == "unverified":  # the ways to verify, in flags
        how = (
            " (--public-key the key that signed it; or sign it: safelora sign --sign-key)"
            if by_signature
            else " (--original DIR --base B --aligned A; --public-key; or --trust-stamp)"
        )
    notes = "".join(f"; {n}" for n in result.notes)
    console.print(line((result.status, style), " ", result.adapter, ": ", result.message, how, notes), highlight=False)


def render_inspection(info: Inspection, console: Console) -> None:
    table = Table(title=line("adapter · ", info.adapter), title_justify="left", show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")  # a digest or module name folded, never cut
    ranks = ", ".join(f"r={r} ×{n}" for r, n in info.ranks.items())
    table.add_row("LoRA modules", f"{info.modules} ({ranks})")
    table.add_row("dtypes", ", ".join(f"{d} ×{n}" for d, n in info.dtypes.items()))
    table.add_row("size", f"{info.size_bytes:,} bytes")
    table.add_row(
        "target_modules",
        line(info.target_modules if isinstance(info.target_modules, str) else repr(info.target_modules)),
    )
    table.add_row("base_model_name_or_path", line(str(info.base_model)))
    table.add_row("DoRA", "yes" if info.dora else "no")
    table.add_row("embedding LoRA", "yes" if info.embeddings else "no")
    table.add_row("modules_to_save", "yes" if info.modules_to_save else "no")
    table.add_row("passed-through tensors", str(len(info.skipped)))
    if info.provenance:
        for key, value in sorted(info.provenance.items()):
            table.add_row(line(key), line(value))
    else:
        table.add_row("provenance", "none (never sanitized by safelora)")
    if info.provenance:
        b = info.backup
        kept = f"yes: {b.sha256[:12]}…, {size(b.nbytes)} (safelora restore puts it back)" if b else "no"
        table.add_row("original kept", line(kept))
    console.print(table)


def render_removed_pair(pair: PairSummary, console: Console) -> None:
    console.print(line(f"removed pair {pair.key} ({len(pair.entries)} modules, {size(pair.nbytes)})"), highlight=False)


def render_cleared(removed: list[PairSummary], kept: list[str], root: Path, console: Console) -> None:
    total = size(sum(p.nbytes for p in removed))
    console.print(line(f"removed {len(removed)} pair(s), {total} from {root}"), highlight=False)
    for message in kept:
        console.print(line(("kept:", "yellow"), " ", message), highlight=False)


def render_restored(restored: Restored, console: Console) -> None:
    b = restored.backup
    done = "unchanged" if restored.unchanged else "restored"
    told = f"{done} {restored.adapter}: the original, sha256 {b.sha256[:12]}… ({size(b.nbytes)})"
    console.print(line(told), highlight=False)
    for note in restored.notes:
        console.print(line(("note:", "yellow"), " ", note), highlight=False)


def render_signed(signed: Signed, console: Console) -> None:
    told = f"signed {signed.adapter} (verified by {signed.verified_by}): {signed.attestation}, key {signed.keyid}"
    console.print(line(told), highlight=False)


def render_batch(outcomes: Sequence[Report | SafeLoraError], seconds: float, console: Console) -> None:
    """The line after a batch's reports: how many adapters were done, and the batch's totals (each
    report has its own share: a module shared by several adapters is read once)."""
    reports = [o for o in outcomes if not isinstance(o, SafeLoraError)]
    failed = len(outcomes) - len(reports)
    read = sum(r.bytes_read for r in reports)
    told = f"{len(reports)} of {len(outcomes)} adapters done, {failed} failed; read {size(read)}"
    downloaded = sum(r.bytes_downloaded for r in reports)
    if downloaded:
        told += f", downloaded {size(downloaded)}"
    console.print(f"{told}; {seconds:.2f} s in all", highlight=False)


def render_next_steps(root: Path, program: str, console: Console) -> None:
    """``demo --keep``: commands to try next, on the files it left, run as ``program``."""
    base, aligned, adapter, out = (
        shlex.quote(str(root / name)) for name in ("base", "aligned", "adapter", "sanitized")
    )
    console.print(line(("next, try:", "bold")), highlight=False)
    for command in (
        f"{program} inspect {out}",
        f"{program} check {out} --base {base} --aligned {aligned}",
        f"{program} project {adapter} --base {base} --aligned {aligned} --num-layers 3 --dry-run",
        f"{program} project {adapter} --base {base} --aligned {aligned}      # in place, keeping the original",
        f"{program} restore {adapter}",
    ):
        console.print(line("  ", command), highlight=False)
