"""Walk an adapter's modules, stream the matching base/aligned weights, project, write, report.

The orchestration: plan the reads, produce each module's operator once for a batch (from the
projection cache or the checkpoints, ``stages``), apply it to every adapter using it, and end each
adapter's run (``write``).
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..adapters import (
    PROVENANCE_PREFIX,
    Adapter,
    LoraModule,
    Named,
    load_adapter,
    rewrite_lock,
)
from ..adapters.digest import DIGEST_KEY, normalized_names
from ..errors import (
    AlreadyProjectedError,
    DeviceError,
    DoraError,
    InPlaceError,
    SafeLoraError,
    SourceError,
    UnverifiedStampError,
)
from ..io import atomic
from ..io.atomic import TMP_MARK
from ..outputs.report import Report
from ..projection import Operator, Projector
from ..results import CacheUse, Device, LayerResult, Settings, SourceInfo
from ..sources import Source
from ..stores.backups import BackupStore
from ..stores.cache import CorruptEntry, PairCache
from .audit import recorded_infos, source_info, verified_by_record
from .batch import Group, Run
from .binding import require_bound
from .stages import Job, prefetch, share_cores
from .write import attest, finish, refresh_card, same_run

if TYPE_CHECKING:
    from ..attest.keys import Signer

# Called after each module with its (unselected) result and the number of modules in the run.
OnModule = Callable[[LayerResult, int], None] | None


def _device(requested: Device) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda: no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _plan(group: Group, base: Source, aligned: Source, modules: list[LoraModule]) -> list[Job]:
    """Pair modules with their weights by name, announce the reads and check shapes, before reading any tensor.

    A module no adapter can use any more (its shape check failed for all of them) is not read.
    """
    keys = []
    for m in modules:
        try:
            keys.append((m, base.resolve(m.module), aligned.resolve(m.module)))
        except SourceError as e:
            # A module the checkpoints lack belongs to an adapter of another model: that adapter fails.
            group.fail(m, e)
    base.plan([base_key for _, base_key, _ in keys])
    aligned.plan([aligned_key for _, _, aligned_key in keys])
    jobs = []
    for m, base_key, aligned_key in keys:
        b_shape, a_shape = base.shape(base_key), aligned.shape(aligned_key)
        if b_shape != a_shape:
            raise SourceError(
                f"{m.module}: {base.label} has {list(b_shape)} but {aligned.label} has {list(a_shape)}; "
                "base and aligned must be the same architecture and size"
            )
        if group.check(m, base.label, b_shape):
            jobs.append(Job(m, base_key, aligned_key))
    return jobs


_CACHE_WAIT = "another safelora run is computing this pair's projection cache; waiting for it"


def _adapter_wait(path: Path) -> str:
    return f"another safelora run is rewriting {path}; waiting for it"


def _weight_size(adapter: Adapter, m: LoraModule) -> int:
    """out × in of the weight the adapter's module acts on."""
    return m.out_features * m.in_features


def _cached(
    cache: PairCache,
    group: Group,
    modules: list[LoraModule],
    base: Source,
    projector: Projector,
    noting: bool,
    misses: list[LoraModule],
    keys: dict[str, tuple[str, str]],
) -> Iterator[tuple[LoraModule, Operator, bool]]:
    """The modules the cache has, with their operators; the others are appended to ``misses``.

    A corrupt entry is a miss, and (``noting``) a note for each adapter that uses its module.
    """
    transpose = group.transpose
    # The most values each module's operator can have: an entry claiming more is corrupt, unread.
    limits = [max(_weight_size(run.loaded, mod) for run, mod in group.users[m.module]) for m in modules]
    names = [m.module for m in modules]
    for m, (_, stored) in zip(modules, cache.load_all(names, transpose, limits), strict=True):
        if isinstance(stored, CorruptEntry):
            if noting:
                for run, _ in group.live(m.module):
                    run.notes.append(f"projection cache: the entry for {m.module} was corrupt ({stored}); recomputed")
            misses.append(m)
        elif stored is None:
            misses.append(m)
        else:
            out, inp = stored.out_features, stored.in_features
            if group.check(m, base.label, (inp, out) if transpose else (out, inp)):
                keys[m.module] = (stored.base_key, stored.aligned_key)
                yield m, projector.load(stored.kind, stored.data, stored.norm, out, inp), True


