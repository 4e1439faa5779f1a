"""Real PEFT round trips: project a real adapter, load it with PEFT, check what the model becomes."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support import reference as ref
from support.run import project_adapter
from transformers import LlamaForCausalLM
from typer.testing import Result

from safelora_cli import __version__
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.api import Report
from safelora_cli.results import Settings
from safelora_cli.sources import open_local

Pair = tuple[Path, Path]
SCALE = 16 / 8  # the fixture adapter's lora_alpha / r
# At τ = 0.2 the fixture adapter has modules on both sides (a guard in each test checks it).
TAU = 0.2


@dataclass(frozen=True)
class Expected:
    """The reference's view of one module of the original adapter."""

    similarity: float
    c: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor


def checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def adapter_file(adapter: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors and its safetensors metadata."""
    with safe_open(adapter / ADAPTER_FILE, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open is no dict)


def lora_key(module: str, part: str) -> str:
    return f"base_model.model.{module}.{part}.weight"


def expected(pair: Pair, adapter: Path) -> dict[str, Expected]:
    """Reference similarity and C for every module of ``adapter``, by module name."""
    base, aligned = (checkpoint(d) for d in pair)
    tensors, _ = adapter_file(adapter)
    out = {}
    for key in sorted(tensors):
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            c = ref.c_matrix(ref.v_matrix(base[f"{module}.weight"], aligned[f"{module}.weight"]))
            a, b = tensors[key], tensors[lora_key(module, "lora_B")]
            out[module] = Expected(ref.similarity(c, a, b), c, a, b)
    return out


def project(pair: Pair, adapter: Path, **settings: Any) -> Report:
    with closing(open_local(pair[0])) as base, closing(open_local(pair[1])) as aligned:
        return project_adapter(adapter, base, aligned, Settings(**settings))


def projected_modules(report: Report) -> set[str]:
    return {layer.module for layer in report.layers if layer.projected}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖_F / ‖want‖_F in float64."""
    want = want.double()
    return float((got.double() - want).norm() / want.norm())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_merged_model_is_aligned_plus_projected_update(llama_pair: Pair, adapter_dir: Path, tmp_path: Path) -> None:
    """The user's view: PEFT loads the output on the aligned model, and merging gives
    W + s·C·B·A for projected modules and W + s·B·A for the others."""
    want = expected(llama_pair, adapter_dir)
    source = snapshot(adapter_dir)
    out = tmp_path / "safe"

    report = project(llama_pair, adapter_dir, threshold=TAU, output=out)

    assert report.written and report.output == out
    projected = projected_modules(report)
    assert projected == {m for m, e in want.items() if round(e.similarity, 5) <= TAU}
    assert 0 < len(projected) < len(want), "fixture should have modules on both sides of τ"
    assert snapshot(adapter_dir) == source, "--output must leave the source byte-identical"
    assert {p.name for p in out.iterdir()} == set(source), "the output is a complete adapter directory"

    aligned = checkpoint(llama_pair[1])
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_pair[1]), out)
    merged = model.merge_and_unload().state_dict()
    assert set(merged) == set(aligned)
    for name, w in aligned.items():
        module = name.removesuffix(".weight")
        if module not in want:
            assert torch.equal(merged[name], w), name
            continue
        e = want[module]
        b = e.c @ e.lora_b.double() if module in projected else e.lora_b.double()
        update = SCALE * b @ e.lora_a.double()
        assert update.abs().max() > 1e-3, "the update must dwarf the tolerance below"
        torch.testing.assert_close(merged[name].double(), w.double() + update, rtol=0, atol=1e-6, msg=module)


def test_threshold_mode_in_place(llama_pair: Pair, adapter_dir: Path) -> None:
    """lora_B ← C·B exactly where round(sim, 5) ≤ τ; every other tensor keeps its bits."""
    want = expected(llama_pair, adapter_dir)
    before, before_meta = adapter_file(adapter_dir)

    report = project(llama_pair, adapter_dir, threshold=TAU)

    assert (report.mode, report.threshold, report.written, report.output) == ("threshold", TAU, True, None)
    assert [layer.module for layer in report.layers] == sorted(want, key=lambda m: (int(m.split(".")[2]), m))
    for layer in report.layers:
        assert layer.similarity == pytest.approx(want[layer.module].similarity, abs=1e-5)
    # Selection from the similarities the run computed: float32 and the float64 reference may round
    # a similarity on either side of a 5th decimal, and that is no error (tests/test_projection.py).
    chosen = ref.select_threshold([layer.similarity for layer in report.layers], TAU)
    assert [layer.projected for layer in report.layers] == chosen
    assert 0 < sum(chosen) < len(chosen), "fixture should have modules on both sides of τ"

    after, meta = adapter_file(adapter_dir)
    assert after.keys() == before.keys()
    projected = projected_modules(report)
    for key, t in after.items():
        module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        if key.endswith(".lora_B.weight") and module in projected:
            assert t.dtype == before[key].dtype and t.shape == before[key].shape
            assert rel_error(t, ref.projected_b(want[module].c, before[key])) < 1e-5, key
        else:
            assert same_bits(t, before[key]), key

    assert meta["format"] == "pt" == before_meta["format"]
    assert meta["safelora.version"] == __version__
    # Named by content and the directory's base name: nothing of this machine (issue 18).
    assert meta["safelora.base"] == f"{llama_pair[0].name}@blake3:{report.base.content[:16]}"
    assert meta["safelora.aligned"] == f"{llama_pair[1].name}@blake3:{report.aligned.content[:16]}"
    assert json.loads(meta["safelora.base_tensors"]) == report.base.tensors
    assert len(report.base.tensors) == len(report.layers)
    assert meta["safelora.mode"] == "threshold"
    assert float(meta["safelora.threshold"]) == TAU
    assert json.loads(meta["safelora.projected"]) == [layer.module for layer in report.layers if layer.projected]


