"""PEFT LoRA adapters, the first ``AdapterFormat``: a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, whose metadata carries safelora's provenance stamp.

Reading the config and the keys is ``peft_config``; the digest stamped into the file is ``digest``;
an ``--output`` copy of the directory is ``output``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from io import BufferedReader
from pathlib import Path

import torch

from ..errors import AdapterError
from ..io import safefs, stfile
from . import output as output_dir
from . import stformat
from .base import Adapter, BaseConfig, Weights
from .location import file_of
from .lora_config import CONFIG_FILE, LoraConfig
from .peft_config import ADAPTER_FILE, covered_config, load_config, weights

# Initialisations after which the saved B·A is the update only once PEFT converted it.
_CONVERTED_INITS = {"pissa", "olora", "loftq", "corda", "eva"}
_FIX = "pass a PEFT adapter directory"


class PeftFormat:
    """PEFT's adapter directory (see the module's docstring)."""

    name = "PEFT"
    expects = "a PEFT adapter directory"
    holds = f"{CONFIG_FILE} + {ADAPTER_FILE}"
    # Fields of adapter_config.json that change the update B·A applies or where it applies.
    effect_fields = frozenset(
        {
            "peft_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "modules_to_save",
            "fan_in_fan_out",
            "use_dora",
            "bias",
        }
    )

    def covered_config(self, adapter: Adapter) -> bytes:
        return covered_config(adapter.config_bytes, adapter.path / CONFIG_FILE)

    def detect(self, location: safefs.Directory) -> bool:
        # A directory with whatever is named adapter_config.json: a broken one is PEFT's to refuse.
        return file_of(location) is None and location.lstat(CONFIG_FILE) is not None

    def lacks(self, location: safefs.Directory) -> str:
        name = file_of(location)
        if name is not None:
            return f"{location.path / name}: a file, not a PEFT adapter directory"
        return f"{location.path / CONFIG_FILE}: missing"

    def read_config(self, location: safefs.Directory) -> LoraConfig:
        return load_config(location)[0]

    def load(self, location: safefs.Directory, base_config: BaseConfig | None = None) -> Adapter:
        config, config_bytes, config_mode = load_config(location)
        file = location.path / ADAPTER_FILE
        if location.lstat(ADAPTER_FILE) is None:
            if location.lstat("adapter_model.bin") is not None:
                raise AdapterError(
                    f"{location.path}: only adapter_model.bin; re-save the adapter with safe_serialization=True"
                )
            raise AdapterError(f"{file}: missing; {_FIX}")
        handle = location.open(ADAPTER_FILE, fix=_FIX)
        try:
            st = os.fstat(handle.fileno())
            header, modules, skipped, dora = weights(handle, file, config)
        except BaseException:
            handle.close()
            raise
        warnings = []
        init = config.init_lora_weights
        if isinstance(init, str) and init.split("_")[0].lower() in _CONVERTED_INITS:
            warnings.append(
                f"init_lora_weights={init!r}: B·A is the update only if the adapter was saved with PEFT's "
                "conversion (path_initial_model_for_weight_conversion)"
            )
        return Adapter(
            self,
            location.path,
            file,
            location,
            config,
            config_bytes,
            config_mode,
            header,
            handle,
            st,
            modules,
            skipped,
            dora,
            warnings,
        )

    def weights(self, handle: BufferedReader, file: Path, config: LoraConfig | None) -> Weights:
        if config is None:
            raise RuntimeError(f"{file}: PEFT weights are read with their config")
        return weights(handle, file, config)

    def tensor(self, adapter: Adapter, key: str) -> torch.Tensor:
        return stformat.read_tensor(adapter, key)

    def encode(self, adapter: Adapter, key: str, tensor: torch.Tensor) -> bytes:
        return stfile.tensor_bytes(tensor)

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
        """Write the patched weights; returns the file written.

        In place: a temp file in the adapter's own directory, fsync, a rename through the directory's
        descriptor (only if the weights file is still the one read), fsync the directory, so a crash
        leaves either the old file or the new one. With ``output``: a complete adapter directory (see
        ``output.write_output``) and the source left untouched. Every tensor not in ``replacements`` is
        copied byte for byte; replacements keep their original dtype. ``notes`` gets what was skipped.
        """
        for key, t in replacements.items():
            e = adapter.header.tensors[key]
            if tuple(t.shape) != e.shape or t.dtype != e.torch_dtype:
                raise AssertionError(f"replacement for {key} changed shape or dtype")
        return stformat.write_weights(
            adapter, replacements, provenance, output, overwrite=overwrite_output, notes=notes
        )

    def kept_files(self, adapter: Adapter) -> tuple[str, ...]:
        return (ADAPTER_FILE,)

    def attested_files(self, adapter: Adapter) -> tuple[str, ...]:
        return (CONFIG_FILE, ADAPTER_FILE)


PEFT = PeftFormat()