def _operators(
    group: Group,
    base: Source,
    aligned: Source,
    projector: Projector,
    cache: PairCache | None,
    on_wait: Callable[[str], None],
    keys: dict[str, tuple[str, str]],
) -> Iterator[tuple[LoraModule, Operator, bool]]:
    """Each module's operator and whether the cache served it, cached ones first.

    Misses are computed from the checkpoints while holding the pair's lock, after looking again:
    a concurrent run on the same pair may have just stored them, so each entry is computed once.
    An operator is only valid until the next one is produced (they share workspaces).
    """
    todo = list(group.modules)
    if cache is not None:
        todo = []
        yield from _cached(cache, group, group.modules, base, projector, True, todo, keys)
        if not todo:
            return
    with cache.locked(lambda: on_wait(_CACHE_WAIT)) if cache is not None else nullcontext():
        if cache is not None:
            missing, todo = todo, []
            yield from _cached(cache, group, missing, base, projector, False, todo, keys)
            if not todo:
                return
        jobs = [job for job in _plan(group, base, aligned, todo) if group.live(job.module.module)]
        if not jobs:
            return
        for job, v, norm2 in prefetch(jobs, base, aligned, projector):
            op = projector.operator_from(v, norm2, transpose=group.transpose)
            if cache is not None:
                cache.store(job.module.module, group.transpose, job.base_key, job.aligned_key, op)
            keys[job.module.module] = (job.base_key, job.aligned_key)
            yield job.module, op, False
        for source in (base, aligned):  # under the pair's lock: a run waiting for it finds them
            source.remember()


def _remembered(source: Source, cache: PairCache) -> None:
    """Give ``source`` the digest memo beside the cache's pairs (unless it has one), and what it knows:
    a run the cache serves reads no checkpoint byte, and still names the pair by content."""
    if source.memo is None:
        source.memo = cache.digests()
        source.digests.update(source.memo.load(source.cache_identity()))


def _pair_infos(
    run: Run, base: Source, aligned: Source, keys: dict[str, tuple[str, str]]
) -> tuple[SourceInfo, SourceInfo]:
    """The pair as ``run``'s adapter used it: the digests of the weights of the modules it was computed on."""
    used = [keys[m.module] for m in run.loaded.modules if m.module in run.found and m.module in keys]
    run.infos = (source_info(base, [b for b, _ in used]), source_info(aligned, [a for _, a in used]))
    return run.infos


def _refuse_same_content(base: Source, aligned: Source, keys: dict[str, tuple[str, str]]) -> None:
    """Base and aligned whose every weight used has one content (a copy of one checkpoint): every V
    is 0. Checked once the digests are known, before anything is written."""
    pairs = list(keys.values())
    if not pairs:
        return
    base_digests = base.digest([b for b, _ in pairs])
    aligned_digests = aligned.digest([a for _, a in pairs])
    if all(base_digests[b] == aligned_digests[a] for b, a in pairs):
        raise SourceError(
            f"base {base.label} and aligned {aligned.label} are the same checkpoint (the same content): every "
            "V = W_aligned − W_base would be 0; pass the unaligned base model as base and the chat model as aligned"
        )


class _Meter:
    """Each adapter's own seconds and bytes in a batch: what was spent since the last charge goes to
    the adapter it was spent for, so the reports add up to the batch's totals."""

    def __init__(self, base: Source, aligned: Source) -> None:
        self.sources = (base, aligned)
        # From the start of the run, and every byte the sources counted: opening them is the first adapter's.
        self.mark = (time.perf_counter(), 0, 0)

    def _now(self) -> tuple[float, int, int]:
        return (
            time.perf_counter(),
            sum(s.bytes_read for s in self.sources),
            sum(s.bytes_downloaded for s in self.sources),
        )

    def charge(self, run: Run, read: int | None = None) -> None:
        """The time since the last charge, and the bytes: ``read`` when given (the stage threads read
        ahead, so a module's bytes are its weights' sizes; downloads are then shared by ``share``),
        else what the sources counted."""
        now = self._now()
        run.seconds += now[0] - self.mark[0]
        if read is None:
            run.bytes_read += now[1] - self.mark[1]
            run.bytes_downloaded += now[2] - self.mark[2]
            self.mark = now
        else:
            run.bytes_read += read
            self.mark = (now[0], now[1], self.mark[2])

    def share(self, reads: dict[int, tuple[Run, int]]) -> None:
        """The bytes downloaded since the last full charge, shared by the runs in proportion to the
        module bytes each was charged (``reads``: id → (run, bytes)), the remainder to the last."""
        now = self._now()
        downloaded = now[2] - self.mark[2]
        total = sum(n for _, n in reads.values())
        left = downloaded
        for i, (run, n) in enumerate(reads.values(), 1):
            part = left if i == len(reads) else downloaded * n // total if total else 0
            run.bytes_downloaded += part
            left -= part
        self.mark = now


