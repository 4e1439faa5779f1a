"""MLX-LM adapters: a directory with mlx-lm's ``adapter_config.json`` and ``adapters.safetensors``.

mlx-lm stores each LoRA layer's ``lora_a`` as in×r and ``lora_b`` as r×out (its layer computes
``x @ lora_a @ lora_b``), under the model's own module paths (``model.layers.3.self_attn.q_proj``,
Hugging Face's names for the Llama family). Read, they are turned into PEFT's shape (A r×in, B
out×r); written, back, so the projected ``lora_b`` is ``lora_b · C`` in mlx-lm's orientation. A
DoRA adapter's magnitudes (``.m``) are left as they are. safelora's stamp goes into the safetensors
metadata, beside mlx's own ``format`` entry. The config is ``mlx_config``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from io import BufferedReader
from pathlib import Path

import torch

from ..errors import AdapterError
from ..io import safefs, stfile, strict
from . import output as output_dir
from . import stformat
from .base import Adapter, BaseConfig, LoraModule, Weights
from .location import file_of
from .lora_config import CONFIG_FILE, LoraConfig
from .mlx_config import CONFIG_LIMIT, WEIGHTS_FILE, MlxConfig, covered_config, is_mlx_config, load_config

_FIX = "pass an MLX-LM adapter directory"
_SAVE = "train or save it again with mlx-lm"
# Matched whole (fullmatch, DOTALL): a name is what it is to its last character, line breaks included.
_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_a|lora_b|m)", re.S)
_QUANTIZED = re.compile(r".*\.lora_[ab]\.(?:weight|scales|biases)", re.S)
# A module inside a block: the first numeric segment is the block's index in the model's layer list.
_BLOCK = re.compile(r"(?P<head>(?:[^.]+\.)*?)(?P<index>\d+)\.(?P<rel>.+)", re.S)
_EMBEDDINGS = frozenset({"embed_tokens", "wte", "word_embeddings", "tok_embeddings"})
# GPT-2's Conv1D weights: Hugging Face stores them in×out and mlx-lm transposes them on load.
_CONV1D = frozenset({"c_attn", "c_fc", "c_proj"})
_MAGNITUDE = "DoRA magnitude vector: left unchanged"
_EMBEDDING = "embedding LoRA: not defined by Safe LoRA, passed through"


def is_mlx(location: safefs.Directory) -> bool:
    """The content probe: an ``adapter_config.json`` that is mlx-lm's (``mlx_config.is_mlx_config``).

    The config decides, not the weights file: an MLX-LM directory that lacks ``adapters.safetensors``
    is refused with its own message rather than read as some other format's."""
    if location.lstat(CONFIG_FILE) is None:
        return False
    try:
        data, _ = location.read_small(CONFIG_FILE, CONFIG_LIMIT, fix=_FIX)
        return is_mlx_config(strict.loads(data))
    except (AdapterError, strict.InvalidJSON):
        return False  # not readable as mlx-lm's: the format that claims it gives the message


def parse_weights(
    file: Path, header: stfile.Header, config: MlxConfig
) -> tuple[list[LoraModule], list[tuple[str, str]], bool]:
    """The LoRA modules of an ``adapters.safetensors`` header, checked against the config."""
    pairs: dict[str, dict[str, str]] = {}
    skipped: list[tuple[str, str]] = []
    dora = config.fine_tune_type == "dora"
    seen: set[str] = set()  # every module the file holds LoRA tensors for, embeddings included
    for key, entry in header.tensors.items():
        if _QUANTIZED.fullmatch(key) or (_KEY.fullmatch(key) and entry.dtype not in stfile.COMPUTE_DTYPES):
            raise AdapterError(
                f"{file}: {key} is a quantized LoRA tensor ({entry.dtype}); Safe LoRA projects float LoRA "
                f"weights (a float LoRA on a quantized model is fine): {_SAVE} without quantizing the adapter"
            )
        m = _KEY.fullmatch(key)
        if m is None:
            skipped.append((key, "not a LoRA tensor: passed through"))
            continue
        module, part = m["module"], m["part"]
        seen.add(module)
        if part == "m":
            dora = True
            skipped.append((key, _MAGNITUDE))
            continue
        if len(entry.shape) == 3:
            raise AdapterError(
                f"{file}: {key} is {list(entry.shape)}, a mixture-of-experts switch layer (one LoRA per expert); "
                f"Safe LoRA is defined for one weight matrix per module: {_SAVE} without the expert layers in keys"
            )
        if len(entry.shape) != 2:
            raise AdapterError(f"{file}: {key} is {list(entry.shape)}, expected a 2-D LoRA weight; {_SAVE}")
        if module.rsplit(".", 1)[-1] in _EMBEDDINGS:
            skipped.append((key, _EMBEDDING))
            continue
        if module.rsplit(".", 1)[-1] in _CONV1D:
            raise AdapterError(
                f"{file}: {key} adapts a GPT-2-style Conv1D module, whose Hugging Face weight is stored in×out "
                "and transposed by mlx-lm; safelora projects MLX-LM adapters of Linear modules only: train "
                "the adapter with PEFT (fan_in_fan_out) instead"
            )
        pairs.setdefault(module, {})[part] = key
    modules = [_module(file, module, parts, header, config) for module, parts in pairs.items()]
    if not modules:
        raise AdapterError(f"{file}: no 2-D lora_a/lora_b pairs; nothing for Safe LoRA to project")
    _check_layers(file, modules, config)
    _check_keys(file, seen, config)
    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.module))
    return modules, skipped, dora


