"""The end of a run: select, keep the original, write the adapter with its provenance, and the card."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._version import __version__
from ..adapters import PROVENANCE_PREFIX
from ..adapters.digest import DIGEST_KEY, STAMP_VERSION, VERSION_KEY, stamp_digest
from ..adapters.location import open_location
from ..errors import AdapterError, NumericError, SafeLoraError
from ..io import safefs
from ..outputs import card, evaluation
from ..outputs.report import Report
from ..projection import select
from ..results import LayerResult, Settings, SourceInfo, finite
from ..sources import Source, identity
from ..stores.backups import BackupStore
from . import signed
from .audit import same_pair
from .batch import Run

if TYPE_CHECKING:
    from ..attest.keys import Signer


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
    """``safelora.layers``: each module's similarity, decision and ‖CB‖/‖B‖, so a no-op can report them."""
    return json.dumps(
        [
            {
                "module": layer.module,
                "similarity": finite(layer.similarity),
                "projected": layer.projected,
                "norm_ratio": finite(layer.norm_ratio),
            }
            for layer in layers
        ]
    )


def _representable(projected: torch.Tensor, dtype: torch.dtype, file: Path, key: str) -> torch.Tensor:
    """``projected`` cast to the adapter's ``dtype``; ``NumericError`` when a value does not fit it
    (C·B can exceed the largest float16 or bfloat16 B holds: C is not a projection)."""
    cast = projected.to(dtype)
    if not bool(torch.isfinite(cast).all()):
        largest = float(projected.abs().max())
        raise NumericError(
            f"{file}: {key}: the projected lora_B does not fit {str(dtype).removeprefix('torch.')} (largest value "
            f"{largest:.4g}, the dtype holds up to {torch.finfo(dtype).max:.4g}); nothing was written. Save the "
            "adapter in float32 and run again"
        )
    return cast


def finish(
    run: Run,
    settings: Settings,
    base_info: SourceInfo,
    aligned_info: SourceInfo,
    report: Callable[[Run, list[LayerResult], float | None, bool], Report],
    store: BackupStore,
    in_place: bool,
    signer: Signer | None = None,
) -> Report:
    """Select, keep the original (in place), write (unless a dry run) and report one adapter: signed
    with ``signer``, else with no attestation left beside what was written."""
    adapter = run.loaded
    modules = adapter.modules
    results = [run.found[m.module][0] for m in modules]
    tau, chosen = select([r.similarity for r in results], settings.mode, settings.threshold, settings.num_layers)
    layers = [
        LayerResult(m.module, m.layer, r.similarity, c, r.reason, r.norm_ratio, run.found[m.module][1])
        for m, r, c in zip(modules, results, chosen, strict=True)
    ]
    replacements = {}
    for m, r, c in zip(modules, results, chosen, strict=True):
        if c and r.projected_b is not None:
            replacements[m.b_key] = _representable(r.projected_b, adapter.tensor(m.b_key).dtype, adapter.file, m.b_key)
    if settings.dry_run:
        return report(run, layers, tau, False)
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
    _record(store, provenance, run)
    adapter.format.write(
        adapter, replacements, provenance, run.output, overwrite_output=settings.force, notes=run.notes
    )
    _drop_stale_evaluation(adapter.dir, run.output, provenance[DIGEST_KEY], run.notes)
    result = attest(report(run, layers, tau, True), adapter.dir if run.output is None else run.output, signer)
    refresh_card(adapter.dir, run.output, result, provenance[DIGEST_KEY], asked=settings.model_card)
    return result


def attest(result: Report, written: safefs.Directory | Path, signer: Signer | None) -> Report:
    """The adapter just written at ``written`` signed (``result`` names its attestation), or left with
    none: an attestation a rewrite does not re-sign is removed, never left to describe other files."""
    with ExitStack() as stack:
        directory = written
        if isinstance(directory, Path):  # an output: a directory, or the file of a single-file format
            directory = stack.enter_context(open_location(directory, "the written adapter"))
        if signer is None:
            signed.unsign_directory(directory)
            return result
        path = signed.sign_written(directory, signer)
    result.notes.append(f"signed: {path} (key {signer.keyid})")
    return replace(result, attestation=path, signed_by=signer.keyid)


def _record(store: BackupStore, provenance: dict[str, str], run: Run) -> None:
    """The local record of what is about to be written (before the write: a crash after the rename
    leaves no unrecorded result), and the kept original bound to it. A store that cannot take it is a
    note: ``check`` on this machine will then say ``unverified``."""
    kept = run.kept.sha256 if run.kept is not None else None
    record: dict[str, object] = {
        "adapter": str(run.path),
        "output": str(run.output) if run.output is not None else None,
        "stamp": {k: v for k, v in provenance.items() if k != DIGEST_KEY},
        "original": kept,
    }
    try:
        store.record_written(provenance[DIGEST_KEY], record, kept)
    except SafeLoraError as e:
        run.notes.append(f"no local record kept ({e}): check on this machine cannot verify this adapter")


def refresh_card(source: safefs.Directory, output: Path | None, report: Report, digest: str, *, asked: bool) -> None:
    """The model card beside the adapter just written (the source's in place, or the output's), kept
    describing it (``card.refresh_card``). After the weights are written: a card that cannot be
    brought in step is an ``AdapterError`` (the run fails), since a card that describes other
    weights is worse than none, while the weights stay written."""
    if output is not None and os.path.isfile(output):
        if asked:  # a single-file format's output (FILE.gguf): its directory is not the adapter's
            report.notes.append(f"model card not written: {output} is a single file, with no card of its own")
        return
    try:
        if output is None:
            card.refresh_card(source, report, digest, asked=asked)
        else:
            with safefs.Directory(output, AdapterError) as directory:
                card.refresh_card(directory, report, digest, asked=asked)
    except SafeLoraError as e:
        raise AdapterError(
            f"{e}; the adapter's weights were written, but its model card ({card.CARD_FILE}) could not be "
            "brought in step with them"
        ) from None


def _drop_stale_evaluation(source: safefs.Directory, output: Path | None, digest: str, notes: list[str]) -> None:
    """An Evaluation section (``safelora eval``) in the written adapter's card describes the adapter as
    it was before this rewrite: it goes. A card that cannot be edited is a note. A single-file
    format's output (FILE.gguf) has no card."""
    if output is not None and os.path.isfile(output):
        return
    try:
        if output is None:
            evaluation.remove_stale(source, digest)
        else:
            with safefs.Directory(output, AdapterError) as directory:
                evaluation.remove_stale(directory, digest)
    except SafeLoraError as e:
        notes.append(f"model card's Evaluation section left in place: {e}")
