"""Walk an adapter's modules, stream the matching base/aligned weights, project, write, report."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import __version__
from .adapter import (
    ADAPTER_FILE,
    PROVENANCE_PREFIX,
    Adapter,
    LoraModule,
    clean_stale_temps,
    load_adapter,
    rewrite_lock,
    write_adapter,
)
from .cache import CorruptEntry, PairCache
from .errors import AdapterError, AlreadyProjectedError, SafeLoraError, SourceError
from .projection import Mode, ModuleMath, Operator, Projector, select
from .sources import Source

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


@dataclass(frozen=True)
class SourceInfo:
    source: str
    revision: str | None
    fingerprint: str

    @property
    def identity(self) -> str:
        """How provenance names the source: ``path@fingerprint`` or ``repo@sha``."""
        return f"{self.source}@{self.revision or self.fingerprint}"


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

    @property
    def projected_count(self) -> int:
        return sum(layer.projected for layer in self.layers)


# Called after each module with its (unselected) result and the number of modules in the run.
OnModule = Callable[[LayerResult, int], None] | None


@dataclass(frozen=True)
class _Job:
    module: LoraModule
    base_key: str
    aligned_key: str


def _device(requested: Device) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise SafeLoraError("--device cuda: no CUDA device is available; use --device cpu or auto")
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


def _plan(adapter: Adapter, base: Source, aligned: Source, modules: list[LoraModule]) -> list[_Job]:
    """Pair modules with their weights by name, announce the reads and check shapes, before reading any tensor."""
    keys = [(m, base.resolve(m.module), aligned.resolve(m.module)) for m in modules]
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
        _check_weight_shape(adapter, m, base.label, b_shape)
        jobs.append(_Job(m, base_key, aligned_key))
    return jobs


_SLOTS = 2  # one module being computed while the next one is read


def _prefetch(jobs: list[_Job], base: Source, aligned: Source) -> Iterator[tuple[_Job, torch.Tensor, torch.Tensor]]:
    """Read module i+1's weights on a thread while module i is computed (matmuls drop the GIL).

    Each slot's buffers are sized once for the largest tensor and reused: no fresh allocation (and
    page faults) per tensor, and peak memory stays a few copies of the largest targeted tensor.
    """
    size = max(max(base.nbytes(j.base_key), aligned.nbytes(j.aligned_key)) for j in jobs)
    free: queue.Queue[tuple[bytearray, bytearray]] = queue.Queue()
    for _ in range(_SLOTS):
        free.put((bytearray(size), bytearray(size)))
    ready: queue.Queue[tuple[_Job, torch.Tensor, torch.Tensor, tuple[bytearray, bytearray]] | BaseException] = (
        queue.Queue()
    )
    stop = threading.Event()

    def produce() -> None:
        try:
            for job in jobs:
                slot = free.get()
                if stop.is_set():
                    return
                ready.put((job, base.read(job.base_key, slot[0]), aligned.read(job.aligned_key, slot[1]), slot))
        except BaseException as e:  # handed to the consumer, which re-raises it in the main thread
            ready.put(e)

    thread = threading.Thread(target=produce, name="safelora-prefetch", daemon=True)
    thread.start()
    try:
        for _ in jobs:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            job, w_base, w_aligned, slot = item
            yield job, w_base, w_aligned
            free.put(slot)
    finally:
        stop.set()
        free.put((bytearray(), bytearray()))  # wakes a producer waiting for a slot
        thread.join()


@contextmanager
def _leave_a_core() -> Iterator[None]:
    """Compute on one thread fewer while the reader threads (weights, cache entries) work.

    OpenMP workers wait for one another at the end of every op, so one preempted by a reader stalls
    the whole op: on 2 cores, 2 compute threads plus the reader ran the Llama-2-7B benchmark 4–15×
    slower than 1 compute thread plus the reader. Held for every module, cached or computed: MKL's
    results depend on the thread count, and both must be applied alike to give identical bytes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cached(
    cache: PairCache,
    adapter: Adapter,
    modules: list[LoraModule],
    base: Source,
    projector: Projector,
    notes: list[str],
    misses: list[LoraModule],
) -> Iterator[tuple[LoraModule, Operator, bool]]:
    """The modules the cache has, with their operators; the others are appended to ``misses``.

    A corrupt entry is a miss, and noted.
    """
    transpose = adapter.config.fan_in_fan_out
    for m, (_, stored) in zip(modules, cache.load_all([m.module for m in modules], transpose), strict=True):
        if isinstance(stored, CorruptEntry):
            notes.append(f"projection cache: the entry for {m.module} was corrupt ({stored}); recomputed")
            misses.append(m)
        elif stored is None:
            misses.append(m)
        else:
            out, inp = stored.out_features, stored.in_features
            _check_weight_shape(adapter, m, base.label, (inp, out) if transpose else (out, inp))
            yield m, projector.load(stored.kind, stored.data, stored.norm, out, inp), True