def _module(file: Path, module: str, parts: dict[str, str], header: stfile.Header, config: MlxConfig) -> LoraModule:
    if parts.keys() != {"lora_a", "lora_b"}:
        have, missing = ("lora_a", "lora_b") if "lora_a" in parts else ("lora_b", "lora_a")
        raise AdapterError(f"{file}: {parts[have]} has no matching {missing}; the adapter file is incomplete")
    a_key, b_key = parts["lora_a"], parts["lora_b"]
    (inp, rank), (b_rank, out) = header.tensors[a_key].shape, header.tensors[b_key].shape
    if 0 in (inp, rank, out):
        raise AdapterError(
            f"{file}: {a_key} is {[inp, rank]} and {b_key} is {[b_rank, out]}; a module with no rank, input or "
            f"output features is not a LoRA update: {_SAVE}"
        )
    if b_rank != rank:
        raise AdapterError(
            f"{file}: {a_key} is {[inp, rank]} (in×r) but {b_key} is {[b_rank, out]} (r×out); ranks differ, the "
            f"adapter file is incomplete or corrupt: {_SAVE}"
        )
    if rank != config.r:
        raise AdapterError(
            f"{file}: {a_key} has rank {rank} but {CONFIG_FILE} says lora_parameters.rank={config.r}; config "
            "and weights do not belong together"
        )
    block = _BLOCK.fullmatch(module)
    targeted = module in (config.keys or ()) or (
        block is not None and (config.keys is None or block["rel"] in config.keys)
    )
    if not targeted:
        says = (
            "has no keys, so mlx-lm puts LoRA layers inside the blocks only"
            if config.keys is None
            else "keys do not name it (nor its path inside a block)"
        )
        raise AdapterError(
            f"{file}: holds LoRA weights for {module} but lora_parameters {says}; config and weights do not "
            "belong together"
        )
    layer = int(block["index"]) if block is not None else None
    return LoraModule(module, a_key, b_key, rank, layer, out, inp)


def _check_layers(file: Path, modules: list[LoraModule], config: MlxConfig) -> None:
    """mlx-lm puts LoRA layers on the last ``num_layers`` blocks: a file spanning more is not its."""
    layers = [m.layer for m in modules if m.layer is not None]
    if config.num_layers > 0 and layers and max(layers) - min(layers) >= config.num_layers:
        raise AdapterError(
            f"{file}: holds LoRA weights for blocks {min(layers)} to {max(layers)} but {CONFIG_FILE} says "
            f"num_layers={config.num_layers} (the last {config.num_layers}); config and weights do not belong together"
        )


def _check_keys(file: Path, seen: set[str], config: MlxConfig) -> None:
    """Every key the config names has LoRA weights: mlx-lm skips a key the model lacks without a word."""
    rels = {b["rel"] for module in seen if (b := _BLOCK.fullmatch(module)) is not None}
    for key in config.keys or ():
        if key not in rels and key not in seen:
            raise AdapterError(
                f"{file}: lora_parameters.keys names {key}, but the file holds no LoRA weights for it: the model "
                f"has no such module; remove it from keys in {CONFIG_FILE}, or pass the adapter trained with it"
            )


