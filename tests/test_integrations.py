"""project_model and SafeLoraCallback: Safe LoRA on a PEFT model in memory, and in a Trainer run."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from support import builders
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from typer.testing import Result

import safelora_cli
from safelora_cli.adapters.lora_config import CONFIG_FILE
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.errors import AdapterError, MissingExtraError, SourceError, UsageError
from safelora_cli.integrations.peft_model import ModelReport
from safelora_cli.integrations.transformers import SafeLoraCallback

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


# ---- SafeLoraCallback ----


def token_data(n: int = 8, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]
    return [{"input_ids": ids, "labels": ids} for ids in rows]


def training_args(output: Path, max_steps: int = 4) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )


def train(output: Path, model: PeftModel, callbacks: list[TrainerCallback], resume: Path | None = None) -> Trainer:
    """4 steps on CPU, a checkpoint every 2."""
    trainer = Trainer(model=model, args=training_args(output), train_dataset=token_data(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, ``safelora/`` left out."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).parts[0] != "safelora"
    }


class Recorder(TrainerCallback):
    """Runs before SafeLoraCallback: what each checkpoint held when it was saved, and which adapters
    the model had when training began."""

    def __init__(self) -> None:
        self.saved: dict[str, dict[str, bytes]] = {}
        self.adapters: list[str] = []

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        name = f"checkpoint-{state.global_step}"
        self.saved[name] = files(Path(args.output_dir) / name)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.adapters = list(kw["model"].peft_config)


def cli_output(cli: Callable[..., Result], pair: Pair, adapter: Path, out: Path) -> bytes:
    """``safelora project --output`` on ``adapter``, with the callback's settings: the weights file."""
    result = cli("project", "--base", pair[0], "--aligned", pair[1], "--adapter", adapter, "--output", out,
                 "--num-layers", 3, "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return (out / ADAPTER_FILE).read_bytes()


def test_every_checkpoint_gets_a_sanitized_copy(llama_pair: Pair, tmp_path: Path, cli: Callable[..., Result]) -> None:
    """A real Trainer run: every checkpoint-N/safelora/ is a complete adapter directory that
    ``check`` passes, holding what the CLI writes for that checkpoint's adapter; the checkpoint's own
    files are as the Trainer wrote them."""
    recorder = Recorder()
    callback = SafeLoraCallback(**pair_args(llama_pair), num_layers=3)
    train(tmp_path / "run", peft_model(llama_pair[1]), [recorder, callback])

    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert callback.failures == [] and len(callback.reports) == 2
    for checkpoint, report in zip(checkpoints, callback.reports, strict=True):
        sanitized = checkpoint / "safelora"
        assert files(checkpoint) == recorder.saved[checkpoint.name]
        assert sorted(os.listdir(sanitized)) == ADAPTER_FILES
        assert report.adapter == checkpoint and report.output == sanitized and report.projected_count == 3
        assert safelora_cli.check(sanitized, **pair_args(llama_pair)).status == "sanitized"
        assert (sanitized / CONFIG_FILE).read_bytes() == (checkpoint / CONFIG_FILE).read_bytes()
        want = cli_output(cli, llama_pair, checkpoint, tmp_path / f"cli-{checkpoint.name}")
        assert (sanitized / ADAPTER_FILE).read_bytes() == want
    # the checkpoints hold different weights, so the copies differ too
    assert (checkpoints[0] / "safelora" / ADAPTER_FILE).read_bytes() != (
        checkpoints[1] / "safelora" / ADAPTER_FILE
    ).read_bytes()
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_pair[1]), checkpoints[1] / "safelora")
    on_disk = load_file(checkpoints[1] / "safelora" / ADAPTER_FILE)
    for key, value in snapshot(reloaded).items():
        assert torch.equal(value, on_disk[key])


def test_resuming_ignores_the_sanitized_copy(llama_pair: Pair, tmp_path: Path, cli: Callable[..., Result]) -> None:
    """The Trainer loads a checkpoint subdirectory holding adapter weights as an extra adapter: the
    callback drops it, so the resumed run trains, saves and ends with its own adapter only; a
    checkpoint saved again gets a fresh sanitized copy, not what an earlier run left there."""
    run = tmp_path / "run"
    train(run, peft_model(llama_pair[1]), [SafeLoraCallback(**pair_args(llama_pair), num_layers=3)])
    (run / "checkpoint-4" / "safelora" / "left-by-the-first-run").write_text("stale")

    recorder = Recorder()
    callbacks = [SafeLoraCallback(**pair_args(llama_pair), num_layers=3), recorder]
    trainer = train(run, peft_model(llama_pair[1]), callbacks, resume=run / "checkpoint-2")

    assert recorder.adapters == ["default"]
    assert sorted(os.listdir(run / "checkpoint-4" / "safelora")) == ADAPTER_FILES
    want = cli_output(cli, llama_pair, run / "checkpoint-4", tmp_path / "cli")
    assert (run / "checkpoint-4" / "safelora" / ADAPTER_FILE).read_bytes() == want
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "safelora").exists()
    assert sorted(p.name for p in (run / "checkpoint-4").iterdir() if p.is_dir()) == ["safelora"]


@pytest.fixture
def checkpoint(llama_pair: Pair, tmp_path: Path) -> Path:
    """``run/checkpoint-2`` holding an adapter, as a Trainer saves it."""
    peft_model(llama_pair[1]).save_pretrained(tmp_path / "run" / "checkpoint-2")
    return tmp_path / "run" / "checkpoint-2"


def save_event(callback: SafeLoraCallback, checkpoint: Path, *, main: bool = True) -> None:
    state = TrainerState(global_step=2, is_world_process_zero=main)
    callback.on_save(training_args(checkpoint.parent), state, TrainerControl())


