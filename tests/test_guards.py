"""Places a run must not write to and inputs it cannot represent, as a release job meets them:
Trainer checkpoints, training runs and full models given as adapters, a backup store that would
travel with the adapter, values a dtype cannot hold."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import Result

import safelora_cli
from safelora_cli.adapters.lora_config import CONFIG_FILE
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.errors import BackupError, CheckpointError

Cli = Callable[..., Result]
Pair = tuple[Path, Path]

TRAINING_STATE = {
    "trainer_state.json": b'{"global_step": 6}',
    "optimizer.pt": b"optimizer moments",
    "scheduler.pt": b"scheduler",
    "rng_state.pth": b"rng",
    "training_args.bin": b"args",
}
TOKENIZER = {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "special_tokens_map.json": b"{}"}


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_error(r: Result) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def project(cli: Cli, pair: Pair, *args: object) -> Result:
    return cli("project", "--base", pair[0], "--aligned", pair[1], "--num-layers", 2, "--quiet", *args)


@pytest.fixture
def checkpoint(adapter_dir: Path, tmp_path: Path) -> Path:
    """A Trainer checkpoint: the adapter, its tokenizer, the training state, an earlier safelora/
    copy and DeepSpeed's global_step directory."""
    ckpt = tmp_path / "run" / "checkpoint-6"
    shutil.copytree(adapter_dir, ckpt)
    for name, data in {**TRAINING_STATE, **TOKENIZER}.items():
        (ckpt / name).write_bytes(data)
    shutil.copytree(adapter_dir, ckpt / "safelora")
    (ckpt / "global_step6").mkdir()
    (ckpt / "global_step6" / "mp_rank_00_model_states.pt").write_bytes(b"states")
    return ckpt


# ---- Trainer checkpoints ----


@pytest.mark.parametrize("marker", ["trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"])
@pytest.mark.parametrize("extra", [(), ("--force",), ("--dry-run",)])
def test_a_checkpoint_is_refused_in_place_even_with_force(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, marker: str, extra: tuple[str, ...]
) -> None:
    (adapter_dir / marker).write_bytes(b"state")
    before = tree(adapter_dir)
    r = project(cli, llama_pair, adapter_dir, *extra)
    assert r.exit_code == 2, r.stderr
    assert marker in one_error(r) and "--allow-checkpoint" in r.stderr
    assert tree(adapter_dir) == before


def test_a_checkpoint_is_refused_before_any_checkpoint_is_opened(cli: Cli, checkpoint: Path, tmp_path: Path) -> None:
    before = tree(checkpoint)
    r = cli("project", checkpoint, "--base", tmp_path / "absent", "--aligned", "org/not-even-looked-up", "-q")
    assert r.exit_code == 2
    assert "trainer_state.json" in one_error(r)
    assert tree(checkpoint) == before


def test_allow_checkpoint_rewrites_it_in_place(cli: Cli, llama_pair: Pair, checkpoint: Path) -> None:
    before = tree(checkpoint)
    r = project(cli, llama_pair, checkpoint, "--allow-checkpoint")
    assert r.exit_code == 0, r.stderr
    after = tree(checkpoint)
    assert after[ADAPTER_FILE] != before[ADAPTER_FILE]
    assert {k: v for k, v in after.items() if k != ADAPTER_FILE} == {
        k: v for k, v in before.items() if k != ADAPTER_FILE
    }


@pytest.mark.parametrize("inside", [True, False])
def test_output_from_a_checkpoint_copies_only_the_adapter(
    cli: Cli, llama_pair: Pair, checkpoint: Path, tmp_path: Path, inside: bool
) -> None:
    """--output <checkpoint>/safelora (the callback's layout, replacing an earlier copy) and an output
    elsewhere: the weights, the config, the card and the tokenizer; no training state at all."""
    (checkpoint / "README.md").write_text("# my adapter\n")
    out = checkpoint / "safelora" if inside else tmp_path / "out"
    before = {k: v for k, v in tree(checkpoint).items() if not k.startswith("safelora/")}
    r = project(cli, llama_pair, checkpoint, "--output", out, "--force")
    assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted([ADAPTER_FILE, CONFIG_FILE, "README.md", *TOKENIZER])
    assert {k: v for k, v in tree(checkpoint).items() if not k.startswith("safelora/")} == before
    assert safelora_cli.check(out, base=llama_pair[0], aligned=llama_pair[1]).ok