def test_number_mode_projects_the_k_lowest(llama_pair: Pair, adapter_dir: Path) -> None:
    want = expected(llama_pair, adapter_dir)
    report = project(llama_pair, adapter_dir, mode="number", num_layers=3)

    for layer in report.layers:
        assert layer.similarity == pytest.approx(want[layer.module].similarity, abs=1e-5)
    tau_k, chosen = ref.select_number([layer.similarity for layer in report.layers], 3)
    assert report.threshold == tau_k
    assert [layer.projected for layer in report.layers] == chosen
    assert sum(chosen) == 3
    _, meta = adapter_file(adapter_dir)
    assert (meta["safelora.mode"], meta["safelora.num_layers"]) == ("number", "3")


def test_number_mode_projects_every_module_tied_at_tau_k(llama_pair: Pair, llama_adapter: Path, tmp_path: Path) -> None:
    """Give layer 1's q_proj the weights and LoRA of layer 0's: equal similarities, both selected."""
    src, dst = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    pair = []
    for directory in llama_pair:
        weights = checkpoint(directory)
        weights[f"{dst}.weight"] = weights[f"{src}.weight"].clone()
        (tmp_path / directory.name).mkdir()
        save_file(weights, tmp_path / directory.name / "model.safetensors", metadata={"format": "pt"})
        pair.append(tmp_path / directory.name)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((llama_adapter / "adapter_config.json").read_bytes())
    tensors, meta = adapter_file(llama_adapter)
    for part in ("lora_A", "lora_B"):
        tensors[lora_key(dst, part)] = tensors[lora_key(src, part)].clone()
    save_file(tensors, adapter / ADAPTER_FILE, metadata=meta)

    dry = project((pair[0], pair[1]), adapter, dry_run=True)
    sims = {layer.module: layer.similarity for layer in dry.layers}
    assert sims[src] == sims[dst]
    assert sims[src] is not None
    k = 1 + sum(round(s, 5) < round(sims[src], 5) for s in sims.values() if s is not None)

    report = project((pair[0], pair[1]), adapter, mode="number", num_layers=k)

    assert report.threshold == round(sims[src], 5)
    assert report.projected_count == k + 1
    assert {src, dst} <= projected_modules(report)


def test_dry_run_reports_and_writes_nothing(llama_pair: Pair, adapter_dir: Path) -> None:
    stale = adapter_dir / f".{ADAPTER_FILE}.safelora-tmp-999999999-x"  # a dry run cleans nothing either
    stale.write_bytes(b"")
    before = snapshot(adapter_dir)

    report = project(llama_pair, adapter_dir, threshold=TAU, dry_run=True)

    assert report.dry_run and not report.written
    assert 0 < report.projected_count < len(report.layers)
    assert snapshot(adapter_dir) == before


def test_projected_lora_b_keeps_a_half_precision_dtype(llama_pair: Pair, adapter_dir: Path) -> None:
    """A bf16 adapter stays bf16: the math runs in float32 and the result is cast back once."""
    tensors, meta = adapter_file(adapter_dir)
    save_file({k: t.bfloat16() for k, t in tensors.items()}, adapter_dir / ADAPTER_FILE, metadata=meta)
    before, _ = adapter_file(adapter_dir)
    want = expected(llama_pair, adapter_dir)

    report = project(llama_pair, adapter_dir, threshold=1.0)

    assert report.projected_count == len(want)
    after, _ = adapter_file(adapter_dir)
    for module, e in want.items():
        assert same_bits(after[lora_key(module, "lora_A")], before[lora_key(module, "lora_A")])
        new_b = after[lora_key(module, "lora_B")]
        assert new_b.dtype == torch.bfloat16
        torch.testing.assert_close(new_b, ref.projected_b(e.c, e.lora_b).bfloat16(), msg=module)


def test_projecting_twice_without_a_backup(
    llama_pair: Pair, adapter_dir: Path, cli: Callable[..., Result], tmp_path: Path
) -> None:
    """The double-projection bug, where no original was kept: the same pair and settings again are
    a no-op, anything else is refused, and --force really projects the projected adapter again.
    (With a backup, another run starts from the original: tests/test_backups.py.)"""
    base, aligned = llama_pair
    args = ("project", "--base", base, "--aligned", aligned, "--adapter", adapter_dir, "--threshold", TAU)
    assert cli(*args, "--no-backup").exit_code == 0
    once = (adapter_dir / ADAPTER_FILE).read_bytes()

    again = cli(*args, "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["written"] is False
    assert "nothing to do" in again.stderr
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == once

    for other in (("--threshold", 0.3), ("--num-layers", 2), ("--precision", "float64")):
        refused = cli(*args[:-2], *other)
        assert refused.exit_code == 1, other
        assert "already projected" in refused.stderr and "no backup of its original" in refused.stderr
        assert (adapter_dir / ADAPTER_FILE).read_bytes() == once

    want = expected(llama_pair, adapter_dir)  # the once-projected adapter is now the input
    forced = cli(*args[:-2], "--threshold", 1.0, "--force", "--json")
    assert forced.exit_code == 0
    doc = json.loads(forced.stdout)
    assert doc["written"] is True and doc["projected_count"] == doc["layer_count"] == len(want)
    tensors, _ = adapter_file(adapter_dir)
    for layer in doc["layers"]:
        e = want[layer["module"]]
        b = ref.projected_b(e.c, e.lora_b) if layer["projected"] else e.lora_b.double()
        assert rel_error(tensors[lora_key(layer["module"], "lora_B")], b) < 1e-5, layer["module"]
