"""Run by mlx-lm's own Python (the venv ``.ci/install`` makes), never imported by the tests.

``make MODEL ADAPTER RANK SEED TYPE``: LoRA (TYPE lora) or DoRA (TYPE dora) layers put on MODEL by
mlx-lm's ``linear_to_lora_layers`` (last 3 blocks, q/k/v/o), every ``lora_b`` given seeded values
(mlx-lm starts them at zero) and every DoRA magnitude scaled by seeded factors, saved
as mlx-lm's trainer saves them (``adapters.safetensors`` from the trainable parameters,
``adapter_config.json`` by its ``save_config``).
``logits MODEL ADAPTER OUT``: MODEL with the adapter loaded by mlx-lm's ``load_adapters``, its
float32 logits for a fixed sequence written to OUT as JSON.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from mlx_lm.utils import load_model, save_config

TOKENS = [1, 5, 17, 33, 2, 64, 99, 7]
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def make(model_dir: str, adapter_dir: str, rank: str, seed: str, kind: str) -> None:
    model, _ = load_model(Path(model_dir))
    model.freeze()
    params = {"rank": int(rank), "dropout": 0.0, "scale": 2.0, "keys": KEYS}
    linear_to_lora_layers(model, 3, params, use_dora=kind == "dora")
    mx.random.seed(int(seed))
    for layer in model.layers:
        for _, module in layer.named_modules():
            if hasattr(module, "lora_b"):
                module.lora_b = mx.random.normal(module.lora_b.shape) * 0.5
            if hasattr(module, "m"):
                module.m = module.m * (1 + 0.1 * mx.random.normal(module.m.shape))
    out = Path(adapter_dir)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": kind, "model": model_dir, "num_layers": 3, "lora_parameters": params}
    save_config(config, out / "adapter_config.json")


def logits(model_dir: str, adapter_dir: str, out: str) -> None:
    model, _ = load_model(Path(model_dir))
    load_adapters(model, adapter_dir)
    y = model(mx.array([TOKENS])).astype(mx.float32)
    Path(out).write_text(json.dumps(y.tolist()))


if __name__ == "__main__":
    {"make": make, "logits": logits}[sys.argv[1]](*sys.argv[2:])