def _parsed(config: LoraConfig, where: Path) -> MlxConfig:
    if not isinstance(config, MlxConfig):
        raise AdapterError(f"{where}: not an MLX-LM adapter's config; {_FIX}")
    return config


def _turned(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A ``lora_a``/``lora_b`` transposed (mlx-lm's orientation to PEFT's, or back); anything else as it is."""
    m = _KEY.fullmatch(key)
    return tensor.T.contiguous() if m is not None and m["part"] != "m" and tensor.ndim == 2 else tensor


class MlxFormat:
    """mlx-lm's adapter directory (see the module's docstring)."""

    name = "MLX-LM"
    expects = "an MLX-LM adapter directory"
    holds = f"{CONFIG_FILE} + {WEIGHTS_FILE}"
    # Fields of adapter_config.json that change the update or where it applies.
    effect_fields = frozenset({"fine_tune_type", "num_layers", "lora_layers", "lora_parameters", "model"})

    def covered_config(self, adapter: Adapter) -> bytes:
        return covered_config(adapter.config_bytes, adapter.path / CONFIG_FILE)

    def detect(self, location: safefs.Directory) -> bool:
        return file_of(location) is None and is_mlx(location)

    def lacks(self, location: safefs.Directory) -> str:
        name = file_of(location)
        if name is not None:
            return f"{location.path / name}: a file, not an MLX-LM adapter directory"
        return f"{location.path / CONFIG_FILE}: missing"

    def read_config(self, location: safefs.Directory) -> LoraConfig:
        return load_config(location)[0]

    def load(self, location: safefs.Directory, base_config: BaseConfig | None = None) -> Adapter:
        config, config_bytes, config_mode = load_config(location)
        file = location.path / WEIGHTS_FILE
        if location.lstat(WEIGHTS_FILE) is None:
            raise AdapterError(f"{file}: missing; {_FIX} (mlx-lm saves {WEIGHTS_FILE} beside {CONFIG_FILE})")
        handle = location.open(WEIGHTS_FILE, fix=_FIX)
        try:
            st = os.fstat(handle.fileno())
            header, modules, skipped, dora = self.weights(handle, file, config)
        except BaseException:
            handle.close()
            raise
        return Adapter(
            self, location.path, file, location, config, config_bytes, config_mode, header, handle, st, modules,
            skipped, dora, [],
        )  # fmt: skip

    def weights(self, handle: BufferedReader, file: Path, config: LoraConfig | None) -> Weights:
        if config is None:
            raise RuntimeError(f"{file}: MLX-LM weights are read with their config")
        try:
            header = stfile.header_of(handle, str(file), os.fstat(handle.fileno()).st_size)
        except OSError as e:
            raise AdapterError(safefs.os_error(file, e)) from None
        return Weights(header, *parse_weights(file, header, _parsed(config, file)))

    def tensor(self, adapter: Adapter, key: str) -> torch.Tensor:
        return _turned(key, stformat.read_tensor(adapter, key))

    def encode(self, adapter: Adapter, key: str, tensor: torch.Tensor) -> bytes:
        return stfile.tensor_bytes(_turned(key, tensor))

    def provenance(self, adapter: Adapter) -> dict[str, str]:
        return stformat.stamp(adapter)

    def check_output(self, adapter: Adapter, output: Path, *, overwrite: bool) -> None:
        output_dir.check_output(output, adapter.dir.identity, overwrite=overwrite)

    def write(
        self,
        adapter: Adapter,
        replacements: Mapping[str, torch.Tensor],
        provenance: Mapping[str, str],
        output: Path | None,
        *,
        overwrite_output: bool = False,
        notes: list[str] | None = None,
    ) -> Path:
        """Write the patched weights in mlx-lm's orientation (as ``PeftFormat.write`` does for PEFT's):
        in place, atomically, or as a complete adapter directory at ``output``."""
        for key, t in replacements.items():
            e = adapter.header.tensors[key]
            if tuple(_turned(key, t).shape) != e.shape or t.dtype != e.torch_dtype:
                raise AssertionError(f"replacement for {key} changed shape or dtype")
        return stformat.write_weights(
            adapter, replacements, provenance, output, overwrite=overwrite_output, notes=notes
        )

    def kept_files(self, adapter: Adapter) -> tuple[str, ...]:
        return (WEIGHTS_FILE,)

    def attested_files(self, adapter: Adapter) -> tuple[str, ...]:
        return (CONFIG_FILE, WEIGHTS_FILE)


MLX = MlxFormat()
