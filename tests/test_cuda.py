"""``--device cuda``: the same results and decisions as the CPU, and the same files.

Skipped on machines without CUDA (CI has none); run them with ``pytest tests/test_cuda.py`` on a
machine with a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import reference as ref
from test_projection import TOLERANCES, random_module
from test_roundtrip import SCALE, TAU, adapter_file, expected, lora_key, project, projected_modules, rel_error
from typer.testing import Result

import safelora_cli
from safelora_cli.projection import Projector, select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

Pair = tuple[Path, Path]

SHAPES = [(64, 64, 8, False), (96, 32, 4, False), (32, 96, 16, False), (48, 80, 2, True), (80, 48, 64, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_projector_matches_reference_and_cpu(dtype: torch.dtype, weights: torch.dtype) -> None:
    """Square, tall, wide and Conv1D modules: within the reference's tolerances, and the same
    rounded similarity (hence decision, at every τ) as the CPU."""
    g = torch.Generator().manual_seed(7)
    cpu, gpu = Projector(dtype), Projector(dtype, "cuda")
    gpu_sims, cpu_sims, ref_sims = [], [], []
    for out, inp, r, fifo in SHAPES:
        w_base, w_aligned, a, b = random_module(g, out, inp, r, 3, fifo)
        w_base, w_aligned = w_base.to(weights), w_aligned.to(weights)
        c = ref.c_matrix(ref.v_matrix(w_base, w_aligned, fan_in_fan_out=fifo))
        got = gpu.compute(w_base, w_aligned, a, b, transpose=fifo)
        on_cpu = cpu.compute(w_base, w_aligned, a, b, transpose=fifo)
        assert got.similarity is not None and got.projected_b is not None
        assert got.projected_b.device.type == "cpu", "results come back to the CPU for writing"
        sim_tol, b_tol = TOLERANCES[dtype]
        assert got.similarity == pytest.approx(ref.similarity(c, a, b), abs=sim_tol)
        assert rel_error(got.projected_b, ref.projected_b(c, b)) < b_tol
        gpu_sims.append(got.similarity)
        cpu_sims.append(on_cpu.similarity)
        ref_sims.append(ref.similarity(c, a, b))
    assert [round(s, 5) for s in gpu_sims] == [round(s, 5) for s in cpu_sims]
    for tau in [round(s, 5) for s in ref_sims] + [0.0, 0.5, 1.0]:
        assert select(gpu_sims, "threshold", tau, None) == select(cpu_sims, "threshold", tau, None)


def test_cuda_run_matches_the_cpu_run(llama_pair: Pair, llama_adapter: Path, tmp_path: Path) -> None:
    """The same modules projected, and a lora_B the reference agrees with, on either device."""
    want = expected(llama_pair, llama_adapter)
    outs = {}
    for i, device in enumerate(("cpu", "cuda")):
        outs[device] = tmp_path / f"out{i}"
        report = project(llama_pair, llama_adapter, threshold=TAU, device=device, output=outs[device])
        assert report.device.startswith(device)
        assert projected_modules(report) == {m for m, e in want.items() if round(e.similarity, 5) <= TAU}
    gpu, meta = adapter_file(outs["cuda"])
    cpu, cpu_meta = adapter_file(outs["cpu"])
    # the digest covers the bytes written, and lora_B's last bits depend on the device; so do the
    # similarities' last digits in safelora.layers (the decisions do not)
    device_bound = ("safelora.digest", "safelora.layers")
    assert {k: v for k, v in meta.items() if k not in device_bound} == {
        k: v for k, v in cpu_meta.items() if k not in device_bound
    }
    layers, cpu_layers = json.loads(meta["safelora.layers"]), json.loads(cpu_meta["safelora.layers"])
    assert [(x["module"], x["projected"]) for x in layers] == [(x["module"], x["projected"]) for x in cpu_layers]
    for x, y in zip(layers, cpu_layers, strict=True):
        assert x["similarity"] == pytest.approx(y["similarity"], abs=1e-5)
    # the CUDA result is verified on the CPU by recomputation from the original
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFELORA_BACKUPS", str(tmp_path / "another-machine"))
        assert safelora_cli.check(outs["cuda"]).status == "unverified"
        verdict = safelora_cli.check(outs["cuda"], base=llama_pair[0], aligned=llama_pair[1], original=llama_adapter)
        assert verdict.ok and verdict.verified_by == "recomputation", verdict.message
    for module, e in want.items():
        b = gpu[lora_key(module, "lora_B")]
        if round(e.similarity, 5) <= TAU:
            assert rel_error(b, ref.projected_b(e.c, e.lora_b)) < 1e-4, module
            assert rel_error(b, cpu[lora_key(module, "lora_B")]) < 1e-5, module
        else:
            assert torch.equal(b, e.lora_b), module


def test_auto_picks_cuda_and_a_cached_run_gives_the_same_bytes(
    llama_pair: Pair, llama_adapter: Path, cli: Callable[..., Result], tmp_path: Path
) -> None:
    """``--device auto`` computes on the GPU; a second run served by the projection cache writes
    byte-identical files."""
    base, aligned = llama_pair
    written = []
    for run in ("cold", "warm"):
        out = tmp_path / run
        args = ["--base", base, "--aligned", aligned, "--adapter", llama_adapter, "--output", out, "--json"]
        result = cli("project", *args)
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["device"].startswith("cuda")
        assert doc["cache"]["served"] == (0 if run == "cold" else len(doc["layers"]))
        written.append((out / "adapter_model.safetensors").read_bytes())
    assert written[0] == written[1]


def test_cuda_float64_run(llama_pair: Pair, llama_adapter: Path, tmp_path: Path) -> None:
    """--precision float64 on the GPU: the merged update is the reference's to float64 accuracy."""
    want = expected(llama_pair, llama_adapter)
    report = project(
        llama_pair, llama_adapter, threshold=1.0, device="cuda", precision="float64", output=tmp_path / "out"
    )
    assert report.projected_count == len(want)
    tensors, _ = adapter_file(tmp_path / "out")
    for module, e in want.items():
        b = tensors[lora_key(module, "lora_B")].double()
        update = SCALE * b @ e.lora_a.double()
        torch.testing.assert_close(update, SCALE * ref.projected_b(e.c, e.lora_b) @ e.lora_a.double(), msg=module)