def test_the_api_refuses_a_checkpoint_and_copies_only_the_adapter(
    llama_pair: Pair, checkpoint: Path, tmp_path: Path
) -> None:
    base, aligned = llama_pair
    before = tree(checkpoint)
    with pytest.raises(CheckpointError) as caught:
        safelora_cli.project(checkpoint, base=base, aligned=aligned, num_layers=2)
    assert caught.value.exit_code == 2 and "--" not in str(caught.value)
    with pytest.raises(CheckpointError):
        safelora_cli.project([checkpoint], base=base, aligned=aligned, num_layers=2, force=True)
    assert tree(checkpoint) == before
    report = safelora_cli.project(checkpoint, base=base, aligned=aligned, num_layers=2, output=tmp_path / "o")
    assert report.written and "optimizer.pt" not in os.listdir(tmp_path / "o")
    assert safelora_cli.project(checkpoint, base=base, aligned=aligned, num_layers=2, allow_checkpoint=True).written


@pytest.fixture(scope="module")
def named_in_checkpoint(llama_pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Trainer checkpoint whose adapter has a name of its own: PEFT saves it in a subdirectory
    (``checkpoint-6/safety/adapter_model.safetensors``), the training state beside that."""
    from peft import LoraConfig, get_peft_model
    from support.builders import randomize_lora
    from transformers import LlamaForCausalLM

    ckpt = tmp_path_factory.mktemp("named") / "run" / "checkpoint-6"
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(llama_pair[1]),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        adapter_name="safety",
    )
    randomize_lora(model, 3)
    model.save_pretrained(ckpt)
    for name, data in {**TRAINING_STATE, **TOKENIZER}.items():
        (ckpt / name).write_bytes(data)
    assert (ckpt / "safety" / ADAPTER_FILE).is_file() and not (ckpt / ADAPTER_FILE).exists()
    return ckpt


@pytest.mark.parametrize("marker", ["trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_named_adapter_inside_a_checkpoint_is_refused_in_place_even_with_force(
    cli: Cli, llama_pair: Pair, named_in_checkpoint: Path, tmp_path: Path, marker: str
) -> None:
    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(named_in_checkpoint, ckpt)
    for name in TRAINING_STATE:
        if name != marker:
            (ckpt / name).unlink()
    before = tree(ckpt)
    for extra in ((), ("--force",), ("--dry-run",)):
        r = project(cli, llama_pair, ckpt / "safety", *extra)
        assert r.exit_code == 2, r.stderr
        assert marker in one_error(r) and "--allow-checkpoint" in r.stderr
    with pytest.raises(CheckpointError):
        safelora_cli.project(ckpt / "safety", base=llama_pair[0], aligned=llama_pair[1], num_layers=2, force=True)
    assert tree(ckpt) == before


def test_a_named_adapter_in_a_checkpoint_is_found_through_the_directory_opened(
    cli: Cli, llama_pair: Pair, named_in_checkpoint: Path, tmp_path: Path
) -> None:
    """Given through a link from elsewhere, the adapter's own parent is still the checkpoint; and a
    directory that only lies beside training state, one level further down, is no checkpoint's."""
    ckpt = Path(shutil.copytree(named_in_checkpoint, tmp_path / "checkpoint-6"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "safety").symlink_to(ckpt / "safety")
    before = tree(ckpt)
    r = project(cli, llama_pair, tmp_path / "elsewhere" / "safety")
    assert r.exit_code == 2 and "trainer_state.json" in one_error(r), r.stderr
    assert tree(ckpt) == before
    deeper = tmp_path / "deeper"
    shutil.copytree(ckpt, deeper / "nested")
    for name in TRAINING_STATE:
        (deeper / "nested" / name).rename(deeper / name)
    r = project(cli, llama_pair, deeper / "nested" / "safety")
    assert r.exit_code == 0, r.stderr


def test_allow_checkpoint_rewrites_a_named_adapter_in_place(
    cli: Cli, llama_pair: Pair, named_in_checkpoint: Path, tmp_path: Path
) -> None:
    ckpt = Path(shutil.copytree(named_in_checkpoint, tmp_path / "checkpoint-6"))
    before = tree(ckpt)
    r = project(cli, llama_pair, ckpt / "safety", "--allow-checkpoint")
    assert r.exit_code == 0, r.stderr
    after = tree(ckpt)
    changed = f"safety/{ADAPTER_FILE}"
    assert after[changed] != before[changed]
    assert {k: v for k, v in after.items() if k != changed} == {k: v for k, v in before.items() if k != changed}


def test_output_from_a_named_adapter_in_a_checkpoint_copies_only_the_adapter(
    cli: Cli, llama_pair: Pair, named_in_checkpoint: Path, tmp_path: Path
) -> None:
    ckpt = Path(shutil.copytree(named_in_checkpoint, tmp_path / "checkpoint-6"))
    (ckpt / "safety" / "README.md").write_text("# safety adapter\n")
    before = tree(ckpt)
    out = tmp_path / "out"
    r = project(cli, llama_pair, ckpt / "safety", "--output", out)
    assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted([ADAPTER_FILE, CONFIG_FILE, "README.md"])
    assert tree(ckpt) == before
    assert safelora_cli.check(out, base=llama_pair[0], aligned=llama_pair[1]).ok


def test_the_callbacks_copy_in_a_checkpoint_is_no_named_adapter(cli: Cli, llama_pair: Pair, checkpoint: Path) -> None:
    """``<checkpoint>/safelora`` is the sanitized copy resuming never reads: rewriting it in place is
    allowed, and the checkpoint's own files stay as they were."""
    before = {k: v for k, v in tree(checkpoint).items() if not k.startswith("safelora/")}
    r = project(cli, llama_pair, checkpoint / "safelora")
    assert r.exit_code == 0, r.stderr
    assert {k: v for k, v in tree(checkpoint).items() if not k.startswith("safelora/")} == before


def test_an_output_inside_an_adapter_is_refused_but_a_checkpoints_own_safelora(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, checkpoint: Path
) -> None:
    """Inside a plain adapter, an output would be read as part of it: refused up front, dry run too.
    Its ``safelora/`` is the callback's layout in a checkpoint: allowed, and rerun, never copied into itself."""
    before = tree(adapter_dir)
    for extra in ((), ("--dry-run",)):
        r = project(cli, llama_pair, adapter_dir, "--output", adapter_dir / "sanitized", "--force", *extra)
        assert r.exit_code == 1 and "inside the adapter directory" in r.stderr, r.stderr
    assert tree(adapter_dir) == before
    for where in (adapter_dir, adapter_dir, checkpoint):
        r = project(cli, llama_pair, where, "--output", where / "safelora", "--force")
        assert r.exit_code == 0, r.stderr
        assert "safelora" not in os.listdir(where / "safelora")


# ---- errors that point the way ----


def test_a_training_run_directory_names_its_checkpoints(cli: Cli, llama_pair: Pair, checkpoint: Path) -> None:
    run = checkpoint.parent
    shutil.copytree(checkpoint, run / "checkpoint-12")
    r = project(cli, llama_pair, run)
    assert r.exit_code == 1
    line = one_error(r)
    assert "checkpoint-6" in line and "checkpoint-12" in line


def test_a_model_given_as_an_adapter_says_so(cli: Cli, llama_pair: Pair) -> None:
    r = project(cli, llama_pair, llama_pair[1])
    assert r.exit_code == 1
    assert "a model, not an adapter" in one_error(r)


@pytest.mark.parametrize("role", ["--base", "--aligned"])
def test_a_single_shard_given_as_a_checkpoint_says_pass_the_directory(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, role: str
) -> None:
    shard = sorted(llama_pair[0].glob("*.safetensors"))[0]
    args = {"--base": llama_pair[0], "--aligned": llama_pair[1]} | {role: shard}
    before = tree(adapter_dir)
    r = cli("project", adapter_dir, "--base", args["--base"], "--aligned", args["--aligned"], "--quiet")
    assert r.exit_code == 1
    line = one_error(r)
    assert "pass the directory" in line and str(shard.parent) in line
    assert tree(adapter_dir) == before


# ---- backups never travel ----


@pytest.mark.parametrize("variable", ["SAFELORA_BACKUPS", "XDG_DATA_HOME"])
@pytest.mark.parametrize("where", ["adapter", "output"])
def test_a_backup_store_inside_the_adapter_or_the_output_is_refused(
    cli: Cli,
    llama_pair: Pair,
    adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    where: str,
) -> None:
    out = tmp_path / "out"
    inside = adapter_dir if where == "adapter" else out
    if variable == "SAFELORA_BACKUPS":
        monkeypatch.setenv(variable, str(inside / ".originals"))
    else:
        monkeypatch.delenv("SAFELORA_BACKUPS")
        monkeypatch.setenv(variable, str(inside / "data"))
    before = tree(adapter_dir)
    r = project(cli, llama_pair, adapter_dir, *(["--output", out] if where == "output" else []))
    assert r.exit_code == 1
    assert "backup store" in one_error(r)
    assert tree(adapter_dir) == before and not out.exists()
    with pytest.raises(BackupError):
        safelora_cli.project(
            adapter_dir,
            base=llama_pair[0],
            aligned=llama_pair[1],
            num_layers=2,
            backup=False,
            output=out if where == "output" else None,
        )


# ---- never write what cannot be represented ----


def _scaled_aligned(pair: Pair, root: Path, name: str, scale: float) -> Path:
    """A copy of the aligned checkpoint whose ``name`` is base + ``scale`` × (aligned − base)."""
    aligned = Path(shutil.copytree(pair[1], root / "aligned"))
    shard = aligned / json.loads((aligned / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    base = load_file(pair[0] / shard.name)[name]
    tensors[name] = base + scale * (tensors[name] - base)
    save_file(tensors, shard, metadata={"format": "pt"})
    return aligned


def test_a_projected_fp16_lora_b_that_overflows_is_refused(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, tmp_path: Path
) -> None:
    """lora_B near fp16's largest value and a large V: C·B (C is not a projection) exceeds float16."""
    aligned = _scaled_aligned(llama_pair, tmp_path, "model.layers.0.self_attn.q_proj.weight", 1000.0)
    weights = load_file(adapter_dir / ADAPTER_FILE)
    big = {k: (v.sign() * 60000.0 if "lora_B" in k else v).to(torch.float16) for k, v in weights.items()}
    save_file(big, adapter_dir / ADAPTER_FILE)
    before = tree(adapter_dir)
    for extra in ((), ("--dry-run",), ("--output", tmp_path / "out")):
        r = cli("project", adapter_dir, "--base", llama_pair[0], "--aligned", aligned, "--threshold", 1, "-q", *extra)
        assert r.exit_code == 1, r.stderr
        assert "lora_B" in one_error(r) and "float16" in r.stderr
        assert tree(adapter_dir) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_adapter_is_refused(cli: Cli, llama_pair: Pair, adapter_dir: Path, value: float) -> None:
    weights = load_file(adapter_dir / ADAPTER_FILE)
    key = sorted(k for k in weights if "lora_A" in k)[0]
    weights[key][0, 0] = value
    save_file(weights, adapter_dir / ADAPTER_FILE)
    before = tree(adapter_dir)
    r = project(cli, llama_pair, adapter_dir)
    assert r.exit_code == 1
    one_error(r)
    assert tree(adapter_dir) == before


def test_nan_in_a_used_checkpoint_tensor_is_refused(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, tmp_path: Path
) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    aligned = _scaled_aligned(llama_pair, tmp_path, name, float("nan"))
    before = tree(adapter_dir)
    r = cli("project", adapter_dir, "--base", llama_pair[0], "--aligned", aligned, "--quiet", "--no-cache")
    assert r.exit_code == 1
    assert name in one_error(r)
    assert tree(adapter_dir) == before
