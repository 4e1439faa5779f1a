"""Rendering: the Rich table for people and the JSON document for pipelines."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from . import __version__
from .audit import CheckResult, Inspection
from .backups import Backup
from .cache import PairSummary
from .pipeline import LayerResult, OnModule, Report, SourceInfo
from .text import line, printable


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _source(info: SourceInfo) -> dict[str, Any]:
    return {"source": info.source, "revision": info.revision, "fingerprint": info.fingerprint}


def to_json(report: Report) -> dict[str, Any]:
    """The report as the README's "The JSON report" describes it; every number is finite or null."""
    return {
        "safelora_version": __version__,
        "adapter": str(report.adapter),
        "output": str(report.output) if report.output else None,
        "written": report.written,
        "dry_run": report.dry_run,
        "base": _source(report.base),
        "aligned": _source(report.aligned),
        "mode": report.mode,
        "threshold": _finite(report.threshold),
        "num_layers": report.num_layers,
        "layer_count": len(report.layers),
        "projected_count": report.projected_count,
        "layers": [
            {
                "module": layer.module,
                "layer": layer.layer,
                "similarity": _finite(layer.similarity),
                "projected": layer.projected,
                "reason": layer.reason,
                "norm_ratio": _finite(layer.norm_ratio),
                "cached": layer.cached,
            }
            for layer in report.layers
        ],
        "skipped": [{"key": key, "reason": reason} for key, reason in report.skipped],
        "notes": report.notes,
        "device": report.device,
        "bytes_read": report.bytes_read,
        "bytes_downloaded": report.bytes_downloaded,
        "cache": (
            {"pair": report.cache.pair, "served": report.cache.served, "computed": report.cache.computed}
            if report.cache is not None
            else None
        ),
        "backup": (
            {"sha256": report.backup.sha256, "bytes": report.backup.nbytes, "created": report.backup_created}
            if report.backup is not None
            else None
        ),
        "seconds": round(report.seconds, 3),
    }


def dumps(report: Report) -> str:
    return json.dumps(to_json(report), indent=2, allow_nan=False)


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def render(report: Report, console: Console) -> None:
    """The per-module table, the skipped tensors, notes and a one-line summary."""
    if report.layers:
        table = Table(
            title=line("Safe LoRA · ", report.adapter), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
        )
        modules = [printable(layer.module) for layer in report.layers]
        table.add_column("module", no_wrap=True, min_width=max(len(m) for m in modules))
        table.add_column("layer", justify="right")
        table.add_column("similarity", justify="right", no_wrap=True)
        table.add_column("proj.", justify="center")
        table.add_column("‖CB‖/‖B‖", justify="right")
        for layer, module in zip(report.layers, modules, strict=True):
            projected = Text("yes", style="bold red") if layer.projected else Text("no", style="dim")
            sim = _similarity_cell(layer)
            if layer.reason:
                sim = line((f"— ({layer.reason})", "yellow"))
            table.add_row(
                Text(module),
                "" if layer.layer is None else str(layer.layer),
                sim,
                projected,
                _fmt(layer.norm_ratio, ".4f"),
            )
        console.print(table)
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


def _similarity_cell(layer: LayerResult) -> Text:
    """The similarity and an inline bar (red when projected), so a glance finds the projected layers."""
    cell = Text(_fmt(layer.similarity, ".5f") + " ")
    if layer.similarity is not None and math.isfinite(layer.similarity):
        filled = round(min(max(layer.similarity, 0.0), 1.0) * _BAR_WIDTH)
        cell.append("█" * filled, style="red" if layer.projected else "green")
        cell.append("·" * (_BAR_WIDTH - filled), style="dim")
    return cell