def test_only_the_main_process_projects(llama_pair: Pair, checkpoint: Path) -> None:
    callback = SafeLoraCallback(**pair_args(llama_pair))
    save_event(callback, checkpoint, main=False)
    assert not (checkpoint / "safelora").exists() and callback.reports == []
    save_event(callback, checkpoint)
    assert safelora_cli.check(checkpoint / "safelora", **pair_args(llama_pair)).ok


def test_a_failed_checkpoint_is_a_warning_and_training_goes_on(
    llama_pair: Pair, checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One line in the log, naming the checkpoint and the cause; no sanitized copy; the error kept in
    ``failures``. With on_error="raise" the save raises it instead."""
    (tmp_path / "empty").mkdir()
    callback = SafeLoraCallback(base=str(llama_pair[0]), aligned=str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="safelora_cli.integrations.transformers"):
        save_event(callback, checkpoint)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(checkpoint) in record.getMessage() and str(tmp_path / "empty") in record.getMessage()
    assert "\n" not in record.getMessage()
    assert [type(e) for e in callback.failures] == [SourceError] and callback.reports == []
    assert not (checkpoint / "safelora").exists()

    strict = SafeLoraCallback(base=str(llama_pair[0]), aligned=str(tmp_path / "empty"), on_error="raise")
    with pytest.raises(SourceError):
        save_event(strict, checkpoint)


def test_settings_that_cannot_work_stop_the_run(llama_pair: Pair, checkpoint: Path) -> None:
    """Bad settings are refused when the callback is made, not hours later at the first save; those
    only a save reveals raise even with on_error="warn", since every save would fail alike."""
    with pytest.raises(UsageError, match="threshold"):
        SafeLoraCallback(**pair_args(llama_pair), threshold=2.0)
    with pytest.raises(UsageError, match="num_layers"):
        SafeLoraCallback(**pair_args(llama_pair), threshold=0.3, num_layers=2)
    with pytest.raises(UsageError, match="adapter_name 'safelora'"):
        SafeLoraCallback(**pair_args(llama_pair), adapter_name="safelora")
    with pytest.raises(UsageError, match="on_error"):
        SafeLoraCallback(**pair_args(llama_pair), on_error="ignore")  # type: ignore[arg-type]
    callback = SafeLoraCallback(**pair_args(llama_pair), base_revision="main")
    with pytest.raises(UsageError, match="revisions apply to Hub repos"):
        save_event(callback, checkpoint)


def test_a_named_adapter_is_read_from_its_subdirectory(llama_pair: Pair, tmp_path: Path) -> None:
    """PEFT saves a non-default adapter in a subdirectory of the checkpoint; its sanitized copy is
    still checkpoint/safelora/, and errors name the checkpoint's files, not the scratch copy."""
    model = peft_model(llama_pair[1])
    model.add_adapter("chat", LoraConfig(r=4, target_modules=["q_proj"]))
    builders.randomize_lora(model, 2)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    model.save_pretrained(checkpoint)
    save_event(SafeLoraCallback(**pair_args(llama_pair), adapter_name="chat", on_error="raise"), checkpoint)
    report = safelora_cli.inspect(checkpoint / "safelora")
    assert report.modules == 4 and report.ranks == {4: 4}
    (checkpoint / "chat" / ADAPTER_FILE).unlink()
    (checkpoint / "safelora" / CONFIG_FILE).unlink()
    with pytest.raises(AdapterError) as caught:
        save_event(SafeLoraCallback(**pair_args(llama_pair), adapter_name="chat", on_error="raise"), checkpoint)
    assert one_line(caught.value).startswith(f"{checkpoint / 'chat' / ADAPTER_FILE}: missing")
    assert not (checkpoint / "safelora").exists()


# ---- the hf extra ----


def test_a_missing_peft_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without peft: a UsageError (exit 2, as for any missing extra) that is also an ImportError,
    naming the extra to install."""
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtraError) as caught:
        safelora_cli.project_model(object(), base="b", aligned="a")  # type: ignore[arg-type]
    assert "pip install 'safelora[hf]'" in one_line(caught.value)
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, UsageError)
    assert caught.value.exit_code == 2


def test_a_missing_transformers_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the Trainer integration without transformers: the same one-line error."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "safelora_cli.integrations.transformers")
    with pytest.raises(ImportError) as caught:
        importlib.import_module("safelora_cli.integrations.transformers")
    assert isinstance(caught.value, MissingExtraError)
    text = one_line(caught.value)
    assert text.startswith("safelora_cli.integrations.transformers needs transformers and peft")
    assert text.endswith("pip install 'safelora[hf]'")


def test_importing_safelora_imports_neither_transformers_nor_peft() -> None:
    code = (
        "import sys\n"
        "import safelora_cli, safelora_cli.integrations.peft_model, safelora_cli.integrations\n"
        "assert callable(safelora_cli.project_model)\n"
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_callback_can_write_the_model_card(llama_pair: Pair, tmp_path: Path) -> None:
    callback = SafeLoraCallback(**pair_args(llama_pair), num_layers=3, model_card=True)
    train(tmp_path / "run", peft_model(llama_pair[1]), [callback])
    for checkpoint in sorted((tmp_path / "run").glob("checkpoint-*")):
        card = (checkpoint / "safelora" / "README.md").read_text()
        assert card.count("<!-- safelora:end -->") == 1 and "- safelora" in card
        assert "safelora" not in (checkpoint / "README.md").read_text()  # the checkpoint's own card is untouched
        assert safelora_cli.check(checkpoint / "safelora", **pair_args(llama_pair)).ok
