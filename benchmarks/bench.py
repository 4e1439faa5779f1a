"""Benchmark `safelora project` on a synthetic Llama-2-7B-shaped pair (run with `make bench`).

Measures, in one run:
- end to end: wall time and peak RSS of `safelora project --dry-run --json --no-cache` in a
  subprocess, against an I/O floor (a subprocess that only reads the same targeted tensors with the
  `safetensors` library: safe_open + get_tensor, touching every page), both with a cold page cache
  (the shards evicted with posix_fadvise before each run) and a warm one (the targeted tensors read
  once first), runs alternating between the two programs;
- per module: `Projector.compute` against the official dense algorithm (C = V·Vᵀ/‖V‖_F
  materialised, float32) on the same in-memory fp16 tensors, I/O excluded, plus both results'
  distance from a float64 reference.

``--cached`` times reruns that the projection cache and its digest memo serve (no checkpoint byte
read) instead of ``--no-cache`` runs. ``--device cuda`` runs ours (both parts) on the GPU;
``--compute-only`` skips the pair and times the per-module comparison on modules generated in memory.

The pair is built once under bench-data/ (git-ignored) and reused while its marker file matches.
Untargeted tensors are holes in sparse shard files: they read as zeros, the shards have the real
sizes and layout, and the build writes only the 2 × 2 GiB that the tool reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safelora_cli.projection import ModuleMath, Projector

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTERMEDIATE, VOCAB, LAYERS, RANK = 4096, 11008, 32000, 32, 16
TARGETS = ("q_proj", "v_proj")
FP16 = 2
REAL_SHARD_BYTES = 10 * 10**9  # transformers' default max_shard_size: Llama-2-7b-hf has 2 shards
BUILD_VERSION = 1  # bump when the synthetic data changes, so old builds are rebuilt
TARGET_RATIO, TARGET_RSS, TARGET_SPEEDUP = 1.5, 1.5 * 2**30, 50.0

# The floor: what reading the targeted tensors costs with the reference library and nothing else.
# get_tensor returns a view of a memory-mapped file and reads nothing until the bytes are used, so
# the floor touches one byte of every 4 KiB page: each byte is then read from storage once, and
# never copied.
FLOOR = """
import json, sys
import torch
from safetensors import safe_open
handles, n = {}, 0
for path, name in json.loads(sys.argv[1]):
    if path not in handles:
        handles[path] = safe_open(path, framework="pt")
    t = handles[path].get_tensor(name)
    t.view(-1).view(dtype=torch.uint8)[::4096].sum()
    n += t.numel() * t.element_size()
print(n)
"""


# ---------------------------------------------------------------------------------------------
# The synthetic pair


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of Llama-2-7B (untied lm_head), in state-dict order."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{m}.weight", (HIDDEN, HIDDEN)) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return [*out, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * FP16


def shard(tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """transformers' rule: start a new shard when the next tensor would overflow this one."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        if shards[-1] and size + nbytes(shape) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    return shards


def layout(tensors: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int], int]:
    """A shard's header bytes, each tensor's file offset, and the file size.

    The safetensors library stores same-dtype tensors sorted by name; so do we, so that reads
    seek through the file the way they do in a real shard.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in sorted(tensors):
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    offsets = {name: start + info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}
    return struct.pack("<Q", len(raw)) + raw, offsets, start + offset


@dataclass(frozen=True)
class Module:
    """One targeted weight: its base and aligned fp16 values and the adapter's A and B."""

    name: str  # e.g. model.layers.3.self_attn.q_proj
    base: torch.Tensor
    aligned: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor


def synth_module(layer: int, proj: str) -> Module:
    """W_base random like a trained weight; W_aligned = W_base + a rank-8 update with a decaying
    spectrum + noise. B is random for even layers (similarity low: projected) and lies mostly in
    the update's column space for odd ones (higher: a few are kept), so both decisions occur.
    """
    g = torch.Generator().manual_seed(1000 * layer + TARGETS.index(proj))
    base = (torch.randn(HIDDEN, HIDDEN, generator=g) * 0.02).half()
    u = torch.randn(HIDDEN, 8, generator=g)
    spectrum = torch.tensor([2.0**-k for k in range(8)])
    delta = (u * spectrum) @ torch.randn(8, HIDDEN, generator=g) * 2e-3
    delta += torch.randn(HIDDEN, HIDDEN, generator=g) * 1e-3
    aligned = (base.float() + delta).half()
    lora_a = torch.randn(RANK, HIDDEN, generator=g) * 0.01
    lora_b = torch.randn(HIDDEN, RANK, generator=g) * 1e-3
    if layer % 2:
        lora_b += u @ torch.randn(8, RANK, generator=g) * 1e-2
    return Module(f"model.layers.{layer}.self_attn.{proj}", base, aligned, lora_a, lora_b)