def summary(report: Report) -> str:
    """One line: n of m projected, τ used, where it went, time."""
    tau = _fmt(report.threshold, ".5g")
    how = f"τ = {tau}" if report.mode == "threshold" else f"k = {report.num_layers}, τ_k = {tau}"
    if report.dry_run:
        where = "dry run, nothing written"
    elif report.written:
        where = f"wrote {report.output or report.adapter}"
        if report.backup is not None and report.output is None:
            where += f" (original kept, {size(report.backup.nbytes)})"
    else:
        where = "nothing written"
    return (
        f"{report.projected_count} of {len(report.layers)} modules projected ({how}); {where}; {report.seconds:.2f} s"
    )


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
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        live = enabled and console.is_terminal
        self._live = Live(Group(self._downloads, self._modules), console=console, transient=True) if live else None
        self._module_task = self._modules.add_task("projecting", total=None)

    def __enter__(self) -> RunDisplay:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()

    @property
    def on_module(self) -> OnModule:
        """The pipeline's per-module callback; None when nothing is drawn (no work per module)."""
        return self._advance if self._live is not None else None

    def _advance(self, layer: LayerResult, count: int) -> None:
        # Progress descriptions are markup templates: the name goes in escaped.
        self._modules.update(self._module_task, advance=1, total=count, description=escape(printable(layer.module)))

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


def _pair_json(pair: PairSummary) -> dict[str, Any]:
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


def _backup_json(backup: Backup) -> dict[str, Any]:
    return {
        "sha256": backup.sha256,
        "bytes": backup.nbytes,
        "path": str(backup.path),
        "adapters": [{"adapter": a, "kept": _date(t)} for a, t in sorted(backup.adapters.items())],
    }


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def cache_json(pairs: list[PairSummary], backups: list[Backup]) -> str:
    """``safelora cache ls --json``: every pair with its modules, and every kept original."""
    doc = {"pairs": [_pair_json(p) for p in pairs], "backups": [_backup_json(b) for b in backups]}
    return json.dumps(doc, indent=2)


def render_backups(backups: list[Backup], root: Path, console: Console) -> None:
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


def render_cache(pairs: list[PairSummary], console: Console, *, modules: bool) -> None:
    """The pairs table; with ``modules``, each pair's modules too."""
    if not pairs:
        console.print("[dim]the projection cache is empty[/dim]")
        return
    table = Table(title="safelora projection cache", title_justify="left")
    table.add_column("pair", no_wrap=True)
    table.add_column("base", overflow="fold")
    table.add_column("aligned", overflow="fold")
    table.add_column("modules", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    for p in pairs:
        table.add_row(line(p.key), line(p.base), line(p.aligned), str(len(p.entries)), size(p.nbytes))
    console.print(table)
    if modules:
        for p in pairs:
            t = Table(title=line("pair ", p.key), title_justify="left")
            for col in ("module", "operator", "shape", "size"):
                t.add_column(col, justify="right" if col == "size" else "left")
            for e in p.entries:
                label = line(e.module) if e.problem is None else line((f"? ({e.problem})", "yellow"))
                t.add_row(label, line(e.kind), "×".join(map(str, e.shape)), size(e.nbytes))
            console.print(t)
    total = sum(p.nbytes for p in pairs)
    console.print(f"{len(pairs)} pair(s), {size(total)}", highlight=False)


def check_to_json(result: CheckResult) -> dict[str, Any]:
    return {
        "safelora_version": __version__,
        "adapter": str(result.adapter),
        "ok": result.ok,
        "status": result.status,
        "message": result.message,
        "provenance": result.provenance,
    }


def render_check(result: CheckResult, console: Console) -> None:
    style = "bold green" if result.ok else "bold red"
    console.print(line((result.status, style), " ", result.adapter, ": ", result.message), highlight=False)


def inspection_to_json(info: Inspection) -> dict[str, Any]:
    return {
        "safelora_version": __version__,
        "adapter": str(info.adapter),
        "modules": info.modules,
        "ranks": {str(r): n for r, n in info.ranks.items()},
        "dtypes": info.dtypes,
        "size_bytes": info.size_bytes,
        "target_modules": info.target_modules,
        "base_model_name_or_path": info.base_model,
        "dora": info.dora,
        "embeddings": info.embeddings,
        "modules_to_save": info.modules_to_save,
        "skipped": [{"key": key, "reason": reason} for key, reason in info.skipped],
        "provenance": info.provenance,
        "backup": _backup_json(info.backup) if info.backup is not None else None,
    }


def render_inspection(info: Inspection, console: Console) -> None:
    table = Table(title=line("adapter · ", info.adapter), title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
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
