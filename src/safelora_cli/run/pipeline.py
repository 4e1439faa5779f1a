"""Walk an adapter's modules, stream the matching base/aligned weights, project, write, report."""

from __future__ import annotations

import json
import math
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch

from .._version import __version__
from ..adapters import (
    PROVENANCE_PREFIX,
    Adapter,
    LoraModule,
    Named,
    file_digest,
    load_adapter,
    open_all,
    rewrite_lock,
)
from ..errors import (
    AdapterError,
    AlreadyProjectedError,
    ChangedSinceError,
    DeviceError,
    DoraError,
    InPlaceError,
    SafeLoraError,
    SourceError,
)
from ..io import atomic, safefs
from ..io.atomic import TMP_MARK
from ..outputs import card
from ..projection import Mode, ModuleMath, Operator, Projector, build_v, select
from ..sources import Source
from ..stores.backups import Backup, BackupStore
from ..stores.cache import CorruptEntry, PairCache

Precision = Literal["float32", "float64"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class Settings:
    """How to project; everything a run's outcome depends on besides its inputs."""

    mode: Mode = "threshold"
    threshold: float = 0.5
    num_layers: int | None = None
    precision: Precision = "float32"
    device: Device = "auto"
    allow_dora: bool = False
    force: bool = False
    dry_run: bool = False
    output: Path | None = None
    backup: bool = True  # an in-place run keeps the original in the backup store first
    model_card: bool = False  # write the Safe LoRA section into the written adapter's README.md


@dataclass(frozen=True)
class SourceInfo:
    source: str
    revision: str | None
    fingerprint: str

    @property
    def identity(self) -> str:
        """How provenance names the source: ``path@fingerprint`` or ``repo@sha``."""
        return f"{self.source}@{self.revision or self.fingerprint}"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "revision": self.revision, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class LayerResult:
    module: str
    layer: int | None
    similarity: float | None
    projected: bool
    reason: str | None
    norm_ratio: float | None
    cached: bool = False  # the operator came from the projection cache


@dataclass(frozen=True)
class CacheUse:
    """How the projection cache served a run: its pair key, entries read, entries computed."""

    pair: str
    served: int
    computed: int


@dataclass(frozen=True)
class Report:
    """Everything a run did, for the table, the JSON document and the tests."""

    adapter: Path
    output: Path | None
    written: bool
    dry_run: bool
    base: SourceInfo
    aligned: SourceInfo
    mode: Mode
    threshold: float | None
    num_layers: int | None
    layers: list[LayerResult]
    skipped: list[tuple[str, str]]
    seconds: float
    bytes_read: int
    device: str
    notes: list[str] = field(default_factory=list)
    cache: CacheUse | None = None
    bytes_downloaded: int = 0
    backup: Backup | None = None  # the kept original this adapter's provenance names
    backup_created: bool = False  # kept by this run (else kept by an earlier one, or none)
    precision: Precision = "float32"

    def summary_markdown(self) -> str:
        """This run's section for a GitHub step summary (Markdown, with a Mermaid chart)."""
        from ..outputs.decision import summary_markdown

        return summary_markdown(self)

    def card_section(self) -> str:
        """This run's Safe LoRA section for a model card (between safelora's markers)."""
        from ..outputs.card import card_section

        return card_section(self)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw per-module similarity to ``path`` (.png or .svg; needs the ``safelora[plot]`` extra)."""
        from ..outputs.plot import plot

        plot(self, Path(path))

    @property
    def projected_count(self) -> int:
        return sum(layer.projected for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        """The document ``safelora project --json`` prints (see the README's "The JSON report"); every
        number in it is finite or null."""
        return {
            "safelora_version": __version__,
            "adapter": str(self.adapter),
            "output": str(self.output) if self.output else None,
            "written": self.written,
            "dry_run": self.dry_run,
            "base": self.base.to_json(),
            "aligned": self.aligned.to_json(),
            "mode": self.mode,
            "threshold": _finite(self.threshold),
            "num_layers": self.num_layers,
            "layer_count": len(self.layers),
            "projected_count": self.projected_count,
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
                for layer in self.layers
            ],
            "skipped": [{"key": key, "reason": reason} for key, reason in self.skipped],
            "notes": self.notes,
            "device": self.device,
            "bytes_read": self.bytes_read,
            "bytes_downloaded": self.bytes_downloaded,
            "cache": (
                {"pair": self.cache.pair, "served": self.cache.served, "computed": self.cache.computed}
                if self.cache is not None
                else None
            ),
            "precision": self.precision,
            "backup": (
                {"sha256": self.backup.sha256, "bytes": self.backup.nbytes, "created": self.backup_created}
                if self.backup is not None
                else None
            ),
            "seconds": round(self.seconds, 3),
        }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# Called after each module with its (unselected) result and the number of modules in the run.
OnModule = Callable[[LayerResult, int], None] | None


@dataclass(frozen=True)
class _Job:
    module: LoraModule
    base_key: str
    aligned_key: str


def _device(requested: Device) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda: no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _check_weight_shape(adapter: Adapter, m: LoraModule, label: str, shape: tuple[int, ...]) -> None:
    """The checkpoint weight (as stored) must be the matrix the adapter's A and B act on."""
    out = adapter.header.tensors[m.b_key].shape[0]
    inp = adapter.header.tensors[m.a_key].shape[1]
    expected = (inp, out) if adapter.config.fan_in_fan_out else (out, inp)
    if len(shape) != 2 or tuple(shape) != expected:
        layout = "in×out (fan_in_fan_out)" if adapter.config.fan_in_fan_out else "out×in"
        raise AdapterError(
            f"{m.module}: the adapter expects a {layout} weight of {list(expected)} but "
            f"{label} has {list(shape)}; the adapter was trained on another model, pass the "
            "base/aligned pair it was trained on"
        )


def _plan(group: _Group, base: Source, aligned: Source, modules: list[LoraModule]) -> list[_Job]:
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
            jobs.append(_Job(m, base_key, aligned_key))
    return jobs


_CACHE_WAIT = "another safelora run is computing this pair's projection cache; waiting for it"


def _adapter_wait(path: Path) -> str:
    return f"another safelora run is rewriting {path}; waiting for it"


_SLOTS = 2  # per stage: one item being used downstream while the next one is made

Item = TypeVar("Item")
Slot = TypeVar("Slot")
Result = TypeVar("Result")
_DONE, _STOP = object(), object()  # "no more items", "no more slots"


def _on_thread(
    items: Iterator[Item], work: Callable[[Item, Slot], Result], slots: list[Slot], name: str
) -> Generator[tuple[Result, Callable[[], None]], None, None]:
    """``work(item, slot)`` for each item on a thread of its own, ahead of the consumer.

    Yields each result with the function that hands its slot back: ``work`` writes into a slot, so
    a result stays valid until that call, and the thread runs at most ``len(slots)`` items ahead.
    Buffers are sized once and reused: no fresh allocation (and page faults) per item, and peak
    memory stays bounded. An exception on the thread is raised in the consumer; when the consumer
    stops early the thread stops too, and ``items`` is closed in either case.
    """
    free: queue.Queue[Slot | object] = queue.Queue()
    for slot in slots:
        free.put(slot)
    ready: queue.Queue[tuple[Result, Slot] | BaseException | object] = queue.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                slot = free.get()
                if slot is _STOP or stop.is_set():
                    return
                ready.put((work(item, cast(Slot, slot)), slot))
            ready.put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it in its thread
            ready.put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (got := ready.get()) is not _DONE:
            if isinstance(got, BaseException):
                raise got
            result, slot = cast(tuple[Result, Slot], got)
            yield result, partial(free.put, slot)
    finally:
        stop.set()
        free.put(_STOP)  # wakes a producer waiting for a slot
        thread.join()


def _prefetch(
    jobs: list[_Job], base: Source, aligned: Source, projector: Projector
) -> Iterator[tuple[_Job, torch.Tensor, float]]:
    """Each job's V and ‖V‖², made two stages ahead of the consumer: one thread reads a module's
    weights while another builds the previous module's V from them and the caller uses the one
    before (I/O, conversions and matmuls drop the GIL). From a warm page cache the build costs as
    much as the reading and the products, so two threads each take a share of the cores' work.
    """
    size = max(max(base.nbytes(j.base_key), aligned.nbytes(j.aligned_key)) for j in jobs)
    numel = max(math.prod(base.shape(j.base_key)) for j in jobs)

    def read(job: _Job, slot: tuple[bytearray, bytearray]) -> tuple[_Job, torch.Tensor, torch.Tensor]:
        w_base = _weight(base, job.base_key, base.read(job.base_key, slot[0]))
        return job, w_base, _weight(aligned, job.aligned_key, aligned.read(job.aligned_key, slot[1]))

    def build(
        item: tuple[tuple[_Job, torch.Tensor, torch.Tensor], Callable[[], None]], v_slot: torch.Tensor
    ) -> tuple[_Job, torch.Tensor, float]:
        (job, w_base, w_aligned), release = item
        try:
            v = v_slot[: w_base.numel()].view(w_base.shape)
            names = (f"{base.label}:{job.base_key}", f"{aligned.label}:{job.aligned_key}")
            return job, v, build_v(w_base, w_aligned, v, names)
        finally:
            release()

    reads = _on_thread(iter(jobs), read, [(bytearray(size), bytearray(size)) for _ in range(_SLOTS)], "safelora-read")
    built = _on_thread(reads, build, [projector.workspace(numel) for _ in range(_SLOTS)], "safelora-build")
    try:
        for result, release in built:
            yield result
            release()
    finally:
        built.close()  # stops both threads when the caller stops early


_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _weight(source: Source, name: str, t: torch.Tensor) -> torch.Tensor:
    """A checkpoint weight as the method defines it: a float16, bfloat16, float32 or float64 matrix.

    float8 would need a scale the file does not carry, complex numbers have no place in the method,
    and integer weights are quantized: none is silently cast.
    """
    if t.dtype not in _WEIGHT_DTYPES:
        raise SourceError(
            f"{source.label}: {name} is {str(t.dtype).removeprefix('torch.')}; Safe LoRA computes on float16, "
            "bfloat16, float32 or float64 weights: pass an unquantized checkpoint"
        )
    return t


@contextmanager
def _share_cores() -> Iterator[None]:
    """Split the cores between the build thread and the caller's while a batch is computed.

    OpenMP workers wait for one another at the end of every op, so one preempted by another thread
    stalls the whole op: on 2 cores, 2 compute threads plus the reader ran the Llama-2-7B benchmark
    4–15× slower than 1 compute thread plus the reader. Held for every module, cached or computed:
    MKL's results depend on the thread count, and both must be applied alike to give identical bytes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Run:
    """One adapter of a batch: where it is, what was found for it, and how it ended."""

    named: Named
    notes: list[str]
    adapter: Adapter | None = None
    original: Backup | None = None  # the kept original this run starts from, instead of the adapter's file
    kept: Backup | None = None  # the backup the written file's provenance names
    kept_now: bool = False
    found: dict[str, tuple[ModuleMath, bool]] = field(default_factory=dict)
    outcome: Report | SafeLoraError | None = None  # set once the run is over (a no-op or an error)

    @property
    def path(self) -> Path:
        return self.named.path

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()

    @property
    def loaded(self) -> Adapter:
        """The adapter, once ``_prepare`` has read it (every later step runs after that)."""
        if self.adapter is None:
            raise RuntimeError(f"{self.path}: adapter used before it was loaded")
        return self.adapter


class _Group:
    """The modules of a batch's adapters that share a layout: each operator is produced once for all."""

    def __init__(self, runs: list[_Run], transpose: bool) -> None:
        self.transpose = transpose
        self.users: dict[str, list[tuple[_Run, LoraModule]]] = {}
        for run in runs:
            for m in run.loaded.modules:
                self.users.setdefault(m.module, []).append((run, m))
        self.modules = [users[0][1] for users in self.users.values()]

    def live(self, module: str) -> list[tuple[_Run, LoraModule]]:
        return [(run, m) for run, m in self.users[module] if run.outcome is None]

    def fail(self, module: LoraModule, error: SafeLoraError) -> None:
        """End the run of every adapter that needs ``module``."""
        for run, _ in self.live(module.module):
            run.outcome = error

    def check(self, module: LoraModule, label: str, shape: tuple[int, ...]) -> bool:
        """Check the weight's shape against every adapter using it; a mismatch ends that adapter's run.

        Returns whether any adapter still needs the module.
        """
        for run, m in self.live(module.module):
            try:
                _check_weight_shape(run.loaded, m, label, shape)
            except AdapterError as e:
                run.outcome = e
        return bool(self.live(module.module))


def _weight_size(adapter: Adapter, m: LoraModule) -> int:
    """out × in of the weight the adapter's module acts on."""
    return adapter.header.tensors[m.b_key].shape[0] * adapter.header.tensors[m.a_key].shape[1]


def _cached(
    cache: PairCache,
    group: _Group,
    modules: list[LoraModule],
    base: Source,
    projector: Projector,
    notes: list[str],
    misses: list[LoraModule],
) -> Iterator[tuple[LoraModule, Operator, bool]]:
    """The modules the cache has, with their operators; the others are appended to ``misses``.

    A corrupt entry is a miss, and noted.
    """
    transpose = group.transpose
    # The most values each module's operator can have: an entry claiming more is corrupt, unread.
    limits = [max(_weight_size(run.loaded, mod) for run, mod in group.users[m.module]) for m in modules]
    names = [m.module for m in modules]
    for m, (_, stored) in zip(modules, cache.load_all(names, transpose, limits), strict=True):
        if isinstance(stored, CorruptEntry):
            notes.append(f"projection cache: the entry for {m.module} was corrupt ({stored}); recomputed")
            misses.append(m)
        elif stored is None:
            misses.append(m)
        else:
            out, inp = stored.out_features, stored.in_features
            if group.check(m, base.label, (inp, out) if transpose else (out, inp)):
                yield m, projector.load(stored.kind, stored.data, stored.norm, out, inp), True


def _operators(
    group: _Group,
    base: Source,
    aligned: Source,
    projector: Projector,
    cache: PairCache | None,
    notes: list[str],
    on_wait: Callable[[str], None],
) -> Iterator[tuple[LoraModule, Operator, bool]]:
    """Each module's operator and whether the cache served it, cached ones first.

    Misses are computed from the checkpoints while holding the pair's lock, after looking again:
    a concurrent run on the same pair may have just stored them, so each entry is computed once.
    An operator is only valid until the next one is produced (they share workspaces).
    """
    todo = list(group.modules)
    if cache is not None:
        todo = []
        yield from _cached(cache, group, group.modules, base, projector, notes, todo)
        if not todo:
            return
    with cache.locked(lambda: on_wait(_CACHE_WAIT)) if cache is not None else nullcontext():
        if cache is not None:
            missing, todo = todo, []
            yield from _cached(cache, group, missing, base, projector, [], todo)
            if not todo:
                return
        jobs = [job for job in _plan(group, base, aligned, todo) if group.live(job.module.module)]
        if not jobs:
            return
        for job, v, norm2 in _prefetch(jobs, base, aligned, projector):
            op = projector.operator_from(v, norm2, transpose=group.transpose)
            if cache is not None:
                cache.store(job.module.module, group.transpose, job.base_key, job.aligned_key, op)
            yield job.module, op, False


def _settings_provenance(settings: Settings, tau: float | None) -> dict[str, str]:
    p = {
        "mode": settings.mode,
        "threshold": json.dumps(tau),
        "precision": settings.precision,
    }
    if settings.mode == "number":
        p["num_layers"] = str(settings.num_layers)
    return {PROVENANCE_PREFIX + k: v for k, v in p.items()}


def _same_run(previous: dict[str, str], base: SourceInfo, aligned: SourceInfo, settings: Settings) -> bool:
    """Whether provenance records this pair and these settings (in number mode τ_k is an outcome, not one)."""
    want = {
        PROVENANCE_PREFIX + "base": base.identity,
        PROVENANCE_PREFIX + "aligned": aligned.identity,
        **_settings_provenance(settings, settings.threshold),
    }
    if settings.mode == "number":
        del want[PROVENANCE_PREFIX + "threshold"]
    return all(previous.get(k) == v for k, v in want.items())


def source_info(src: Source) -> SourceInfo:
    return SourceInfo(src.label, src.revision, src.fingerprint())


def project_adapter(
    adapter_path: Path,
    base: Source,
    aligned: Source,
    settings: Settings,
    *,
    notes: list[str] | None = None,
    on_module: OnModule = None,
    cache: PairCache | None = None,
    on_wait: Callable[[str], None] = lambda message: None,
    backups: BackupStore | None = None,
) -> Report:
    """Run Safe LoRA on one adapter against one (base, aligned) pair. Raises its error."""
    with open_all([adapter_path]) as named:
        [outcome] = project_adapters(
            named,
            base,
            aligned,
            settings,
            notes=notes,
            on_module=on_module,
            cache=cache,
            on_wait=on_wait,
            backups=backups,
        )
    if isinstance(outcome, SafeLoraError):
        raise outcome
    return outcome


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

    ``backups`` (default: the store ``SAFELORA_BACKUPS`` names) keeps each in-place run's original
    before its adapter is replaced (unless ``settings.backup`` is off), and gives a projected
    adapter's original back to a run that projects it again.
    """
    store = backups if backups is not None else BackupStore()
    started = time.perf_counter()
    shared_notes = list(notes or [])
    if cache is not None and settings.precision != "float32":
        shared_notes.append("projection cache not used: it holds float32 operators and this run is float64")
        cache = None
    device = _device(settings.device)
    base_info, aligned_info = source_info(base), source_info(aligned)
    runs = [_Run(named, [*shared_notes, *named.notes]) for named in adapters]
    for run in runs:
        if run.named.error is not None:
            run.outcome = run.named.error
    in_place = not settings.dry_run and settings.output is None

    def report(run: _Run, layers: list[LayerResult], tau: float | None, written: bool) -> Report:
        served = sum(cached for _, cached in run.found.values())
        return Report(
            adapter=run.path,
            output=settings.output,
            written=written,
            dry_run=settings.dry_run,
            base=base_info,
            aligned=aligned_info,
            mode=settings.mode,
            threshold=tau,
            num_layers=settings.num_layers,
            layers=layers,
            skipped=run.loaded.skipped,
            seconds=time.perf_counter() - started,
            bytes_read=base.bytes_read + aligned.bytes_read,
            device=str(device),
            notes=run.notes + (cache.warnings if cache is not None else []),
            cache=CacheUse(cache.key, served, len(run.found) - served) if cache is not None else None,
            bytes_downloaded=base.bytes_downloaded + aligned.bytes_downloaded,
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
                    _prepare(run, settings, base_info, aligned_info, in_place, report, store)
                except SafeLoraError as e:
                    run.outcome = e
        live = [run for run in runs if run.outcome is None]
        projector = Projector(torch.float64 if settings.precision == "float64" else torch.float32, device)
        total = sum(len(run.loaded.modules) for run in live)
        compute_notes: list[str] = []
        with _share_cores():
            for transpose in sorted({run.loaded.config.fan_in_fan_out for run in live}):
                group = _Group([run for run in live if run.loaded.config.fan_in_fan_out == transpose], transpose)
                for m, op, cached in _operators(group, base, aligned, projector, cache, compute_notes, on_wait):
                    for run, mod in group.live(m.module):
                        _apply(run, mod, op, cached, projector, on_module, total)
                    if all(run.outcome is not None for run in live):
                        break
        for run in live:
            run.notes.extend(compute_notes)
        for run in live:
            if run.outcome is None:
                try:
                    run.outcome = _finish(run, settings, base_info, aligned_info, report, store, in_place)
                except SafeLoraError as e:
                    run.outcome = e
    return [run.outcome for run in runs if run.outcome is not None]


def _prepare(
    run: _Run,
    settings: Settings,
    base_info: SourceInfo,
    aligned_info: SourceInfo,
    in_place: bool,
    report: Callable[[_Run, list[LayerResult], float | None, bool], Report],
    store: BackupStore,
) -> None:
    """Load the adapter and decide what to project; a no-op ends the run with its report.

    An adapter safelora projected before is projected again from its kept original (the backup its
    provenance names), so the result equals projecting the original directly; without a backup,
    only ``force`` projects it again, on top of the earlier projection.
    """
    if run.named.dir is None:
        raise RuntimeError(f"{run.path}: prepared without an open directory")
    run.adapter = adapter = load_adapter(run.named.dir)
    run.notes.extend(adapter.warnings)
    previous = adapter.provenance()
    if previous:
        if not settings.force and _same_run(previous, base_info, aligned_info, settings):
            run.notes.append("already projected with this pair and these settings: nothing to do")
            tau = adapter.provenance_value("threshold", "null", (int, float, type(None)))
            run.outcome = report(run, [], tau, False)
            return
        original = store.find(previous.get(PROVENANCE_PREFIX + "original"))
        if original is not None:
            if not settings.force and previous.get(PROVENANCE_PREFIX + "digest") != file_digest(adapter):
                raise ChangedSinceError(
                    f"{adapter.file}: changed since safelora projected it; projecting again starts from the "
                    f"original (backup {original.sha256[:12]}) and would throw those changes away"
                )
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
            raise DoraError(f"{adapter.file}: a DoRA adapter (lora_magnitude_vector); Safe LoRA does not define DoRA")
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


def _apply(
    run: _Run,
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


def _finish(
    run: _Run,
    settings: Settings,
    base_info: SourceInfo,
    aligned_info: SourceInfo,
    report: Callable[[_Run, list[LayerResult], float | None, bool], Report],
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
        PROVENANCE_PREFIX + "projected": json.dumps([layer.module for layer in layers if layer.projected]),
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
    adapter.format.write(
        adapter, replacements, provenance, settings.output, overwrite_output=settings.force, notes=run.notes
    )
    result = report(run, layers, tau, True)
    if settings.model_card:
        _write_card(adapter.dir, settings.output, result)
    return result


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
