"""project_model: Safe LoRA on a PEFT model in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import builders
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import safelora_cli
from safelora_cli.adapter import ADAPTER_FILE, CONFIG_FILE
from safelora_cli.errors import AdapterError, SafeLoraError, SourceError, UsageError
from safelora_cli.model import MissingExtraError, ModelReport

Pair = tuple[Path, Path]
# At τ = 0.2 the adapter peft_model() builds (seed 0) has modules on both sides of the threshold.
TAU = 0.2
ADAPTER_FILES = ["README.md", CONFIG_FILE, ADAPTER_FILE]


def peft_model(aligned: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, **lora: Any) -> PeftModel:
    """A PeftModel on the aligned model, q_proj/v_proj r=8, random A and B, adapter weights in ``dtype``."""
    model = LlamaForCausalLM.from_pretrained(aligned, dtype=dtype)
    kw: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]} | lora
    peft = get_peft_model(model, LoraConfig(**kw), autocast_adapter_dtype=False)
    builders.randomize_lora(peft, seed)
    return peft


def lora_params(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """The adapter's LoRA parameters, by the key PEFT saves them under."""
    marker = f".{adapter_name}.weight"
    return {
        name.replace(marker, ".weight"): p
        for name, p in model.named_parameters()
        if ".lora_" in name and name.endswith(marker)
    }


def snapshot(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().clone() for k, p in lora_params(model, adapter_name).items()}


def b_key(module: str) -> str:
    return f"base_model.model.{module}.lora_B.weight"


def pair_args(pair: Pair) -> dict[str, str]:
    return {"base": str(pair[0]), "aligned": str(pair[1])}


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---- project_model ----


def test_project_model_is_project_on_the_saved_adapter(llama_pair: Pair, tmp_path: Path) -> None:
    """Similarities within 1e-6, the same decisions, lora_B within 1e-6 of ``project`` on the adapter
    saved to disk; the parameters stay on their device in their dtype; lora_A and the modules left
    alone are untouched."""
    model = peft_model(llama_pair[1])
    model.save_pretrained(tmp_path / "adapter")
    want = safelora_cli.project(tmp_path / "adapter", **pair_args(llama_pair), threshold=TAU, output=tmp_path / "out")
    on_disk = load_file(tmp_path / "out" / ADAPTER_FILE)
    before = snapshot(model)

    report = safelora_cli.project_model(model, **pair_args(llama_pair), threshold=TAU)

    assert isinstance(report, ModelReport)
    assert 0 < report.projected_count < len(report.layers)
    assert [layer.module for layer in report.layers] == [layer.module for layer in want.layers]
    for got, expected in zip(report.layers, want.layers, strict=True):
        assert got.similarity == pytest.approx(expected.similarity, abs=1e-6)
        assert got.projected == expected.projected
    projected = {layer.module for layer in report.layers if layer.projected}
    for key, param in lora_params(model).items():
        assert param.device.type == "cpu" and param.dtype == torch.float32
        assert (param.detach() - on_disk[key]).abs().max() <= 1e-6
        changed = not torch.equal(param.detach(), before[key])
        assert changed == any(key == b_key(m) for m in projected), key
    assert report.device == "cpu"
    document = json.loads(json.dumps(report.to_json()))
    assert document["adapter_name"] == "default" and document["output"] is None
    assert document["projected_count"] == want.projected_count


def test_save_adapter_keeps_the_provenance_check_verifies(llama_pair: Pair, tmp_path: Path) -> None:
    """``save_adapter`` writes the file ``project --output`` writes, byte for byte, and ``check``
    passes on it; plain ``save_pretrained`` writes the same tensors without provenance."""
    model = peft_model(llama_pair[1])
    model.save_pretrained(tmp_path / "adapter")
    safelora_cli.project(tmp_path / "adapter", **pair_args(llama_pair), threshold=TAU, output=tmp_path / "out")
    report = safelora_cli.project_model(model, **pair_args(llama_pair), threshold=TAU)

    saved = report.save_adapter(model, tmp_path / "saved")

    assert saved == tmp_path / "saved"
    assert sorted(os.listdir(saved)) == ADAPTER_FILES
    assert (saved / ADAPTER_FILE).read_bytes() == (tmp_path / "out" / ADAPTER_FILE).read_bytes()
    assert safelora_cli.check(saved, **pair_args(llama_pair)).status == "sanitized"
    model.save_pretrained(tmp_path / "plain")
    assert safelora_cli.check(tmp_path / "plain").status == "never_sanitized"
    assert load_file(tmp_path / "plain" / ADAPTER_FILE).keys() == load_file(saved / ADAPTER_FILE).keys()
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_pair[1]), saved)
    for key, value in snapshot(reloaded).items():
        assert torch.equal(value, snapshot(model)[key])


