"""The end of a run: select, keep the original, write the adapter with its provenance, and the card."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .._version import __version__
from ..adapters import PROVENANCE_PREFIX
from ..adapters.digest import DIGEST_KEY, STAMP_VERSION, VERSION_KEY, stamp_digest
from ..errors import AdapterError, SafeLoraError
from ..io import safefs
from ..outputs import card, evaluation
from ..outputs.report import Report
from ..projection import select
from ..results import LayerResult, Settings, SourceInfo, finite
from ..sources import Source, identity
from ..stores.backups import BackupStore
from .audit import same_pair
from .batch import Run


def _settings_provenance(settings: Settings, tau: float | None) -> dict[str, str]:
    p = {
        "mode": settings.mode,
        "threshold": json.dumps(tau),
        "precision": settings.precision,
    }
    if settings.mode == "number":
        p["num_layers"] = str(settings.num_layers)
    return {PROVENANCE_PREFIX + k: v for k, v in p.items()}


def same_run(previous: dict[str, str], base: Source, aligned: Source, settings: Settings) -> bool:
    """Whether provenance records these settings (in number mode τ_k is an outcome, not one) and this
    pair (``audit.same_pair``: by content)."""
    want = _settings_provenance(settings, settings.threshold)
    if settings.mode == "number":
        del want[PROVENANCE_PREFIX + "threshold"]
    return all(previous.get(k) == v for k, v in want.items()) and same_pair(previous, base, aligned)


def layers_provenance(layers: list[LayerResult]) -> str:
    """``safelora.layers``: each module's similarity and decision, so a no-op can report them."""
    return json.dumps(
        [
            {"module": layer.module, "similarity": finite(layer.similarity), "projected": layer.projected}
            for layer in layers
        ]
    )


def finish(
    run: Run,
    settings: Settings,
    base_info: SourceInfo,
    aligned_info: SourceInfo,
    report: Callable[[Run, list[LayerResult], float | None, bool], Report],
    store: BackupStore,
    in_place: bool,
) -> Report:
    """Select, keep the original (in place), write (unless a dry run) and report one adapter."""
    adapter = run.loaded
    modules = adapter.modules
    results = [run.found[m.module][0] for m in modules]
    tau, chosen = select([r.similarity for r in results], settings.mode, settings.threshold, settings.num_layers)
    layers = [
        LayerResult(m.module, m.layer, r.similarity, c, r.reason, r.norm_ratio, run.found[m.module][1])
        for m, r, c in zip(modules, results, chosen, strict=True)
    ]
    if settings.dry_run:
        return report(run, layers, tau, False)
    replacements = {}
    for m, r, c in zip(modules, results, chosen, strict=True):
        if c and r.projected_b is not None:
            replacements[m.b_key] = r.projected_b.to(adapter.tensor(m.b_key).dtype)
    provenance = {
        PROVENANCE_PREFIX + "version": __version__,
        PROVENANCE_PREFIX + "base": base_info.identity,
        PROVENANCE_PREFIX + "aligned": aligned_info.identity,
        # The weights it was computed with (tensor name → BLAKE3 of dtype, shape, bytes): ``check`` compares these.
        PROVENANCE_PREFIX + "base_tensors": identity.dump_map(base_info.tensors),
        PROVENANCE_PREFIX + "aligned_tensors": identity.dump_map(aligned_info.tensors),
        PROVENANCE_PREFIX + "projected": json.dumps([layer.module for layer in layers if layer.projected]),
        PROVENANCE_PREFIX + "layers": layers_provenance(layers),
        VERSION_KEY: STAMP_VERSION,
        **_settings_provenance(settings, tau),
    }
    if adapter.dora:
        provenance[PROVENANCE_PREFIX + "dora"] = "lora_B projected; magnitude vectors unchanged"
    run.kept = run.original
    if in_place and run.kept is None:
        if settings.backup:
            # Before the rename: once the adapter is replaced, this copy is the only one of the original.
            run.kept = store.save(adapter.handle, adapter.stat.st_size, adapter.path)
            run.kept_now = True
        else:
            run.notes.append("no backup: no copy of the original was kept, and restore cannot undo this run")
    if run.kept is not None:
        provenance[PROVENANCE_PREFIX + "original"] = run.kept.sha256
    provenance[DIGEST_KEY] = stamp_digest(adapter, replacements, provenance)
    _record(store, provenance, settings, run)
    adapter.format.write(
        adapter, replacements, provenance, settings.output, overwrite_output=settings.force, notes=run.notes
    )
    _drop_stale_evaluation(adapter.dir, settings.output, provenance[DIGEST_KEY], run.notes)
    result = report(run, layers, tau, True)
    if settings.model_card:
        _write_card(adapter.dir, settings.output, result)
    return result


def _record(store: BackupStore, provenance: dict[str, str], settings: Settings, run: Run) -> None:
    """The local record of what is about to be written (before the write: a crash after the rename
    leaves no unrecorded result), and the kept original bound to it. A store that cannot take it is a
    note: ``check`` on this machine will then say ``unverified``."""
    kept = run.kept.sha256 if run.kept is not None else None
    record: dict[str, object] = {
        "adapter": str(run.path),
        "output": str(settings.output) if settings.output is not None else None,
        "stamp": {k: v for k, v in provenance.items() if k != DIGEST_KEY},
        "original": kept,
    }
    try:
        store.record_written(provenance[DIGEST_KEY], record, kept)
    except SafeLoraError as e:
        run.notes.append(f"no local record kept ({e}): check on this machine cannot verify this adapter")


def _write_card(source: safefs.Directory, output: Path | None, report: Report) -> None:
    """The model card's Safe LoRA section, in the adapter's README.md (or the output's): after the
    adapter is written, so a card that cannot be written is a note, not a failed run."""
    try:
        if output is None:
            card.write_card(source, report)
        else:
            with safefs.Directory(output, AdapterError) as directory:
                card.write_card(directory, report)
    except SafeLoraError as e:
        report.notes.append(f"model card not written: {e}")


def _drop_stale_evaluation(source: safefs.Directory, output: Path | None, digest: str, notes: list[str]) -> None:
    """An Evaluation section (``safelora eval``) in the written adapter's card describes the adapter as
    it was before this rewrite: it goes. A card that cannot be edited is a note."""
    try:
        if output is None:
            evaluation.remove_stale(source, digest)
        else:
            with safefs.Directory(output, AdapterError) as directory:
                evaluation.remove_stale(directory, digest)
    except SafeLoraError as e:
        notes.append(f"model card's Evaluation section left in place: {e}")
