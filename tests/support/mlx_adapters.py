"""MLX-LM adapters for the tests, written as mlx-lm lays them out (no mlx needed), and mlx-lm itself
run from a venv of its own when one was installed (``.ci/install``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

# mlx-lm's venv: MLX_VENV, else the one .ci/install makes beside the project's (.venv-mlx).
MLX_VENV = Path(os.environ.get("SAFELORA_MLX_VENV", Path(__file__).resolve().parents[2] / ".venv-mlx"))


def mlx_config(**overrides: Any) -> dict[str, Any]:
    """An adapter_config.json as mlx-lm's lora command saves it (training settings included)."""
    config: dict[str, Any] = {
        "adapter_path": "adapters",
        "batch_size": 4,
        "data": "data",
        "fine_tune_type": "lora",
        "iters": 100,
        "learning_rate": 1e-05,
        "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 2.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
        "model": "base",
        "num_layers": -1,
        "seed": 0,
        "train": True,
    }
    config.update(overrides)
    return config


def mlx_from_peft(peft_dir: Path, out_dir: Path, **overrides: Any) -> Path:
    """The MLX-LM adapter equivalent to a PEFT one: each lora_A (r×in) saved as ``lora_a`` (in×r), each
    lora_B (out×r) as ``lora_b`` (r×out), under the module's own name; metadata as mlx saves it."""
    out_dir.mkdir(parents=True)
    tensors = {}
    for key, t in load_file(peft_dir / "adapter_model.safetensors").items():
        module, part = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        tensors[f"{module}.{part.lower()}"] = t.T.contiguous()
    save_file(tensors, out_dir / "adapters.safetensors", metadata={"format": "mlx"})
    write_config(out_dir, mlx_config(**overrides))
    return out_dir


def write_config(adapter: Path, config: dict[str, Any]) -> None:
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=4))