@dataclass(frozen=True)
class Pair:
    root: Path
    layers: int

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def marker(self) -> Path:
        return self.root / "complete.json"

    def params(self) -> dict[str, int]:
        return {"version": BUILD_VERSION, "layers": self.layers}

    def shards(self) -> list[Path]:
        return sorted([*self.base.glob("model-*.safetensors"), *self.aligned.glob("model-*.safetensors")])

    def complete(self) -> bool:
        try:
            recorded = json.loads(self.marker.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        sizes = {str(p.relative_to(self.root)): p.stat().st_size for p in self.shards()}
        return bool(recorded == {**self.params(), "sizes": sizes})


def build(pair: Pair) -> None:
    """Write base, aligned (sharded + index) and the adapter; the marker goes last."""
    if pair.root.exists():
        shutil.rmtree(pair.root)
    for d in (pair.base, pair.aligned, pair.adapter):
        d.mkdir(parents=True)
    tensors = llama_tensors(pair.layers)
    total = sum(nbytes(s) for _, s in tensors)
    # Scaled with the layer count, so that a smaller build keeps the real model's 2 shards.
    shards = shard(tensors, max(REAL_SHARD_BYTES * pair.layers // LAYERS, -(-total // 2)))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    where: dict[str, tuple[str, int]] = {}
    for fname, members in zip(names, shards, strict=True):
        header, offsets, size = layout(members)
        for d in (pair.base, pair.aligned):
            with (d / fname).open("wb") as f:
                f.write(header)
                f.truncate(size)  # a sparse file: untargeted tensors stay holes, i.e. zeros
        where.update({n: (fname, off) for n, off in offsets.items()})
    index = {"metadata": {"total_size": total}, "weight_map": {n: where[n][0] for n, _ in tensors}}
    for d in (pair.base, pair.aligned):
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    adapter: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    for layer in range(pair.layers):
        for proj in TARGETS:
            m = synth_module(layer, proj)
            fname, off = where[m.name + ".weight"]
            for d, w in ((pair.base, m.base), (pair.aligned, m.aligned)):
                with (d / fname).open("r+b") as f:
                    f.seek(off)
                    f.write(w.numpy().data)
            prefix = f"base_model.model.{m.name}"
            adapter[prefix + ".lora_A.weight"] = m.lora_a
            adapter[prefix + ".lora_B.weight"] = m.lora_b
        print(f"\r  built layer {layer + 1}/{pair.layers} ({time.perf_counter() - started:.0f} s)", end="", flush=True)
    print()
    save_file(adapter, str(pair.adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "lora_dropout": 0.05,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (pair.adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    sizes = {str(p.relative_to(pair.root)): p.stat().st_size for p in pair.shards()}
    pair.marker.write_text(json.dumps({**pair.params(), "sizes": sizes}))


def choose_layers(data: Path, wanted: int) -> tuple[int, str]:
    """All 32 layers unless the disk cannot take even the sparse build (2 × 64 MiB per layer)."""
    data.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data).free
    per_layer = 2 * len(TARGETS) * nbytes((HIDDEN, HIDDEN))
    fits = int((free - 2 * 2**30) // per_layer)  # keep 2 GiB free for everyone else
    if fits >= wanted:
        return wanted, f"{wanted} layers"
    if fits < 1:
        sys.exit(f"bench: only {free / 2**30:.1f} GiB free under {data}; need about {per_layer / 2**30:.1f} GiB")
    return fits, f"{fits} layers (not {wanted}: only {free / 2**30:.1f} GiB free)"


# ---------------------------------------------------------------------------------------------
# End to end


def targeted_reads(pair: Pair) -> list[tuple[str, str]]:
    """(shard, tensor) for every weight the tool reads, in its order: per module, base then aligned."""
    out = []
    for d in (pair.base, pair.aligned):
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        out.append([(str(d / index[f"{m}.weight"]), f"{m}.weight") for m in module_names(pair.layers)])
    return [r for pair_ in zip(*out, strict=True) for r in pair_]


def module_names(layers: int) -> Iterator[str]:
    for layer in range(layers):
        for proj in TARGETS:
            yield f"model.layers.{layer}.self_attn.{proj}"


def evict(paths: list[Path]) -> None:
    """Drop the shards from the page cache (no root needed: clean pages of our own files)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a fresh build) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Child:
    wall: float
    max_rss: int  # bytes
    stdout: str


def run_child(argv: list[str]) -> Child:
    """Run a program; its own peak RSS comes from wait4, not from RUSAGE_CHILDREN's running max."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            sys.exit(f"bench: {argv[:3]} failed ({proc.returncode}):\n{err.read().decode(errors='replace')[-2000:]}")
        out.seek(0)
        return Child(wall, usage.ru_maxrss * 1024, out.read().decode())


def end_to_end(pair: Pair, repeats: int, device: str, cached: bool = False) -> dict[str, Any]:
    ours_argv = [
        sys.executable,
        "-m",
        "safelora_cli",
        "project",
        "--base",
        str(pair.base),
        "--aligned",
        str(pair.aligned),
        "--adapter",
        str(pair.adapter),
        "--dry-run",
        "--json",
        "--device",
        device,
        "--no-cache",  # the streamed computation is what is measured, not the projection cache
    ]
    if cached:  # --cached: a rerun the projection cache (and its digest memo) serves, in a fresh cache
        ours_argv.remove("--no-cache")
        os.environ["SAFELORA_CACHE"] = tempfile.mkdtemp(prefix="safelora-bench-cache-")
        run_child(ours_argv)  # fills it
    floor_argv = [sys.executable, "-c", FLOOR, json.dumps(targeted_reads(pair))]
    results: dict[str, Any] = {}
    for cache in ("cold", "warm"):
        if cache == "warm":
            run_child(floor_argv)  # brings every targeted tensor into the page cache
        runs: dict[str, list[Child]] = {"ours": [], "floor": []}
        for _ in range(repeats):
            for who, argv in (("floor", floor_argv), ("ours", ours_argv)):
                if cache == "cold":
                    evict(pair.shards())
                runs[who].append(run_child(argv))
        report = json.loads(runs["ours"][-1].stdout)
        floor_bytes = int(runs["floor"][-1].stdout)
        wall = statistics.median(c.wall for c in runs["ours"])
        floor = statistics.median(c.wall for c in runs["floor"])
        results[cache] = {
            "wall_s": wall,
            "floor_s": floor,
            "ratio": wall / floor,
            "walls_s": [c.wall for c in runs["ours"]],
            "floor_walls_s": [c.wall for c in runs["floor"]],
            "peak_rss_bytes": max(c.max_rss for c in runs["ours"]),
            "floor_peak_rss_bytes": max(c.max_rss for c in runs["floor"]),
            "bytes_read": report["bytes_read"],
            "floor_bytes_read": floor_bytes,
            "in_process_s": report["seconds"],
            "modules": report["layer_count"],
            "projected": report["projected_count"],
        }
    if cached:
        shutil.rmtree(os.environ.pop("SAFELORA_CACHE"))
    return results


# ---------------------------------------------------------------------------------------------
# Compute per module


def dense(m: Module) -> tuple[float, torch.Tensor]:
    """The official algorithm (IBM/SafeLoRA) in float32: C materialised, then C·B, (C·B)·A, B·A."""
    v = m.aligned.float() - m.base.float()
    c = v @ v.T / torch.linalg.matrix_norm(v)
    w = c @ m.lora_b
    sim = torch.nn.functional.cosine_similarity((w @ m.lora_a).reshape(1, -1), (m.lora_b @ m.lora_a).reshape(1, -1))
    return float(sim), w


def reference(m: Module) -> tuple[float, torch.Tensor]:
    """float64, factored (exact algebra, no out×out matrix): the yardstick for both."""
    v = m.aligned.double() - m.base.double()
    a, b = m.lora_a.double(), m.lora_b.double()
    p = v @ (v.T @ b) / torch.linalg.matrix_norm(v)
    pa, ba = p @ a, b @ a
    return float((pa * ba).sum() / (pa.norm() * ba.norm())), p


def dense_flops(out: int, inp: int, r: int) -> int:
    """V·Vᵀ, C·B, (C·B)·A and B·A."""
    return 2 * out * out * inp + 2 * out * out * r + 2 * 2 * out * r * inp


def ours_flops(out: int, inp: int, r: int) -> int:
    """Vᵀ·B, V·(Vᵀ·B) and the three r×r products (A·Aᵀ is r·in·r)."""
    return 2 * 2 * out * inp * r + 3 * 2 * out * r * r + 2 * r * inp * r


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float  # process CPU time, all threads: the compute spent, whatever else the machine runs


def timed(f: Callable[..., T], *args: Any, sync: bool = False) -> tuple[Timing, T]:
    """``sync``: wait for the GPU's queued work before reading the clocks."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = f(*args)
    if sync:
        torch.cuda.synchronize()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), out


def best_ms(ts: list[Timing]) -> dict[str, float]:
    """The fastest run's times: on a shared machine a run is only ever slowed down, so the fastest is
    the closest to what an algorithm costs (the dense product's median drifted by 2× here)."""
    return {"wall_ms": min(t.wall for t in ts) * 1e3, "cpu_ms": min(t.cpu for t in ts) * 1e3}


def read_modules(pair: Pair, n_modules: int) -> list[Module]:
    """The first ``n_modules`` targeted modules of the built pair, in memory."""
    reads = targeted_reads(pair)[: 2 * n_modules]
    with safe_open(str(pair.adapter / "adapter_model.safetensors"), framework="pt") as f:
        lora = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    modules = []
    for (base_path, key), (aligned_path, _) in zip(reads[::2], reads[1::2], strict=True):
        with safe_open(base_path, framework="pt") as fb, safe_open(aligned_path, framework="pt") as fa:
            name = key.removesuffix(".weight")
            prefix = f"base_model.model.{name}"
            # clone(): get_tensor maps the file lazily, and I/O must stay out of the timings
            modules.append(
                Module(
                    name,
                    fb.get_tensor(key).clone(),
                    fa.get_tensor(key).clone(),
                    lora[prefix + ".lora_A.weight"],
                    lora[prefix + ".lora_B.weight"],
                )
            )
    return modules


def compute(modules: list[Module], n_dense: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Both algorithms on the same tensors, moved to ``device`` before any timing.

    On the CPU ours runs on all threads, as the dense algorithm does, and on one fewer, as the
    pipeline computes beside its prefetch thread.
    """
    sync = device.type == "cuda"
    modules = [Module(m.name, *(t.to(device) for t in (m.base, m.aligned, m.lora_a, m.lora_b))) for m in modules]
    threads = torch.get_num_threads()
    counts = sorted({threads, max(1, threads - 1)}, reverse=True) if device.type == "cpu" else [threads]
    projector = Projector(device=device)
    ours_times: dict[int, list[Timing]] = {}
    ours: list[ModuleMath] = []
    first = modules[0]
    for n in counts:
        torch.set_num_threads(n)
        timed(projector.compute, first.base, first.aligned, first.lora_a, first.lora_b, sync=sync)  # warm-up
        ours_times[n] = []
        for _ in range(repeats):
            ours.clear()
            for m in modules:
                t, out = timed(projector.compute, m.base, m.aligned, m.lora_a, m.lora_b, sync=sync)
                ours_times[n].append(t)
                ours.append(out)
    torch.set_num_threads(threads)
    if sync:
        timed(dense, first, sync=sync)  # warm-up: cuBLAS picks its kernels on the first call
    dense_times: list[Timing] = []
    dense_out: list[tuple[float, torch.Tensor]] = []
    for m in modules[:n_dense]:
        for _ in range(repeats):
            t, d = timed(dense, m, sync=sync)
            dense_times.append(t)
        dense_out.append(d)

    sim_err = b_err = dense_sim_err = 0.0
    same_decisions = True
    for i, m in enumerate(modules):
        ref_sim, ref_p = reference(m)
        got = ours[i]
        assert got.similarity is not None and got.projected_b is not None
        sim_err = max(sim_err, abs(got.similarity - ref_sim))
        b_err = max(b_err, float((got.projected_b.double() - ref_p.cpu()).norm() / ref_p.norm()))
        if i < n_dense:
            dense_sim_err = max(dense_sim_err, abs(dense_out[i][0] - ref_sim))
            same_decisions &= (round(dense_out[i][0], 5) <= 0.5) == (round(got.similarity, 5) <= 0.5)
    ours_ms = {n: best_ms(ts) for n, ts in ours_times.items()}
    dense_ms = best_ms(dense_times)
    pipeline_threads = counts[-1]
    return {
        "device": torch.cuda.get_device_name(device) if sync else "cpu",
        "modules": len(modules),
        "dense_modules": n_dense,
        "repeats": repeats,
        "shape": [HIDDEN, HIDDEN],
        "rank": RANK,
        "threads": threads,
        "pipeline_threads": pipeline_threads,
        "dense": dense_ms,
        "ours": ours_ms,
        "speedup_wall_same_threads": dense_ms["wall_ms"] / ours_ms[threads]["wall_ms"],
        "speedup_wall_as_pipeline": dense_ms["wall_ms"] / ours_ms[pipeline_threads]["wall_ms"],
        "speedup_cpu": dense_ms["cpu_ms"] / ours_ms[pipeline_threads]["cpu_ms"],
        "flops_ratio": dense_flops(HIDDEN, HIDDEN, RANK) / ours_flops(HIDDEN, HIDDEN, RANK),
        "ours_max_abs_sim_err": sim_err,
        "ours_max_rel_b_err": b_err,
        "dense_max_abs_sim_err": dense_sim_err,
        "same_decisions_at_0.5": same_decisions,
    }


# ---------------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_compute(comp: dict[str, Any]) -> None:
    gpu = comp["device"] != "cpu"
    print(
        f"compute per {HIDDEN}×{HIDDEN} fp16 module, r={RANK}, I/O excluded, on {comp['device']} "
        f"(best of {comp['repeats']} runs{'' if gpu else '; CPU = all threads’ time'}):"
    )
    rows = [(f"dense, {comp['threads']} threads", comp["dense"])]
    rows += [(f"ours, {n} thread{'s' * (n > 1)}", ms) for n, ms in comp["ours"].items()]
    for label, ms in rows if not gpu else [("dense", comp["dense"]), ("ours", comp["ours"][comp["threads"]])]:
        print(f"  {label:<20}{ms['wall_ms']:>9.2f} ms wall" + ("" if gpu else f"{ms['cpu_ms']:>9.1f} ms CPU"))
    if gpu:
        speedup = comp["speedup_wall_same_threads"]
        ok = speedup >= TARGET_SPEEDUP
        print(f"  less compute (GPU time): {speedup:.0f}×   ≥ {TARGET_SPEEDUP:.0f}×: {verdict(ok)}")
    else:
        ok = comp["speedup_cpu"] >= TARGET_SPEEDUP
        print(
            f"  less compute (CPU time, ours on {comp['pipeline_threads']} thread as the pipeline runs it): "
            f"{comp['speedup_cpu']:.0f}×   ≥ {TARGET_SPEEDUP:.0f}×: {verdict(ok)}"
        )
        print(
            f"  wall speedup: {comp['speedup_wall_same_threads']:.0f}× on {comp['threads']} threads each, "
            f"{comp['speedup_wall_as_pipeline']:.0f}× with ours on {comp['pipeline_threads']}"
        )
    print(f"  flops: {comp['flops_ratio']:.0f}× fewer (counted from the shapes)")
    print(
        f"vs float64 reference: ours |Δsim| ≤ {comp['ours_max_abs_sim_err']:.1e}, "
        f"‖ΔB‖/‖B‖ ≤ {comp['ours_max_rel_b_err']:.1e}; dense |Δsim| ≤ {comp['dense_max_abs_sim_err']:.1e}; "
        f"same decisions at τ = 0.5: {comp['same_decisions_at_0.5']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "bench-data", help="where the pair is built and kept")
    ap.add_argument("--layers", type=int, default=LAYERS, help="transformer blocks (default: 32, as Llama-2-7B)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each program per cache state (median)")
    ap.add_argument("--modules", type=int, default=8, help="modules timed for ours, per repeat")
    ap.add_argument("--dense-modules", type=int, default=2, help="modules timed for the dense algorithm")
    ap.add_argument(
        "--compute-only",
        action="store_true",
        help="only the per-module comparison, on modules generated in memory (no pair is built)",
    )
    ap.add_argument("--device", default="cpu", help="where ours (and the per-module comparison) computes: cpu or cuda")
    ap.add_argument(
        "--cached",
        action="store_true",
        help="time reruns the projection cache serves (filled by a first run in a fresh cache), not --no-cache runs",
    )
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.compute_only:
        n = min(args.modules, 2 * args.layers)
        modules = [synth_module(i // 2, TARGETS[i % 2]) for i in range(n)]
        print_compute(compute(modules, min(args.dense_modules, n), args.repeats, device))
        return

    layers, why = choose_layers(args.data, args.layers)
    pair = Pair(args.data / f"llama2-7b-synth-{layers}l", layers)
    if pair.complete():
        print(f"reusing {pair.root} ({why})")
    else:
        print(f"building {pair.root} ({why}); reused by later runs")
        build_s, _ = timed(build, pair)
        print(f"  built in {build_s.wall:.0f} s")
    load_before = os.getloadavg()[0]
    e2e = end_to_end(pair, args.repeats, args.device, args.cached)
    n = min(args.modules, 2 * layers)
    comp = compute(read_modules(pair, n), min(args.dense_modules, n), args.repeats, device)
    load_after = os.getloadavg()[0]

    reads = targeted_reads(pair)
    shard_sizes = [p.stat().st_size for p in pair.shards()]
    targeted = sum(2 * nbytes((HIDDEN, HIDDEN)) for _ in module_names(layers))
    model_bytes = sum(shard_sizes) // 2
    figures = {
        "layers": layers,
        "layers_note": why,
        "model_bytes": model_bytes,
        "shards_per_model": len(shard_sizes) // 2,
        "targeted_tensors": len(reads),
        "targeted_bytes": targeted,
        "end_to_end": e2e,
        "compute": comp,
        "machine": {
            "cpus": os.cpu_count(),
            "device": args.device,
            "torch": torch.__version__,
            "load_avg": [load_before, load_after],
        },
        "targets": {"wall_over_floor": TARGET_RATIO, "peak_rss_bytes": TARGET_RSS, "compute_speedup": TARGET_SPEEDUP},
    }
    out = args.data / "last.json"
    out.write_text(json.dumps(figures, indent=2))

    print(
        f"\nLlama-2-7B-shaped fp16 pair: {layers} layers, {len(shard_sizes) // 2} shards, "
        f"{gib(model_bytes)} per model; adapter r={RANK} on {', '.join(TARGETS)} ({2 * layers} modules)"
    )
    print(f"targeted: {len(reads)} tensors, {gib(targeted)} of {gib(2 * model_bytes)} in both models")
    print(
        f"{os.cpu_count()} CPUs, ours on --device {args.device}, torch {torch.__version__}, "
        f"load average {load_before:.2f} → {load_after:.2f}\n"
    )
    print(f"{'page cache':<12}{'ours (s)':>10}{'floor (s)':>11}{'ratio':>8}{'peak RSS':>12}{'bytes read':>16}")
    for cache, r in e2e.items():
        ok = r["ratio"] <= TARGET_RATIO
        print(
            f"{cache:<12}{r['wall_s']:>10.2f}{r['floor_s']:>11.2f}{r['ratio']:>8.2f}{gib(r['peak_rss_bytes']):>12}"
            f"{r['bytes_read']:>16,}   ratio ≤ {TARGET_RATIO}: {verdict(ok)}"
        )
    print(
        f"{'':<12}floor peak RSS {gib(max(r['floor_peak_rss_bytes'] for r in e2e.values()))} (mmap pages); "
        f"bytes read = targeted bytes: {all(r['bytes_read'] == targeted for r in e2e.values())}"
    )
    rss = max(r["peak_rss_bytes"] for r in e2e.values())
    print(f"peak RSS ≤ {gib(TARGET_RSS)}: {verdict(rss <= TARGET_RSS)}\n")
    print_compute(comp)
    print(f"\nfigures written to {out}")


if __name__ == "__main__":
    main()
