"""Safe LoRA on a PEFT model in memory: ``project_model`` patches its lora_B parameters in place.

It runs the pipeline ``safelora project`` runs, on the adapter exactly as PEFT saves it: the model's
adapter is saved into a private temporary directory, projected there, and the projected lora_B
tensors are copied back into the model's parameters, on their device and in their dtype. So the
similarities, decisions and values are those ``project`` gives on the saved adapter.

transformers and peft are the ``hf`` extra: this module imports peft only when it is called.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import api
from ..api import PROVENANCE_PREFIX, Report
from ..errors import AdapterError, MissingExtraError, SafeLoraError, UsageError
from ..io import strict

if TYPE_CHECKING:
    from peft import PeftModel

HF_EXTRA = "pip install 'safelora[hf]'"
_DIGEST = PROVENANCE_PREFIX + "digest"


def missing_extra(what: str, error: ImportError) -> MissingExtraError:
    """The one-line error for ``what`` when importing transformers or peft failed with ``error``."""
    return MissingExtraError(f"{what} needs transformers and peft ({error}): {HF_EXTRA}")


def relabel(error: SafeLoraError, old: Path, new: str) -> SafeLoraError:
    """``error`` (same type) with the temporary directory ``old`` named ``new`` in its message.

    The temporary directory holds copies of the user's files under the same names, so ``new``
    followed by a file name names the file the user knows.
    """
    renamed = type(error)(str(error).replace(str(old), new))
    renamed.adapter = None
    return renamed


def _peft_model_class(what: str) -> type[PeftModel]:
    try:
        from peft import PeftModel
    except ImportError as e:
        raise missing_extra(what, e) from None
    return PeftModel


def _label(adapter_name: str) -> str:
    """How messages name an adapter that lives in a model, not in a directory."""
    return f"<model adapter {adapter_name!r}>"


def _check_model(model: PeftModel, adapter_name: str, what: str) -> None:
    """``model`` must be a PeftModel holding a LoRA adapter called ``adapter_name``."""
    if not isinstance(model, _peft_model_class(what)):
        raise UsageError(
            f"{what}: expects a peft.PeftModel (from get_peft_model or PeftModel.from_pretrained), "
            f"not {type(model).__name__}"
        )
    configs = model.peft_config
    if adapter_name not in configs:
        raise UsageError(
            f"adapter_name {adapter_name!r}: the model has no such adapter; it has {', '.join(map(repr, configs))}"
        )
    kind = configs[adapter_name].peft_type
    kind = getattr(kind, "value", kind)
    if kind != "LORA":
        raise AdapterError(f"{_label(adapter_name)}: peft_type {kind}; Safe LoRA applies to LoRA adapters only")


def _lora_b(model: PeftModel, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's lora_B parameters by name; refused when any of its LoRA weights is on the meta
    device (offloaded): there is nothing there to save or patch."""
    found = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if len(parts) < 3 or parts[-2] != adapter_name or parts[-3] not in ("lora_A", "lora_B"):
            continue
        if p.device.type == "meta":
            raise AdapterError(
                f"{name}: on the meta device (offloaded); load the adapter's weights onto a real device first"
            )
        if parts[-3] == "lora_B" and parts[-1] == "weight":
            found[name] = p
    return found


def _save(model: PeftModel, adapter_name: str, where: Path) -> Path:
    """Save the adapter as PEFT does (safetensors) under ``where``; returns its directory (PEFT puts a
    non-default adapter in a subdirectory named after it)."""
    model.save_pretrained(str(where), selected_adapters=[adapter_name], safe_serialization=True)
    return where if adapter_name == "default" else where / adapter_name


