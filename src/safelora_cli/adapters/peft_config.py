"""PEFT's files: ``adapter_config.json`` read into a ``LoraConfig``, and the weights file's keys into modules."""

from __future__ import annotations

import json
import os
import re
import stat
from io import BufferedReader
from pathlib import Path
from typing import Any

from ..errors import AdapterError
from ..io import safefs, stfile, strict
from .base import LoraModule, Weights
from .lora_config import CONFIG_FILE, PEFT_PREFIX, LoraConfig
from .patterns import show

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_LIMIT = 16 << 20  # adapter_config.json is kilobytes; a larger one is not a config

# module path, lora_A|lora_B, optional adapter name (older files: ``lora_A.default.weight``)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")
MODULES_TO_SAVE = "modules_to_save weight: passed through"
_SKIP_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$"), "DoRA magnitude vector: left unchanged"),
    (
        re.compile(r"\.lora_embedding_[AB](\.[^.]+)?$"),
        "embedding LoRA: not defined by Safe LoRA, passed through",
    ),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "lora_B bias: not defined by Safe LoRA, passed through"),
    (
        re.compile(r"trainable_tokens_delta"),
        "trainable-token delta: not defined by Safe LoRA, passed through",
    ),
    (re.compile(r"modules_to_save"), MODULES_TO_SAVE),
)


def _config_object(data: bytes, where: Path) -> dict[str, Any]:
    """``adapter_config.json``'s bytes parsed (strict JSON) into the object a config must be."""
    try:
        raw = strict.loads(data)
    except strict.InvalidJSON as e:
        raise AdapterError(f"{where}: not valid JSON ({e}); restore it from your training run") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}: expected a JSON object")
    return raw


def load_config(directory: safefs.Directory) -> tuple[LoraConfig, bytes, int]:
    """The config, the bytes it was read from and their file's mode (an ``--output`` copy writes those)."""
    cfg_path = directory.path / CONFIG_FILE
    data, st = directory.read_small(CONFIG_FILE, CONFIG_LIMIT, fix="pass a PEFT adapter directory")
    mode = stat.S_IMODE(st.st_mode)
    raw = _config_object(data, cfg_path)
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; Safe LoRA applies to LoRA adapters only")
    _check_types(cfg_path, raw)
    r = raw.get("r")
    rank_pattern = raw.get("rank_pattern") or {}
    target = raw.get("target_modules")
    layers = raw.get("layers_to_transform")
    to_save = raw.get("modules_to_save") or []
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not (
        type(r) is int
        and r > 0
        and isinstance(rank_pattern, dict)
        and all(type(v) is int and v > 0 for v in rank_pattern.values())
        and (
            target is None
            or isinstance(target, str)
            or (isinstance(target, list) and all(isinstance(t, str) for t in target))
        )
        and (layers is None or (isinstance(layers, list) and all(type(i) is int for i in layers)))
        and _str_list(to_save)
    ):
        raise AdapterError(
            f"{cfg_path}: invalid LoRA config (r, rank_pattern, target_modules, layers_to_transform or "
            "modules_to_save); "
            "restore it from your training run"
        )
    # The patterns themselves are compiled and bounded by LoraConfig; these are the types PEFT takes.
    alpha_pattern = raw.get("alpha_pattern") or {}
    layers_pattern = raw.get("layers_pattern")
    exclude = raw.get("exclude_modules")
    if not (
        isinstance(alpha_pattern, dict)
        and (layers_pattern is None or isinstance(layers_pattern, str) or _str_list(layers_pattern))
        and (exclude is None or isinstance(exclude, str) or _str_list(exclude))
    ):
        raise AdapterError(
            f"{cfg_path}: invalid LoRA config (alpha_pattern, layers_pattern or exclude_modules); "
            "restore it from your training run"
        )
    base = raw.get("base_model_name_or_path")
    config = LoraConfig(
        r=r,
        target_modules=target,
        rank_pattern=rank_pattern,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        use_dora=bool(raw.get("use_dora", False)),
        layers_to_transform=layers,
        init_lora_weights=raw.get("init_lora_weights", True),
        base_model_name_or_path=base if isinstance(base, str) and base else None,
        modules_to_save=to_save,
        alpha_pattern=alpha_pattern,
        layers_pattern=layers_pattern,
        exclude_modules=exclude,
        source=str(cfg_path),
    )
    return config, data, mode


# The fields safelora reads whose type the checks above do not already pin: a wrong type is refused
# (``"fan_in_fan_out": "false"`` would otherwise read as true); fields safelora does not read are
# ignored, so configs from newer PEFT versions keep working.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "peft_type": (str,),
    "fan_in_fan_out": (bool,),
    "use_dora": (bool,),
    "init_lora_weights": (bool, str),
    "base_model_name_or_path": (str,),
}


