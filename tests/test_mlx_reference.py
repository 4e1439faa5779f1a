"""Against mlx-lm itself: a LoRA or DoRA adapter mlx-lm made, projected by safelora, loaded by mlx-lm,
gives the logits transformers + PEFT give with the same adapter saved as PEFT's and projected there;
restored, the logits of the adapter as trained.

mlx-lm runs from a venv of its own (``.ci/install`` makes ``.venv-mlx`` with ``mlx[cpu]`` and
``mlx-lm``; ``SAFELORA_MLX_VENV`` names another), in subprocesses: these tests skip, saying why,
where it cannot run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
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


def peft_logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    """transformers + PEFT (its own loader) with the adapter saved at ``adapter``."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), adapter)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float()


def save_as_peft(model_dir: Path, mlx_weights: dict[str, torch.Tensor], out: Path, dora: bool) -> None:
    """The mlx-lm adapter as PEFT saves it: lora_A = lora_aᵀ (r×in), lora_B = lora_bᵀ (out×r), the
    DoRA magnitudes ``m`` as ``lora_magnitude_vector``."""
    config = LoraConfig(
        r=RANK, lora_alpha=SCALE * RANK, target_modules=TARGETS, layers_to_transform=LAYERS, use_dora=dora
    )
    model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), config)
    parts = {"lora_a": "lora_A", "lora_b": "lora_B", "m": "lora_magnitude_vector"}
    state = {}
    for key, value in mlx_weights.items():
        module, part = key.rsplit(".", 1)
        state[f"base_model.model.{module}.{parts[part]}.default.weight"] = value if part == "m" else value.T
    loaded = model.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    model.save_pretrained(out)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_lm_loads_the_projection_and_agrees_with_peft(
    mlx_python: Path, cli: Cli, llama_pair: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    base, aligned = llama_pair
    adapter = tmp_path / "mlx"
    mlx(mlx_python, "make", aligned, adapter, RANK, 0, kind)
    original = load_file(adapter / "adapters.safetensors")
    per_module = 3 if kind == "dora" else 2
    assert len(original) == per_module * len(TARGETS) * len(LAYERS)

    # The same adapter as PEFT saves it, unprojected and projected by safelora as a PEFT adapter.
    save_as_peft(aligned, original, tmp_path / "peft-original", kind == "dora")
    peft_dir = Path(shutil.copytree(tmp_path / "peft-original", tmp_path / "peft"))
    pair = ["--base", base, "--aligned", aligned, "--threshold", "0.18", "--allow-dora", "--quiet"]
    assert cli("project", "--adapter", adapter, *pair).exit_code == 0
    assert cli("project", "--adapter", peft_dir, *pair).exit_code == 0
    projected = load_file(adapter / "adapters.safetensors")
    changed = [k for k in projected if not torch.equal(projected[k], original[k])]
    assert changed and all(k.endswith("lora_b") for k in changed) and len(changed) < len(TARGETS) * len(LAYERS)

    got = mlx_logits(mlx_python, aligned, adapter, tmp_path / "mlx.json")
    want = peft_logits(aligned, peft_dir)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The comparison can fail: the unprojected adapter's logits differ by ten times its tolerance and
    # more (the tiny model's logits are about 0.1; DoRA's normalisation damps the change).
    unprojected = peft_logits(aligned, tmp_path / "peft-original")
    assert (unprojected - want).abs().max() > 1e-3
    assert cli("restore", "--adapter", adapter).exit_code == 0
    restored = mlx_logits(mlx_python, aligned, adapter, tmp_path / "raw.json")
    torch.testing.assert_close(restored, unprojected, rtol=1e-4, atol=1e-4)