@dataclass(frozen=True)
class ModelReport(Report):
    """What ``project_model`` did: a ``Report`` on the model's adapter (``adapter`` names it as
    ``<model adapter 'NAME'>``, ``output`` is None), and how to save it with its provenance."""

    adapter_name: str = "default"
    provenance: dict[str, str] = field(default_factory=dict, repr=False)  # the safelora.* metadata it carries
    adapter_config: bytes = field(default=b"", repr=False)  # the adapter_config.json the run read

    def to_json(self) -> dict[str, Any]:
        """``Report.to_json`` with the adapter's name in the model (``adapter_name``)."""
        return {**super().to_json(), "adapter_name": self.adapter_name}

    def save_adapter(self, model: PeftModel, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Save the model's projected adapter to ``directory`` with its safelora provenance, so that
        ``safelora check`` passes on it; returns ``directory``.

        Plain ``model.save_pretrained`` writes the same tensors without provenance (``check``: never
        sanitized). The adapter is saved with PEFT, then written with this run's provenance only if
        its tensors and config are still those ``project_model`` left: a model trained, merged or
        reconfigured since is refused (``AdapterError``). Its files go into ``directory`` itself,
        whatever the adapter's name (``PeftModel.from_pretrained(base, directory,
        adapter_name=NAME)`` loads it). ``directory`` appears whole or not at all; a non-empty one is
        refused unless ``overwrite``, which replaces its files one by one.
        """
        _check_model(model, self.adapter_name, "save_adapter")
        with (
            tempfile.TemporaryDirectory(prefix="safelora-save-") as tmp,
            api.opened(_save(model, self.adapter_name, Path(tmp))) as fresh,
        ):
            same_config = strict.loads(fresh.config_bytes) == strict.loads(self.adapter_config)
            if not same_config or api.file_digest(fresh, self.provenance) != self.provenance.get(_DIGEST):
                raise AdapterError(
                    f"{_label(self.adapter_name)}: changed since project_model projected it (its tensors or "
                    "its config differ); its provenance would be false. Call project_model again, then "
                    "save_adapter"
                )
            provenance = {k: v for k, v in self.provenance.items() if k != _DIGEST}
            fresh.format.write(fresh, {}, provenance, Path(directory), overwrite_output=overwrite)
        return Path(directory)


def project_model(
    model: PeftModel,
    *,
    base: api.StrPath,
    aligned: api.StrPath,
    adapter_name: str = "default",
    **options: Any,
) -> ModelReport:
    """Run Safe LoRA on a loaded ``peft.PeftModel``'s LoRA adapter, patching its lora_B in place.

    The options are ``project``'s (``Options``). ``device`` is where the projection is computed: by default CUDA
    when the adapter's lora_B parameters are on a CUDA device, else the CPU; the parameters stay on
    their own device and in their own dtype either way. The adapter is projected as PEFT saves it,
    so the result equals ``project`` on ``model.save_pretrained(DIR)``; the model is patched only
    once every projected module's parameter is found, so a failure leaves it as it was. Save it
    with ``report.save_adapter(model, DIR)`` to keep the provenance ``safelora check`` verifies.

    A model whose adapter was loaded from an adapter safelora already projected is projected again
    (PEFT does not keep provenance): start from the original adapter instead.
    """
    started = time.perf_counter()
    _check_model(model, adapter_name, "project_model")
    params = _lora_b(model, adapter_name)
    if options.get("device") is None:
        options["device"] = "cuda" if any(p.device.type == "cuda" for p in params.values()) else "cpu"
    label = _label(adapter_name)
    with tempfile.TemporaryDirectory(prefix="safelora-model-") as tmp:
        saved = _save(model, adapter_name, Path(tmp) / "saved")
        try:
            report = api.project(saved, base=base, aligned=aligned, output=Path(tmp) / "projected", **options)
            with api.opened(Path(tmp) / "projected") as projected:
                updates = _updates(projected, report, params, adapter_name)
                provenance = projected.provenance()
                config = projected.config_bytes
        except SafeLoraError as e:
            raise relabel(e, saved, label) from None
    with torch.no_grad():
        for param, value in updates:
            param.copy_(value.to(param.device, param.dtype))
    fresh = {"adapter": Path(label), "output": None, "seconds": time.perf_counter() - started}
    as_run = {f.name: getattr(report, f.name) for f in fields(report)}
    return ModelReport(**(as_run | fresh), adapter_name=adapter_name, provenance=provenance, adapter_config=config)


def _updates(
    projected: api.Adapter, report: Report, params: Mapping[str, torch.nn.Parameter], adapter_name: str
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Each projected module's lora_B parameter with its new value, all found before any is patched.

    PEFT saves ``X.lora_B.weight`` for the parameter ``X.lora_B.<adapter_name>.weight``.
    """
    by_module = {m.module: m for m in projected.modules}
    out = []
    for layer in report.layers:
        if not layer.projected:
            continue
        key = by_module[layer.module].b_key
        name = f"{key.removesuffix('.weight')}.{adapter_name}.weight"
        param = params.get(name)
        if param is None:
            raise AdapterError(
                f"{layer.module}: projected, but the model has no parameter {name} to patch; pass the model "
                "as get_peft_model or PeftModel.from_pretrained returns it"
            )
        out.append((param, projected.tensor(key)))
    return out