def _operators(
    adapter: Adapter,
    base: Source,
    aligned: Source,
    projector: Projector,
    cache: PairCache | None,
    notes: list[str],
    on_cache_wait: Callable[[], None],
) -> Iterator[tuple[LoraModule, Operator, bool]]:
    """Each module's operator and whether the cache served it, cached ones first.

    Misses are computed from the checkpoints while holding the pair's lock, after looking again:
    a concurrent run on the same pair may have just stored them, so each entry is computed once.
    An operator is only valid until the next one is produced (they share workspaces).
    """
    todo = list(adapter.modules)
    if cache is not None:
        todo = []
        yield from _cached(cache, adapter, adapter.modules, base, projector, notes, todo)
        if not todo:
            return
    with cache.locked(on_cache_wait) if cache is not None else nullcontext():
        if cache is not None:
            missing, todo = todo, []
            yield from _cached(cache, adapter, missing, base, projector, [], todo)
            if not todo:
                return
        transpose = adapter.config.fan_in_fan_out
        jobs = _plan(adapter, base, aligned, todo)
        for job, w_base, w_aligned in _prefetch(jobs, base, aligned):
            names = (f"{base.label}:{job.base_key}", f"{aligned.label}:{job.aligned_key}")
            op = projector.operator(w_base, w_aligned, transpose=transpose, names=names)
            if cache is not None:
                cache.store(job.module.module, transpose, job.base_key, job.aligned_key, op)
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
    want = {
        "base": base.identity,
        "aligned": aligned.identity,
        "mode": settings.mode,
        "precision": settings.precision,
    }
    if settings.mode == "number":
        want["num_layers"] = str(settings.num_layers)
    else:
        want["threshold"] = json.dumps(settings.threshold)
    return all(previous.get(PROVENANCE_PREFIX + k) == v for k, v in want.items())


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
    on_cache_wait: Callable[[], None] = lambda: None,
) -> Report:
    """Run Safe LoRA on one adapter against one (base, aligned) pair; see SPEC.md.

    An in-place run holds the adapter's ``rewrite_lock`` from reading the adapter to replacing it.
    With ``cache`` (float32 runs only), operators are read from and stored in the projection cache:
    cached modules read nothing from either checkpoint, and the bytes written are identical to an
    uncached run's, since P is always computed from the same float32 operator.
    """
    if settings.dry_run or settings.output is not None:
        return _project(adapter_path, base, aligned, settings, notes, on_module, cache, on_cache_wait)
    with rewrite_lock(adapter_path):
        return _project(adapter_path, base, aligned, settings, notes, on_module, cache, on_cache_wait)