def test_save_adapter_into_a_non_empty_directory_needs_overwrite(llama_pair: Pair, tmp_path: Path) -> None:
    model = peft_model(llama_pair[1])
    report = safelora_cli.project_model(model, **pair_args(llama_pair), threshold=TAU)
    target = tmp_path / "saved"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="not empty") as caught:
        report.save_adapter(model, target)
    one_line(caught.value)
    assert os.listdir(target) == ["notes.txt"]
    report.save_adapter(model, target, overwrite=True)
    assert safelora_cli.check(target, **pair_args(llama_pair)).status == "sanitized"


def _train_a(model: PeftModel) -> None:
    with torch.no_grad():
        next(iter(lora_params(model).values())).add_(0.01)


def _train_b(model: PeftModel) -> None:
    with torch.no_grad():
        next(p for k, p in lora_params(model).items() if ".lora_B." in k).mul_(1.5)


def _reconfigure(model: PeftModel) -> None:
    model.peft_config["default"].lora_alpha = 32


@pytest.mark.parametrize("change", [_train_a, _train_b, _reconfigure])
def test_save_adapter_refuses_a_model_changed_since(
    llama_pair: Pair, tmp_path: Path, change: Callable[[PeftModel], None]
) -> None:
    """Provenance vouches for what safelora wrote: a model trained or reconfigured after
    ``project_model`` is refused, in one line, and nothing is written."""
    model = peft_model(llama_pair[1])
    report = safelora_cli.project_model(model, **pair_args(llama_pair), threshold=TAU)
    change(model)
    with pytest.raises(AdapterError, match="changed since project_model") as caught:
        report.save_adapter(model, tmp_path / "saved")
    assert one_line(caught.value).startswith("<model adapter 'default'>: ")
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapters_keep_their_dtype(llama_pair: Pair, tmp_path: Path, dtype: torch.dtype) -> None:
    """bf16/fp16 LoRA weights are patched in their own dtype, to exactly what ``project`` writes."""
    model = peft_model(llama_pair[1], dtype=dtype)
    model.save_pretrained(tmp_path / "adapter")
    safelora_cli.project(tmp_path / "adapter", **pair_args(llama_pair), threshold=TAU, output=tmp_path / "out")
    on_disk = load_file(tmp_path / "out" / ADAPTER_FILE)

    report = safelora_cli.project_model(model, **pair_args(llama_pair), threshold=TAU)

    assert report.projected_count > 0
    for key, param in lora_params(model).items():
        assert param.dtype == dtype and on_disk[key].dtype == dtype
        assert torch.equal(param.detach(), on_disk[key])
    saved = report.save_adapter(model, tmp_path / "saved")
    assert safelora_cli.check(saved, **pair_args(llama_pair)).status == "sanitized"


