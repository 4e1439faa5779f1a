"""Against mlx-lm itself: an adapter mlx-lm made, projected by safelora, loaded by mlx-lm, gives the
logits transformers + PEFT give with the same adapter converted to PEFT and projected there.

mlx-lm runs from a venv of its own (``.ci/install`` makes ``.venv-mlx`` with ``mlx[cpu]`` and
``mlx-lm``; ``SAFELORA_MLX_VENV`` names another), in subprocesses: these tests skip, saying why,
where it cannot run.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from support.mlx_adapters import MLX_VENV
from transformers import LlamaForCausalLM
from typer.testing import Result

Cli = Callable[..., Result]
SCRIPT = Path(__file__).parent / "support" / "mlx_reference.py"
TOKENS = [1, 5, 17, 33, 2, 64, 99, 7]  # as the script's
RANK, SCALE, LAYERS = 4, 2.0, [1, 2, 3]  # as the script makes them: the last 3 of 4 blocks
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def mlx_python() -> Path:
    python = MLX_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(
            f"mlx-lm reference not installed: no {python} (make install makes it; SAFELORA_MLX_VENV names another)"
        )
    probe = subprocess.run([python, "-c", "import mlx.core, mlx_lm"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"mlx-lm reference cannot run here: {last}")
    return python


def mlx(python: Path, *args: object) -> None:
    done = subprocess.run([python, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def mlx_logits(python: Path, model: Path, adapter: Path, out: Path) -> torch.Tensor:
    mlx(python, "logits", model, adapter, out)
    return torch.tensor(json.loads(out.read_text()))[0]


def peft_logits(model_dir: Path, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers + PEFT with LoRA A/B in PEFT's shape, keyed by module (``…q_proj.lora_A``)."""
    model = LlamaForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=RANK, lora_alpha=SCALE * RANK, target_modules=TARGETS, layers_to_transform=LAYERS)
    peft = get_peft_model(model, config)
    state = {
        f"base_model.model.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.default.weight": v for k, v in weights.items()
    }
    missing = peft.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys and not [k for k in missing.missing_keys if "lora_" in k]
    with torch.no_grad():
        return peft(torch.tensor([TOKENS])).logits[0].float()


def as_peft(mlx_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mlx-lm's lora_a (in×r) and lora_b (r×out) as PEFT's lora_A (r×in) and lora_B (out×r)."""
    return {f"{k.rsplit('.', 1)[0]}.lora_{k[-1].upper()}": v.T.contiguous() for k, v in mlx_weights.items()}


def test_mlx_lm_loads_the_projection_and_agrees_with_peft(
    mlx_python: Path, cli: Cli, llama_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base, aligned = llama_pair
    adapter = tmp_path / "mlx"
    mlx(mlx_python, "make", aligned, adapter, RANK, 0)
    original = load_file(adapter / "adapters.safetensors")
    assert len(original) == 2 * len(TARGETS) * len(LAYERS)

    # The same adapter as PEFT would save it, projected by safelora as a PEFT adapter.
    peft_dir = tmp_path / "peft"
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(aligned),
        LoraConfig(r=RANK, lora_alpha=SCALE * RANK, target_modules=TARGETS, layers_to_transform=LAYERS),
    )
    state = {
        f"base_model.model.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.default.weight": v
        for k, v in as_peft(original).items()
    }
    assert not model.load_state_dict(state, strict=False).unexpected_keys
    model.save_pretrained(peft_dir)

    pair = ["--base", base, "--aligned", aligned, "--threshold", "0.18", "--quiet"]
    assert cli("project", "--adapter", adapter, *pair).exit_code == 0
    assert cli("project", "--adapter", peft_dir, *pair).exit_code == 0
    projected = load_file(adapter / "adapters.safetensors")
    changed = [k for k in projected if not torch.equal(projected[k], original[k])]
    assert changed and all(k.endswith("lora_b") for k in changed) and len(changed) < len(projected) // 2  # some kept

    got = mlx_logits(mlx_python, aligned, adapter, tmp_path / "mlx.json")
    peft_projected = {
        k.removeprefix("base_model.model.").replace(".weight", ""): v
        for k, v in load_file(peft_dir / "adapter_model.safetensors").items()
    }
    want = peft_logits(aligned, peft_projected)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The comparison can fail: the unprojected adapter gives other logits, in mlx-lm and in PEFT.
    unprojected = peft_logits(aligned, as_peft(original))
    assert (unprojected - want).abs().max() > 1e-2
    assert cli("restore", "--adapter", adapter).exit_code == 0
    torch.testing.assert_close(
        mlx_logits(mlx_python, aligned, adapter, tmp_path / "raw.json"), unprojected, rtol=1e-4, atol=1e-4
    )