def _project(
    adapter_path: Path,
    base: Source,
    aligned: Source,
    settings: Settings,
    notes: list[str] | None,
    on_module: OnModule,
    cache: PairCache | None,
    on_cache_wait: Callable[[], None],
) -> Report:
    started = time.perf_counter()
    notes = list(notes or [])
    if cache is not None and settings.precision != "float32":
        notes.append("projection cache not used: it holds float32 operators and this run is float64")
        cache = None
    served = computed = 0
    adapter = load_adapter(adapter_path)
    notes.extend(adapter.warnings)
    base_info, aligned_info = source_info(base), source_info(aligned)

    def report(layers: list[LayerResult], tau: float | None, written: bool) -> Report:
        return Report(
            adapter=adapter_path,
            output=settings.output,
            written=written,
            dry_run=settings.dry_run,
            base=base_info,
            aligned=aligned_info,
            mode=settings.mode,
            threshold=tau,
            num_layers=settings.num_layers,
            layers=layers,
            skipped=adapter.skipped,
            seconds=time.perf_counter() - started,
            bytes_read=base.bytes_read + aligned.bytes_read,
            device=str(device),
            notes=notes + (cache.warnings if cache is not None else []),
            cache=CacheUse(cache.key, served, computed) if cache is not None else None,
            bytes_downloaded=base.bytes_downloaded + aligned.bytes_downloaded,
        )

    device = _device(settings.device)
    previous = adapter.provenance()
    if previous and not settings.force:
        if _same_run(previous, base_info, aligned_info, settings):
            notes.append("already projected with this pair and these settings: nothing to do")
            tau = adapter.provenance_value("threshold", "null", (int, float, type(None)))
            return report([], tau, False)
        pair = f"{previous.get(PROVENANCE_PREFIX + 'base')} → {previous.get(PROVENANCE_PREFIX + 'aligned')}"
        raise AlreadyProjectedError(
            f"{adapter.file}: already projected by safelora against {pair}; projecting twice shrinks the update again. "
            "Start from the original adapter, or pass --force"
        )
    if adapter.dora:
        if not settings.allow_dora:
            raise AdapterError(
                f"{adapter.file}: a DoRA adapter (lora_magnitude_vector); Safe LoRA does not define DoRA. "
                "Pass --allow-dora to project lora_B and leave the magnitudes unchanged"
            )
        notes.append("DoRA: lora_B projected, magnitude vectors left unchanged")
    if not settings.dry_run and settings.output is None:
        if adapter.file.is_symlink():
            # os.replace would swap the link for a regular file and leave its target (often a shared
            # blob, as in the Hugging Face cache) as it was: rarely what anyone meant.
            raise AdapterError(
                f"{adapter.file}: is a symbolic link, and rewriting it in place would replace the link, not "
                f"its target; pass --output DIR for a patched copy, or replace the link with a copy of {ADAPTER_FILE}"
            )
        clean_stale_temps(adapter.path)

    projector = Projector(torch.float64 if settings.precision == "float64" else torch.float32, device)
    found: dict[str, tuple[ModuleMath, bool]] = {}
    with _leave_a_core():
        for m, op, cached in _operators(adapter, base, aligned, projector, cache, notes, on_cache_wait):
            math_ = projector.apply(op, adapter.tensor(m.a_key), adapter.tensor(m.b_key), (m.a_key, m.b_key))
            found[m.module] = (math_, cached)
            served, computed = served + cached, computed + (not cached)
            if on_module is not None:
                on_module(
                    LayerResult(m.module, m.layer, math_.similarity, False, math_.reason, math_.norm_ratio, cached),
                    len(adapter.modules),
                )

    modules = adapter.modules
    results = [found[m.module][0] for m in modules]
    tau, chosen = select([r.similarity for r in results], settings.mode, settings.threshold, settings.num_layers)
    layers = [
        LayerResult(m.module, m.layer, r.similarity, c, r.reason, r.norm_ratio, found[m.module][1])
        for m, r, c in zip(modules, results, chosen, strict=True)
    ]
    if settings.dry_run:
        return report(layers, tau, False)
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
    write_adapter(adapter, replacements, provenance, settings.output, overwrite_output=settings.force)
    return report(layers, tau, True)