def project_adapters(
    adapters: Sequence[Named],
    base: Source,
    aligned: Source,
    settings: Settings,
    *,
    notes: list[str] | None = None,
    on_module: OnModule = None,
    cache: PairCache | None = None,
    on_wait: Callable[[str], None] = lambda message: None,
    backups: BackupStore | None = None,
    signer: Signer | None = None,
    outputs: Sequence[Path | None] | None = None,
) -> list[Report | SafeLoraError]:
    """Run Safe LoRA on several adapters (opened by ``adapter.open_all``) against one pair: a report
    or an error per adapter, in order.

    Each module's operator is read or computed once for every adapter that targets it. A bad adapter
    ends its own run only; a bad checkpoint (or the network) ends them all, by raising.
    In-place runs hold their adapter's ``rewrite_lock`` from reading the adapter to replacing it
    (taken in the order of the directories' identities, so two batches never wait on each other).
    With ``cache`` (float32 runs only), operators are read from and stored in the projection cache:
    cached modules read nothing from either checkpoint, and the bytes written are identical to an
    uncached run's, since P is always computed from the same float32 operator.

    ``signer`` signs each adapter written, or found already projected in place (a signed attestation
    beside it); without it, an attestation beside a rewritten adapter is removed.

    ``backups`` (default: the store ``SAFELORA_BACKUPS`` names) keeps each in-place run's original
    before its adapter is replaced (unless ``settings.backup`` is off), and gives a projected
    adapter's original back to a run that projects it again.

    ``outputs`` (``batch.outputs``, checked before anything is read) gives each adapter its own
    output; without it, every adapter's output is ``settings.output``.
    """
    store = backups if backups is not None else BackupStore()
    shared_notes = list(notes or [])
    if cache is not None and settings.precision != "float32":
        shared_notes.append("projection cache not used: it holds float32 operators and this run is float64")
        cache = None
    device = _device(settings.device)
    if cache is not None:
        _remembered(base, cache)
        _remembered(aligned, cache)
    base_info, aligned_info = source_info(base), source_info(aligned)
    targets = list(outputs) if outputs is not None else [settings.output] * len(adapters)
    runs = [Run(named, [*shared_notes, *named.notes], output=out) for named, out in zip(adapters, targets, strict=True)]
    for run in runs:
        if run.named.error is not None:
            run.outcome = run.named.error
    in_place = not settings.dry_run and settings.output is None

    meter = _Meter(base, aligned)

    def report(run: Run, layers: list[LayerResult], tau: float | None, written: bool) -> Report:
        meter.charge(run)
        served = sum(cached for _, cached in run.found.values())
        used_base, used_aligned = run.infos or (base_info, aligned_info)
        return Report(
            adapter=run.path,
            output=run.output,
            written=written,
            dry_run=settings.dry_run,
            base=used_base,
            aligned=used_aligned,
            mode=settings.mode,
            threshold=tau,
            num_layers=settings.num_layers,
            layers=layers,
            skipped=run.loaded.skipped,
            seconds=run.seconds,
            bytes_read=run.bytes_read,
            device=str(device),
            notes=run.notes + (cache.warnings if cache is not None else []),
            cache=CacheUse(cache.key, served, len(run.found) - served) if cache is not None else None,
            bytes_downloaded=run.bytes_downloaded,
            backup=run.kept,
            backup_created=run.kept_now,
            precision=settings.precision,
        )

    with ExitStack() as held:
        for run in sorted(runs, key=lambda r: r.named.dir.identity if r.named.dir else (0, 0)) if in_place else []:
            if run.named.dir is None or run.outcome is not None:
                continue
            try:
                held.enter_context(rewrite_lock(run.named.dir, partial(on_wait, _adapter_wait(run.path))))
            except SafeLoraError as e:
                run.outcome = e
        for run in runs:
            if run.outcome is None:
                held.callback(run.close)
                try:
                    _prepare(run, settings, base, aligned, in_place, report, store, signer)
                except SafeLoraError as e:
                    run.outcome = e
                meter.charge(run)
        live = [run for run in runs if run.outcome is None]
        projector = Projector(torch.float64 if settings.precision == "float64" else torch.float32, device)
        total = sum(len(run.loaded.modules) for run in live)
        keys: dict[str, tuple[str, str]] = {}  # module → (base key, aligned key) of its weight
        reads: dict[int, tuple[Run, int]] = {}  # the module bytes each run was charged
        with share_cores():
            for transpose in sorted({run.loaded.config.fan_in_fan_out for run in live}):
                group = Group([run for run in live if run.loaded.config.fan_in_fan_out == transpose], transpose)
                for m, op, cached in _operators(group, base, aligned, projector, cache, on_wait, keys):
                    users = group.live(m.module)
                    if users:  # a module shared in a batch is read and computed once: for the first adapter needing it
                        first = users[0][0]
                        read = 0 if cached else base.nbytes(keys[m.module][0]) + aligned.nbytes(keys[m.module][1])
                        meter.charge(first, read)
                        reads[id(first)] = (first, reads.get(id(first), (first, 0))[1] + read)
                    for run, mod in users:
                        _apply(run, mod, op, cached, projector, on_module, total)
                        meter.charge(run, 0)
                    if all(run.outcome is not None for run in live):
                        break
        meter.share(reads)
        _refuse_same_content(base, aligned, keys)
        for run in live:
            if run.outcome is None:
                used_base, used_aligned = _pair_infos(run, base, aligned, keys)
                try:
                    run.outcome = finish(run, settings, used_base, used_aligned, report, store, in_place, signer)
                except SafeLoraError as e:
                    run.outcome = e
                meter.charge(run)
    return [run.outcome for run in runs if run.outcome is not None]