def test_a_model_on_the_cpu_is_projected_on_the_cpu(llama_pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """device=None follows the adapter's parameters, not the machine: a CPU model is projected on the
    CPU even where CUDA is available (here claimed, so any use of it would fail the run)."""
    model = peft_model(llama_pair[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert safelora_cli.project_model(model, **pair_args(llama_pair), threshold=TAU).device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_project_model_on_cuda(llama_pair: Pair, tmp_path: Path) -> None:
    """A model on the GPU is projected there (device=None) and stays there; the result is
    ``project --device cuda`` on its saved adapter, with the CPU's decisions."""
    model = peft_model(llama_pair[1]).to("cuda")
    model.save_pretrained(tmp_path / "adapter")
    on_cpu = safelora_cli.project(tmp_path / "adapter", **pair_args(llama_pair), threshold=TAU, dry_run=True)
    want = safelora_cli.project(
        tmp_path / "adapter", **pair_args(llama_pair), threshold=TAU, device="cuda", output=tmp_path / "out"
    )
    on_disk = load_file(tmp_path / "out" / ADAPTER_FILE)

    report = safelora_cli.project_model(model, **pair_args(llama_pair), threshold=TAU)

    assert report.device.startswith("cuda")
    assert [layer.projected for layer in report.layers] == [layer.projected for layer in on_cpu.layers]
    for got, expected in zip(report.layers, want.layers, strict=True):
        assert got.similarity == pytest.approx(expected.similarity, abs=1e-6)
    for key, param in lora_params(model).items():
        assert param.device.type == "cuda" and param.dtype == torch.float32
        assert (param.detach().cpu() - on_disk[key]).abs().max() <= 1e-6
    saved = report.save_adapter(model, tmp_path / "saved")
    assert safelora_cli.check(saved, **pair_args(llama_pair)).status == "sanitized"


def test_a_named_adapter_is_projected_alone(llama_pair: Pair, tmp_path: Path) -> None:
    """``adapter_name`` picks one adapter of a model holding several: only its lora_B change, and
    ``save_adapter`` puts its files in the directory itself."""
    model = peft_model(llama_pair[1])
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    builders.randomize_lora(model, 1)
    model.save_pretrained(tmp_path / "adapters", selected_adapters=["other"])
    want = safelora_cli.project(
        tmp_path / "adapters" / "other", **pair_args(llama_pair), num_layers=3, output=tmp_path / "out"
    )
    on_disk = load_file(tmp_path / "out" / ADAPTER_FILE)
    default_before = snapshot(model)

    report = safelora_cli.project_model(model, **pair_args(llama_pair), num_layers=3, adapter_name="other")

    assert report.adapter_name == "other" and str(report.adapter) == "<model adapter 'other'>"
    assert [layer.projected for layer in report.layers] == [layer.projected for layer in want.layers]
    assert report.projected_count == 3
    for key, param in lora_params(model, "other").items():
        assert (param.detach() - on_disk[key]).abs().max() <= 1e-6
    for key, value in snapshot(model).items():
        assert torch.equal(value, default_before[key]), key
    saved = report.save_adapter(model, tmp_path / "saved")
    assert sorted(os.listdir(saved)) == [CONFIG_FILE, ADAPTER_FILE]
    assert safelora_cli.check(saved, **pair_args(llama_pair)).status == "sanitized"


def test_what_project_model_refuses_leaves_the_model_as_it_was(llama_pair: Pair, tmp_path: Path) -> None:
    """Not a PeftModel, an adapter it does not hold, a DoRA adapter without allow_dora, a checkpoint
    that cannot be read: one line each, naming the adapter as the user knows it (never a temporary
    directory), and no parameter changed."""
    model = peft_model(llama_pair[1])
    before = snapshot(model)
    with pytest.raises(UsageError, match=r"expects a peft\.PeftModel") as caught:
        safelora_cli.project_model(model.get_base_model(), **pair_args(llama_pair))
    one_line(caught.value)
    with pytest.raises(UsageError, match="no such adapter; it has 'default'"):
        safelora_cli.project_model(model, **pair_args(llama_pair), adapter_name="chat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError) as caught:
        safelora_cli.project_model(model, base=str(llama_pair[0]), aligned=str(tmp_path / "empty"))
    one_line(caught.value)
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key])

    dora = peft_model(llama_pair[1], use_dora=True)
    dora_before = snapshot(dora)
    with pytest.raises(AdapterError, match="DoRA") as caught:
        safelora_cli.project_model(dora, **pair_args(llama_pair))
    assert one_line(caught.value).startswith("<model adapter 'default'>/")
    assert "safelora-model-" not in str(caught.value)
    for key, value in snapshot(dora).items():
        assert torch.equal(value, dora_before[key])
    assert safelora_cli.project_model(dora, **pair_args(llama_pair), allow_dora=True).projected_count > 0


def test_an_adapter_project_model_cannot_patch_is_refused(llama_pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA weight on the meta device (offloaded), an adapter of another PEFT method, and a saved
    key that names no parameter of the model (an adapter saved in another layout): refused in one
    line before any parameter changes, never reported as projected while the model stays as it was."""
    model = peft_model(llama_pair[1])
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    real = q_proj.lora_A["default"].weight
    q_proj.lora_A["default"].weight = torch.nn.Parameter(torch.empty(real.shape, device="meta"))
    with pytest.raises(AdapterError, match="meta device") as caught:
        safelora_cli.project_model(model, **pair_args(llama_pair))
    one_line(caught.value)
    q_proj.lora_A["default"].weight = real

    ia3 = get_peft_model(
        LlamaForCausalLM.from_pretrained(llama_pair[1]),
        IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]),
    )
    with pytest.raises(AdapterError, match="peft_type IA3; Safe LoRA applies to LoRA adapters only"):
        safelora_cli.project_model(ia3, **pair_args(llama_pair))

    save = model.save_pretrained

    def with_named_keys(directory: str, **kw: Any) -> None:
        """Save, then name each tensor with its adapter (``lora_B.default.weight``), as older files do."""
        save(directory, **kw)
        file = Path(directory) / ADAPTER_FILE
        tensors = load_file(file)
        save_file({k.replace(".weight", ".default.weight"): t for k, t in tensors.items()}, file)

    monkeypatch.setattr(model, "save_pretrained", with_named_keys)
    before = snapshot(model)
    with pytest.raises(AdapterError, match="projected, but the model has no parameter") as caught:
        safelora_cli.project_model(model, **pair_args(llama_pair), threshold=TAU)
    one_line(caught.value)
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key])


# ---- the hf extra ----


def test_a_missing_peft_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without peft: a SafeLoraError (exit 1) that is also an ImportError, naming the extra to install."""
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtraError) as caught:
        safelora_cli.project_model(object(), base="b", aligned="a")  # type: ignore[arg-type]
    assert "pip install 'safelora[hf]'" in one_line(caught.value)
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, SafeLoraError)
    assert caught.value.exit_code == 1


def test_importing_safelora_imports_neither_transformers_nor_peft() -> None:
    code = (
        "import sys\n"
        "import safelora_cli, safelora_cli.model, safelora_cli.integrations\n"
        "assert callable(safelora_cli.project_model)\n"
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
