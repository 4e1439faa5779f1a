"""MLX-LM's ``adapter_config.json`` read into a ``LoraConfig``, and what of it the stamp covers.

mlx-lm saves its whole training configuration there. What decides the adapter: ``fine_tune_type``
(``lora``, ``dora`` or ``full``), ``num_layers`` (LoRA layers on the last N transformer blocks; zero
or less: all of them; files from before mlx-lm renamed it say ``lora_layers``) and
``lora_parameters`` (``rank``, ``scale``, ``dropout`` and ``keys``, the module paths inside a block,
or every linear layer of a block when absent).
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ..errors import AdapterError
from ..io import safefs, strict
from .lora_config import CONFIG_FILE, LoraConfig

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_LIMIT = 16 << 20  # a config is kilobytes; a larger one is not a config
KEY_LIMIT = 4096  # lora_parameters.keys entries: a module path is tens of characters, a model has hundreds
# Keys only mlx-lm's adapter_config.json has (PEFT's has none of them): what detection looks for.
MLX_KEYS = frozenset({"fine_tune_type", "lora_parameters", "num_layers", "lora_layers"})
FIX = "restore it from your mlx-lm training run"


@dataclass(frozen=True)
class MlxConfig(LoraConfig):
    """An MLX-LM config in ``LoraConfig``'s terms (r: ``lora_parameters.rank``, target_modules: its
    keys, base_model_name_or_path: ``model``), with what mlx-lm's own fields say besides."""

    fine_tune_type: str = "lora"
    num_layers: int = -1  # > 0: the last num_layers blocks; otherwise every block
    keys: tuple[str, ...] | None = None  # None: every linear layer of a block


def config_object(data: bytes, where: Path) -> dict[str, Any]:
    """The config's bytes parsed (strict JSON) into the object a config must be."""
    try:
        raw = strict.loads(data)
    except strict.InvalidJSON as e:
        raise AdapterError(f"{where}: not valid JSON ({e}); {FIX}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}: expected a JSON object; {FIX}")
    return raw


def is_mlx_config(raw: object) -> bool:
    """Whether a parsed ``adapter_config.json`` is mlx-lm's: one of its keys and no PEFT ``peft_type``."""
    return isinstance(raw, dict) and "peft_type" not in raw and not MLX_KEYS.isdisjoint(raw)


def _int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return type(value) in (int, float)


def parse(raw: dict[str, Any], where: Path) -> MlxConfig:
    """The parsed config checked and mapped (``AdapterError`` naming the field and the fix)."""
    kind = raw.get("fine_tune_type", "lora")
    if kind == "full":
        raise AdapterError(
            f"{where}: fine_tune_type is full, so the adapter holds whole weights, not a LoRA update; Safe LoRA "
            "projects LoRA and DoRA adapters: train with --fine-tune-type lora"
        )
    if kind not in ("lora", "dora"):
        raise AdapterError(f"{where}: fine_tune_type is {_short(kind)}, expected lora, dora or full; {FIX}")
    count_key = "num_layers" if "num_layers" in raw else "lora_layers"
    count = raw.get(count_key)
    if not _int(count):
        raise AdapterError(
            f"{where}: {count_key} is {_short(count)}, expected a whole number of layers (-1: all); {FIX}"
        )
    params = raw.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterError(
            f"{where}: lora_parameters is {_short(params)}, expected an object with rank and scale; {FIX}"
        )
    rank, scale, keys = params.get("rank"), params.get("scale"), params.get("keys")
    if not (_int(rank) and rank > 0 and _number(scale)):
        raise AdapterError(
            f"{where}: lora_parameters needs rank (a positive whole number) and scale (a number), has rank "
            f"{_short(rank)} and scale {_short(scale)}; {FIX}"
        )
    if "dropout" in params and not _number(params["dropout"]):
        raise AdapterError(f"{where}: lora_parameters.dropout is {_short(params['dropout'])}, expected a number; {FIX}")
    if keys is not None and not (
        isinstance(keys, list)
        and 0 < len(keys) <= KEY_LIMIT
        and all(isinstance(k, str) and 0 < len(k) <= 256 and "" not in k.split(".") for k in keys)
    ):
        raise AdapterError(
            f"{where}: lora_parameters.keys is {_short(keys)}, expected a list of module paths inside a block "
            f"(such as self_attn.q_proj, at most {KEY_LIMIT}); {FIX}"
        )
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise AdapterError(f"{where}: model is {_short(model)}, expected the name or path of the model; {FIX}")
    key_list = None if keys is None else tuple(dict.fromkeys(keys))
    return MlxConfig(
        r=rank,
        target_modules=None if key_list is None else list(key_list),
        rank_pattern={},
        fan_in_fan_out=False,
        use_dora=kind == "dora",
        layers_to_transform=None,
        init_lora_weights=True,
        base_model_name_or_path=model or None,
        source=str(where),
        fine_tune_type=kind,
        num_layers=count,
        keys=key_list,
    )


def load_config(directory: safefs.Directory) -> tuple[MlxConfig, bytes, int]:
    """The config, the bytes it was read from and their file's mode (an ``--output`` copy writes those)."""
    where = directory.path / CONFIG_FILE
    data, st = directory.read_small(CONFIG_FILE, CONFIG_LIMIT, fix="pass an MLX-LM adapter directory")
    return parse(config_object(data, where), where), data, stat.S_IMODE(st.st_mode)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What the stamp covers of an MLX-LM config, deny-by-default: the whole parsed config with mlx-lm's
# defaults filled in (an older ``lora_layers`` read as ``num_layers``), less only the training
# settings below and ``lora_parameters.dropout``, none of which changes what the adapter does to a
# model once trained. Every other key counts, unknown ones included.
CONFIG_DEFAULTS: dict[str, object] = {"fine_tune_type": "lora", "model": None}
PARAMETER_DEFAULTS: dict[str, object] = {"keys": None}
INERT_CONFIG = frozenset(
    {
        "adapter_path",
        "batch_size",
        "clear_cache_threshold",
        "config",
        "data",
        "grad_accumulation_steps",
        "grad_checkpoint",
        "hf_dataset",
        "iters",
        "learning_rate",
        "lr_schedule",
        "mask_prompt",
        "max_seq_length",
        "optimizer",
        "optimizer_config",
        "project_name",
        "report_to",
        "resume_adapter_file",
        "save_every",
        "seed",
        "steps_per_eval",
        "steps_per_report",
        "test",
        "test_batches",
        "train",
        "val_batches",
        "wandb",
    }
)
INERT_PARAMETERS = frozenset({"dropout"})


def covered_config(data: bytes, where: Path) -> bytes:
    """The config's bytes as the stamp covers them: canonical JSON (sorted keys, no whitespace, ASCII)
    of the parsed object with the defaults filled in and the inert keys removed."""
    raw = config_object(data, where)
    if "num_layers" not in raw and "lora_layers" in raw:
        raw["num_layers"] = raw.pop("lora_layers")
    covered = {k: v for k, v in (CONFIG_DEFAULTS | raw).items() if k not in INERT_CONFIG}
    params = covered.get("lora_parameters")
    if isinstance(params, dict):
        covered["lora_parameters"] = {
            k: v for k, v in (PARAMETER_DEFAULTS | params).items() if k not in INERT_PARAMETERS
        }
    return json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