def _prepare(
    run: Run,
    settings: Settings,
    base: Source,
    aligned: Source,
    in_place: bool,
    report: Callable[[Run, list[LayerResult], float | None, bool], Report],
    store: BackupStore,
    signer: Signer | None,
) -> None:
    """Load the adapter and decide what to project; a no-op ends the run with its report (an in-place
    one signed with ``signer``).

    An adapter safelora projected before is projected again from its kept original (the backup its
    provenance names), so the result equals projecting the original directly; without a backup,
    only ``force`` projects it again, on top of the earlier projection.
    """
    if run.named.dir is None:
        raise RuntimeError(f"{run.path}: prepared without an open directory")
    run.adapter = adapter = load_adapter(run.named.dir, base.model_config)
    if run.output is not None:
        # Before any work, and in a dry run too: it exits as the run would.
        adapter.format.check_output(adapter, run.output, overwrite=settings.force)
    run.notes.extend(adapter.warnings)
    normalized_names(adapter)  # two keys for one tensor: refused before any work (the stamp could not cover both)
    previous = adapter.provenance()
    if previous:
        if not settings.force and same_run(previous, base, aligned, settings):
            if not verified_by_record(adapter, store):
                # A stamp anyone could have pasted: skipping the work on its word would ship the adapter unprojected.
                raise UnverifiedStampError(
                    f"{adapter.file}: its stamp says it was projected with this pair and these settings, but nothing "
                    "verifies the stamp (no record of safelora writing it on this machine); verify it, restore the "
                    "original, or force a projection of what is there"
                )
            run.outcome = _unchanged(run, adapter, previous, settings, base, aligned, report, signer)
            return
        original = store.find(previous.get(PROVENANCE_PREFIX + "original"))
        if original is not None:
            require_bound(adapter, original, store, settings.force, "projecting again from the original")
            run.adapter = adapter = adapter.with_weights(store.open(original), original.path)
            run.original = original
            run.notes.append(f"started from the original adapter (backup {original.sha256[:12]}), not its projection")
        elif not settings.force:
            pair = f"{previous.get(PROVENANCE_PREFIX + 'base')} → {previous.get(PROVENANCE_PREFIX + 'aligned')}"
            raise AlreadyProjectedError(
                f"{adapter.file}: already projected by safelora against {pair}, and no backup of its original is "
                f"kept (looked in {store.root}); projecting twice shrinks the update again"
            )
        else:
            run.notes.append(
                "forced, without a backup of the original: projected again, on top of the earlier projection"
            )
    if adapter.dora:
        if not settings.allow_dora:
            raise DoraError(f"{adapter.file}: a DoRA adapter (magnitude vectors); Safe LoRA does not define DoRA")
        run.notes.append("DoRA: lora_B projected, magnitude vectors left unchanged")
    for name in adapter.format.kept_files(adapter) if in_place else ():
        st = adapter.dir.lstat(name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            # os.replace would swap the link for a regular file and leave its target (often a shared
            # blob, as in the Hugging Face cache) as it was: rarely what anyone meant.
            raise InPlaceError(
                f"{adapter.dir.path / name}: is a symbolic link, and rewriting it in place would replace the link, "
                f"not its target; replace the link with a copy of {name}"
            )
        atomic.clean_stale(adapter.dir, f".{name}{TMP_MARK}")


def _unchanged(
    run: Run,
    adapter: Adapter,
    previous: dict[str, str],
    settings: Settings,
    base: Source,
    aligned: Source,
    report: Callable[[Run, list[LayerResult], float | None, bool], Report],
    signer: Signer | None,
) -> Report:
    """A verified adapter already projected with this pair and these settings: the projection that is
    there, as its stamp records it, and (with an output, unless a dry run) the adapter copied whole;
    unless a dry run, its card refreshed and (with ``signer``) signed where it is."""
    run.infos = recorded_infos(previous, base, aligned)
    layers = _recorded_layers(adapter)
    if layers is None:
        run.notes.append(
            "its stamp predates the per-module record (safelora.layers): the modules and similarities are not known"
        )
    written = run.output is not None and not settings.dry_run
    if written:
        stamp = {k: v for k, v in previous.items() if k != DIGEST_KEY}
        adapter.format.write(adapter, {}, stamp, run.output, overwrite_output=settings.force, notes=run.notes)
        run.notes.append("already projected with this pair and these settings: copied to the output as it is")
    else:
        run.notes.append("already projected with this pair and these settings: nothing to do")
    tau = adapter.provenance_value("threshold", "null", (int, float, type(None)))
    done = report(run, layers or [], tau, written)
    if not settings.dry_run:  # a card left describing other weights is brought in step with these
        refresh_card(adapter.dir, run.output, done, previous[DIGEST_KEY], asked=settings.model_card)
        if signer is not None:
            done = attest(done, adapter.dir if run.output is None else run.output, signer)
    return replace(done, status="unchanged", layers_known=layers is not None)


def _recorded_layers(adapter: Adapter) -> list[LayerResult] | None:
    """The modules' similarities, decisions and ‖CB‖/‖B‖ as a verified stamp records them
    (``safelora.layers``), or None for a stamp written before it did."""
    if adapter.provenance().get(PROVENANCE_PREFIX + "layers") is None:
        return None
    recorded = adapter.provenance_value("layers", "[]", (list,))
    by_module = {m.module: m for m in adapter.modules}
    out = []
    for item in recorded:
        if not (isinstance(item, dict) and item.get("module") in by_module):
            continue
        similarity, ratio = (_number(item.get(key)) for key in ("similarity", "norm_ratio"))
        layer = by_module[item["module"]].layer
        out.append(LayerResult(item["module"], layer, similarity, item.get("projected") is True, None, ratio))
    return out


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _apply(
    run: Run,
    m: LoraModule,
    op: Operator,
    cached: bool,
    projector: Projector,
    on_module: OnModule,
    total: int,
) -> None:
    """One adapter's module against its operator; NaN/Inf in its A or B ends that adapter's run."""
    adapter = run.loaded
    try:
        math_ = projector.apply(op, adapter.tensor(m.a_key), adapter.tensor(m.b_key), (m.a_key, m.b_key))
    except SafeLoraError as e:
        run.outcome = e
        return
    run.found[m.module] = (math_, cached)
    if on_module is not None:
        on_module(
            LayerResult(m.module, m.layer, math_.similarity, False, math_.reason, math_.norm_ratio, cached), total
        )
