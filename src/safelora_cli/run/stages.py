"""The threaded stages of a run: weights read and V built ahead of the module being computed."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar, cast

import torch

from ..adapters import LoraModule
from ..errors import SourceError
from ..projection import Projector, build_v
from ..sources import Source, identity


@dataclass(frozen=True)
class Job:
    """One module to read: the module and the keys of its weight in the base and aligned checkpoints."""

    module: LoraModule
    base_key: str
    aligned_key: str


_SLOTS = 2  # per stage: one item being used downstream while the next one is made

Item = TypeVar("Item")
Slot = TypeVar("Slot")
Result = TypeVar("Result")
_DONE, _STOP = object(), object()  # "no more items", "no more slots"


def on_thread(
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


def prefetch(
    jobs: list[Job], base: Source, aligned: Source, projector: Projector
) -> Iterator[tuple[Job, torch.Tensor, float]]:
    """Each job's V and ‖V‖², made two stages ahead of the consumer: one thread reads a module's
    weights while another builds the previous module's V from them and the caller uses the one
    before (I/O, conversions and matmuls drop the GIL). From a warm page cache the build costs as
    much as the reading and the products, so two threads each take a share of the cores' work.

    Each weight whose content digest the source does not know yet is hashed as it is read, from the
    bytes the reader already has, on a fourth thread (``safelora-hash``, BLAKE3 drops the GIL): a
    read buffer is reused only once its hash is done, so hashing never reads a byte twice and never
    waits on the main thread. The digests are in ``Source.digests`` when this generator ends.
    """
    size = max(max(base.nbytes(j.base_key), aligned.nbytes(j.aligned_key)) for j in jobs)
    numel = max(math.prod(base.shape(j.base_key)) for j in jobs)
    hasher = ThreadPoolExecutor(1, thread_name_prefix="safelora-hash")
    hashing: list[Future[None]] = []

    def digest_into(source: Source, name: str, t: torch.Tensor) -> None:
        source.digests[name] = identity.tensor_digest(t)

    def read(job: Job, slot: _ReadSlot) -> tuple[Job, torch.Tensor, torch.Tensor]:
        for pending in slot.hashing:  # the buffers' last weights must be hashed before they are reused
            pending.result()
        slot.hashing.clear()
        w_base = _weight(base, job.base_key, base.read(job.base_key, slot.base))
        w_aligned = _weight(aligned, job.aligned_key, aligned.read(job.aligned_key, slot.aligned))
        for source, name, t in ((base, job.base_key, w_base), (aligned, job.aligned_key, w_aligned)):
            if name not in source.digests:
                slot.hashing.append(hasher.submit(digest_into, source, name, t))
                hashing.append(slot.hashing[-1])
        return job, w_base, w_aligned

    def build(
        item: tuple[tuple[Job, torch.Tensor, torch.Tensor], Callable[[], None]], v_slot: torch.Tensor
    ) -> tuple[Job, torch.Tensor, float]:
        (job, w_base, w_aligned), release = item
        try:
            v = v_slot[: w_base.numel()].view(w_base.shape)
            names = (f"{base.label}:{job.base_key}", f"{aligned.label}:{job.aligned_key}")
            return job, v, build_v(w_base, w_aligned, v, names)
        finally:
            release()

    reads = on_thread(
        iter(jobs), read, [_ReadSlot(bytearray(size), bytearray(size)) for _ in range(_SLOTS)], "safelora-read"
    )
    built = on_thread(reads, build, [projector.workspace(numel) for _ in range(_SLOTS)], "safelora-build")
    try:
        for result, release in built:
            yield result
            release()
    finally:
        built.close()  # stops both threads when the caller stops early
        hasher.shutdown(wait=True)
    for pending in hashing:  # a hash that failed fails the run, as a failed read would
        pending.result()


@dataclass
class _ReadSlot:
    """Two read buffers, and the hashes still reading them."""

    base: bytearray
    aligned: bytearray
    hashing: list[Future[None]] = field(default_factory=list)


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
def share_cores() -> Iterator[None]:
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