def _check_types(cfg_path: Path, raw: dict[str, Any]) -> None:
    for key, types in _FIELD_TYPES.items():
        value = raw.get(key)
        if value is not None and not isinstance(value, types):
            names = " or ".join("true/false" if t is bool else "a string" for t in types)
            raise AdapterError(
                f"{cfg_path}: {key} is {type(value).__name__} {_short(value)}, expected {names}; "
                "restore it from your training run"
            )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _str_list(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


def weights(handle: BufferedReader, file: Path, config: LoraConfig) -> Weights:
    """The header of an open weights file and what it holds, as ``config`` interprets it."""
    try:
        header = stfile.header_of(handle, str(file), os.fstat(handle.fileno()).st_size)
    except OSError as e:
        raise AdapterError(safefs.os_error(file, e)) from None
    return Weights(header, *_parse_keys(file, header, config))


def _parse_keys(
    file: Path, header: stfile.Header, config: LoraConfig
) -> tuple[list[LoraModule], list[tuple[str, str]], bool]:
    pairs: dict[str, dict[str, str]] = {}
    skipped: list[tuple[str, str]] = []
    dora = config.use_dora
    for key, entry in header.tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            reason = next((why for rx, why in _SKIP_RULES if rx.search(key)), None)
            if reason is None:
                # PEFT saves a modules_to_save copy under the module's own name (``…lm_head.weight``)
                reason = MODULES_TO_SAVE if config.saves(key) else "not a LoRA tensor: passed through"
            dora = dora or "lora_magnitude_vector" in key
            skipped.append((key, reason))
            continue
        if len(entry.shape) != 2:
            skipped.append((key, f"{len(entry.shape)}-D LoRA weight (convolution): not defined by Safe LoRA"))
            continue
        if entry.dtype not in stfile.COMPUTE_DTYPES:
            raise AdapterError(
                f"{file}: {key} is {entry.dtype}; Safe LoRA computes on float16, bfloat16, float32 or float64 "
                "LoRA weights (save the adapter from your training run in one of those)"
            )
        part = pairs.setdefault(m["module"], {})
        if m["part"] in part:
            # ``….lora_B.weight`` and ``….lora_B.default.weight`` name one tensor twice: which one a
            # loader takes is up to the loader, so neither is projected.
            raise AdapterError(
                f"{file}: {part[m['part']]} and {key} are both the {m['part']} of one module; "
                "the adapter file is corrupt or crafted: save it again from your training run"
            )
        part[m["part"]] = key
    modules = []
    for raw_module, parts in pairs.items():
        if parts.keys() != {"lora_A", "lora_B"}:
            have, missing = ("lora_A", "lora_B") if "lora_A" in parts else ("lora_B", "lora_A")
            raise AdapterError(f"{file}: {parts[have]} has no matching {missing}; the adapter file is incomplete")
        modules.append(_module(file, raw_module, parts["lora_A"], parts["lora_B"], header, config))
    if not modules:
        raise AdapterError(f"{file}: no 2-D lora_A/lora_B pairs; nothing for Safe LoRA to project")
    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.module))
    return modules, skipped, dora


def _module(
    file: Path, raw_module: str, a_key: str, b_key: str, header: stfile.Header, config: LoraConfig
) -> LoraModule:
    module = raw_module.removeprefix(PEFT_PREFIX)
    a, b = header.tensors[a_key], header.tensors[b_key]
    rank = a.shape[0]
    if 0 in a.shape or 0 in b.shape:
        raise AdapterError(
            f"{file}: {a_key} is {list(a.shape)} and {b_key} is {list(b.shape)}; a module with no rank, input or "
            "output features is not a LoRA update: save the adapter again from your training run"
        )
    if b.shape[1] != rank:
        raise AdapterError(
            f"{file}: {a_key} is {list(a.shape)} but {b_key} is {list(b.shape)}; ranks differ, the adapter file is "
            "incomplete or corrupt: save it again from your training run"
        )
    if rank != config.expected_rank(module):
        raise AdapterError(
            f"{file}: {a_key} has rank {rank} but adapter_config.json says r={config.expected_rank(module)} "
            "for this module; config and weights do not belong together"
        )
    layer = config.layer(module)
    if not config.targets(module):
        targets = config.target_modules
        named = f"target_modules={show(targets) if isinstance(targets, str) else show(repr(targets))}"
        if config.layers_to_transform:
            named += f" with layers_to_transform={show(repr(config.layers_to_transform))} (its layer: {layer})"
        raise AdapterError(
            f"{file}: holds LoRA weights for {show(module)} but {named} does not name it; config and weights do "
            "not belong together"
        )
    return LoraModule(module, a_key, b_key, rank, layer, b.shape[0], a.shape[1])


# What the stamp covers of adapter_config.json (``covered_config``), deny-by-default: the whole parsed
# config, with PEFT's defaults filled in for the keys a config may leave out (so a config that spells
# a default and one that omits it digest alike), less only the keys below, which change nothing the
# adapter does to a model at inference. Every other key counts, unknown ones included.
CONFIG_DEFAULTS: dict[str, object] = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 8,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_modules": None,
    "exclude_modules": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "modules_to_save": None,
    "init_lora_weights": True,
    "task_type": None,
    "base_model_name_or_path": None,
}
INERT_CONFIG = frozenset({"inference_mode", "revision", "peft_version", "auto_mapping", "lora_dropout"})


def covered_config(data: bytes, where: Path) -> bytes:
    """``adapter_config.json``'s bytes as the stamp covers them: canonical JSON (sorted keys, no
    whitespace, ASCII) of the parsed object with ``CONFIG_DEFAULTS`` filled in and ``INERT_CONFIG`` removed."""
    raw = _config_object(data, where)
    covered = {k: v for k, v in (CONFIG_DEFAULTS | raw).items() if k not in INERT_CONFIG}
    return json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
