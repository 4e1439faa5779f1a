"""Every adapter and checkpoint layout of docs/method.md's "Layouts", on real PEFT adapters.

Each test builds (once per session) a tiny model pair and an adapter PEFT itself wrote, runs the
pipeline, and checks every module against ``reference`` (dense float64, C materialised), paired
with the checkpoint weight of the same *name*.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import builders, reference
from support.run import project_adapter
from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM
from typer.testing import CliRunner

import safelora_cli
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.api import Report
from safelora_cli.cli import app
from safelora_cli.results import Settings
from safelora_cli.sources import open_local

_LORA = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")

State = dict[str, torch.Tensor]


def lora_keys(adapter_file: Path) -> dict[str, tuple[str, str]]:
    """module → (lora_A key, lora_B key) of 2-D pairs, parsed independently of safelora's own parser."""
    parts: dict[str, dict[str, str]] = {}
    for key, t in load_file(adapter_file).items():
        m = _LORA.match(key)
        if m and t.ndim == 2:
            parts.setdefault(m["module"], {})[m["part"]] = key
    return {module: (p["A"], p["B"]) for module, p in parts.items()}


def run(adapter: Path, base: Path, aligned: Path, out: Path, settings: Settings | None = None) -> tuple[Report, Path]:
    """Project ``adapter`` into ``out`` (the source stays pristine); returns the report and ``out``."""
    settings = settings or Settings(mode="number", num_layers=2)
    base_src, aligned_src = open_local(base), open_local(aligned)
    try:
        report = project_adapter(adapter, base_src, aligned_src, dataclasses.replace(settings, output=out))
    finally:
        base_src.close()
        aligned_src.close()
    _same_bytes_from_the_api_and_the_cli(adapter, base, aligned, out, settings)
    return report, out


def _same_bytes_from_the_api_and_the_cli(
    adapter: Path, base: Path, aligned: Path, out: Path, settings: Settings
) -> None:
    """``safelora_cli.project`` and ``safelora project``, given the same options, write the very bytes
    the pipeline wrote."""
    if settings.mode == "threshold":
        api_options: dict[str, object] = {"threshold": settings.threshold}
        flags = ["--threshold", repr(settings.threshold)]
    else:
        api_options = {"num_layers": settings.num_layers}
        flags = ["--num-layers", str(settings.num_layers)]
    api_out, cli_out = out.with_name(f"{out.name}-api"), out.with_name(f"{out.name}-cli")
    safelora_cli.project(
        adapter,
        base=base,
        aligned=aligned,
        output=api_out,
        precision=settings.precision,
        device=settings.device,
        allow_dora=settings.allow_dora,
        cache=False,
        **api_options,  # type: ignore[arg-type]
    )
    code, output = cli(
        adapter, "--base", base, "--aligned", aligned, "--output", cli_out, "--no-cache",
        "--precision", settings.precision, "--device", settings.device,
        *flags, *(["--allow-dora"] if settings.allow_dora else []),
    )  # fmt: skip
    assert code == 0, output
    written = (out / ADAPTER_FILE).read_bytes()
    assert (api_out / ADAPTER_FILE).read_bytes() == written, "the API wrote other bytes"
    assert (cli_out / ADAPTER_FILE).read_bytes() == written, "the CLI wrote other bytes"


def check_against_reference(
    report: Report,
    adapter: Path,
    out: Path,
    base: State,
    aligned: State,
    *,
    fan_in_fan_out: bool = False,
    weight: Callable[[str], str] = lambda module: f"{module}.weight",
) -> None:
    """Every module: similarity, selection and new lora_B as the dense float64 reference says."""
    before, after = load_file(adapter / ADAPTER_FILE), load_file(out / ADAPTER_FILE)
    keys = lora_keys(adapter / ADAPTER_FILE)
    assert sorted(layer.module for layer in report.layers) == sorted(keys)
    for layer in report.layers:
        a_key, b_key = keys[layer.module]
        a, b = before[a_key], before[b_key]
        v = reference.v_matrix(base[weight(layer.module)], aligned[weight(layer.module)], fan_in_fan_out=fan_in_fan_out)
        c = reference.c_matrix(v)
        assert layer.similarity == pytest.approx(reference.similarity(c, a, b), abs=1e-5), layer.module
        assert torch.equal(after[a_key], a), "lora_A is never changed"
        assert after[b_key].dtype == b.dtype
        if layer.projected:
            expected = reference.projected_b(c, b)
            tol = max(torch.finfo(b.dtype).eps, 1e-5)
            torch.testing.assert_close(
                after[b_key].double(), expected.to(b.dtype).double(), rtol=tol, atol=tol * float(expected.abs().max())
            )
        else:
            assert torch.equal(after[b_key], b), layer.module
    sims = [layer.similarity for layer in report.layers]
    assert report.threshold is not None
    assert [layer.projected for layer in report.layers] == reference.select_threshold(sims, report.threshold)
    assert 0 < report.projected_count < len(report.layers), "exercise both projected and untouched modules"


def rewrite(src: Path, dst: Path, change: Callable[[State], State]) -> Path:
    """A copy of adapter directory ``src`` whose weights file went through ``change``."""
    shutil.copytree(src, dst)
    save_file(change(load_file(src / ADAPTER_FILE)), str(dst / ADAPTER_FILE), metadata={"format": "pt"})
    return dst


def cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["project", *map(str, args)])
    return result.exit_code, result.output


# ---------------------------------------------------------------- session-scoped models


@pytest.fixture(scope="session")
def llama_states(llama_pair: tuple[Path, Path]) -> tuple[State, State]:
    return builders.load_state(llama_pair[0]), builders.load_state(llama_pair[1])


@pytest.fixture(scope="session")
def gpt2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return builders.gpt2_pair(tmp_path_factory.mktemp("gpt2"), max_shard_size=None)


@pytest.fixture(scope="session")
def gpt2_adapter(gpt2_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conv1D targets: fused c_attn [192, r] and both c_proj (attn 64×64, mlp in=256); fan_in_fan_out."""
    return builders.make_adapter(
        gpt2_pair[1],
        tmp_path_factory.mktemp("gpt2-adapter") / "adapter",
        model_cls=GPT2LMHeadModel,
        target_modules=["c_attn", "c_proj"],
    )


@pytest.fixture(scope="session")
def dora_adapter(llama_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builders.make_adapter(llama_pair[1], tmp_path_factory.mktemp("dora") / "adapter", use_dora=True)


# ---------------------------------------------------------------- pairing by name


def test_layers_to_transform_pairs_each_module_with_its_own_layer(
    llama_pair: tuple[Path, Path], llama_states: tuple[State, State], tmp_path: Path
) -> None:
    adapter = builders.make_adapter(llama_pair[1], tmp_path / "adapter", layers_to_transform=[1, 3])
    report, out = run(adapter, *llama_pair, tmp_path / "out")

    assert {layer.layer for layer in report.layers} == {1, 3}
    check_against_reference(report, adapter, out, *llama_states)
    # Pairing by position (the official code) would use layer 0's V for layer 1's q_proj: a different answer.
    base, aligned = llama_states
    a, b = (
        load_file(adapter / ADAPTER_FILE)[f"base_model.model.model.layers.1.self_attn.q_proj.lora_{p}.weight"]
        for p in "AB"
    )
    c0 = reference.c_matrix(
        reference.v_matrix(
            base["model.layers.0.self_attn.q_proj.weight"], aligned["model.layers.0.self_attn.q_proj.weight"]
        )
    )
    q1 = next(layer for layer in report.layers if layer.module == "model.layers.1.self_attn.q_proj")
    assert abs(reference.similarity(c0, a, b) - q1.similarity) > 1e-3


def test_checkpoint_names_without_the_adapters_prefix(
    gpt2_pair: tuple[Path, Path], gpt2_adapter: Path, tmp_path: Path
) -> None:
    """Original GPT-2 files say ``h.0.attn.c_attn.weight`` for module ``transformer.h.0.attn.c_attn``."""
    dirs = []
    for d in gpt2_pair:
        state = {k.removeprefix("transformer."): v for k, v in builders.load_state(d).items()}
        dirs.append(builders.save_checkpoint(state, tmp_path / d.name, "safetensors"))
    report, out = run(gpt2_adapter, dirs[0], dirs[1], tmp_path / "out")
    same, _ = run(gpt2_adapter, *gpt2_pair, tmp_path / "same")

    assert [(x.module, x.similarity) for x in report.layers] == [(x.module, x.similarity) for x in same.layers]
    check_against_reference(
        report,
        gpt2_adapter,
        out,
        builders.load_state(dirs[0]),
        builders.load_state(dirs[1]),
        fan_in_fan_out=True,
        weight=lambda m: m.removeprefix("transformer.") + ".weight",
    )


def test_checkpoint_names_with_an_extra_prefix(
    llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    """Multimodal checkpoints nest the language model: ``language_model.model.layers.0…``."""
    dirs = []
    for d in llama_pair:
        state = {f"language_model.{k}": v for k, v in builders.load_state(d).items()}
        state["vision_tower.blocks.0.attn.q_proj.weight"] = torch.zeros(8, 8)  # same leaf name, no clash
        dirs.append(builders.save_checkpoint(state, tmp_path / d.name, "safetensors-sharded"))
    report, out = run(llama_adapter, dirs[0], dirs[1], tmp_path / "out")

    check_against_reference(
        report,
        llama_adapter,
        out,
        builders.load_state(dirs[0]),
        builders.load_state(dirs[1]),
        weight=lambda m: f"language_model.{m}.weight",
    )


@pytest.mark.parametrize("adapter_side", ["new", "old"])
def test_multimodal_names_on_either_side_of_the_transformers_rename(
    llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path, adapter_side: str
) -> None:
    """transformers 4.52 renamed ``language_model.model.*`` to ``model.language_model.*``: an adapter
    made on one side pairs with a checkpoint saved on the other, in both directions."""
    new, old = "model.language_model.", "language_model.model."
    adapter_prefix, checkpoint_prefix = (new, old) if adapter_side == "new" else (old, new)
    dirs = []
    for d in llama_pair:
        state = {
            checkpoint_prefix + k.removeprefix("model.") if k.startswith("model.") else k: v
            for k, v in builders.load_state(d).items()
        }
        dirs.append(builders.save_checkpoint(state, tmp_path / d.name, "safetensors"))
    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "adapter"))
    tensors = load_file(adapter / ADAPTER_FILE)
    peft_prefix = "base_model.model."
    renamed = {k.replace(peft_prefix + "model.", peft_prefix + adapter_prefix): v for k, v in tensors.items()}
    save_file(renamed, adapter / ADAPTER_FILE, metadata={"format": "pt"})

    report, out = run(adapter, dirs[0], dirs[1], tmp_path / "out")

    assert all(layer.module.startswith(adapter_prefix) for layer in report.layers)
    check_against_reference(
        report,
        adapter,
        out,
        builders.load_state(dirs[0]),
        builders.load_state(dirs[1]),
        weight=lambda m: checkpoint_prefix + m.removeprefix(adapter_prefix) + ".weight",
    )


def test_a_tied_lm_head_is_paired_with_the_input_embeddings(tmp_path: Path) -> None:
    """With tie_word_embeddings a checkpoint stores no lm_head.weight: the head is the embedding
    matrix, and its V is the embeddings' difference."""
    config = builders.llama_config(tie_word_embeddings=True)
    base_dir, aligned_dir = builders.save_pair(LlamaForCausalLM, config, tmp_path / "tied", max_shard_size=None)
    aligned = builders.load_state(aligned_dir)
    assert "lm_head.weight" not in aligned
    g = torch.Generator().manual_seed(3)
    embed = aligned["model.embed_tokens.weight"]
    embed += torch.randn(embed.shape[0], 4, generator=g) @ torch.randn(4, embed.shape[1], generator=g) * 1e-2
    save_file(aligned, aligned_dir / "model.safetensors", metadata={"format": "pt"})
    adapter = builders.make_adapter(aligned_dir, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])

    report, out = run(adapter, base_dir, aligned_dir, tmp_path / "out")

    head = next(layer for layer in report.layers if layer.module == "lm_head")
    assert head.similarity is not None
    check_against_reference(
        report,
        adapter,
        out,
        builders.load_state(base_dir),
        aligned,
        weight=lambda m: "model.embed_tokens.weight" if m == "lm_head" else f"{m}.weight",
    )


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ({"language_model.", "vision_model."}, "matches several weights"),
        ({"missing"}, "no weight for module"),
    ],
)
def test_ambiguous_or_absent_weight_is_an_error_naming_the_module(
    llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path, names: set[str], message: str
) -> None:
    state = builders.load_state(llama_pair[0])
    target = "model.layers.2.self_attn.v_proj.weight"
    w = state.pop(target)
    if names != {"missing"}:
        state.update({prefix + target: w.clone() for prefix in names})
    bad = builders.save_checkpoint(state, tmp_path / "bad", "safetensors")
    before = (adapter_dir / ADAPTER_FILE).read_bytes()

    code, output = cli("--base", bad, "--aligned", llama_pair[1], "--adapter", adapter_dir)

    assert code == 1
    assert message in output
    assert "model.layers.2.self_attn.v_proj" in output
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before


# ---------------------------------------------------------------- what the config says


def test_all_linear_with_rank_and_alpha_patterns(
    llama_pair: tuple[Path, Path], llama_states: tuple[State, State], tmp_path: Path
) -> None:
    """All seven projections of all four layers: GQA k/v (32×64), tall up/gate, wide down_proj, r per module."""
    adapter = builders.make_adapter(
        llama_pair[1],
        tmp_path / "adapter",
        target_modules="all-linear",
        rank_pattern={"layers.0.self_attn.q_proj": 4, "down_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    report, out = run(adapter, *llama_pair, tmp_path / "out", Settings(mode="number", num_layers=10))

    assert len(report.layers) == 28
    ranks = {
        m: load_file(adapter / ADAPTER_FILE)[a].shape[0] for m, (a, _) in lora_keys(adapter / ADAPTER_FILE).items()
    }
    assert ranks["model.layers.0.self_attn.q_proj"] == 4
    assert ranks["model.layers.3.mlp.down_proj"] == 2
    assert ranks["model.layers.1.self_attn.q_proj"] == 8
    check_against_reference(report, adapter, out, *llama_states)


def test_regex_string_target_modules(
    llama_pair: tuple[Path, Path], llama_states: tuple[State, State], tmp_path: Path
) -> None:
    pattern = r".*\.layers\.[02]\.self_attn\.(q|k)_proj"
    adapter = builders.make_adapter(llama_pair[1], tmp_path / "adapter", target_modules=pattern)
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == pattern
    report, out = run(adapter, *llama_pair, tmp_path / "out")

    assert sorted(layer.module for layer in report.layers) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 2) for p in "kq"
    ]
    check_against_reference(report, adapter, out, *llama_states)


def test_biases_of_targeted_modules_take_no_part(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Qwen2's q/k/v_proj have biases; only the 2-D ``.weight`` is read (the official code crashes here)."""
    base, aligned = builders.qwen2_pair(tmp_path_factory.mktemp("qwen2"), max_shard_size=None)
    adapter = builders.make_adapter(
        aligned, tmp_path / "adapter", model_cls=Qwen2ForCausalLM, target_modules=["q_proj", "k_proj", "v_proj"]
    )
    report, out = run(adapter, base, aligned, tmp_path / "out")

    base_state, aligned_state = builders.load_state(base), builders.load_state(aligned)
    assert "model.layers.0.self_attn.q_proj.bias" in base_state
    check_against_reference(report, adapter, out, base_state, aligned_state)
    weights = sum(base_state[f"{layer.module}.weight"].nbytes for layer in report.layers)
    assert report.bytes_read == 2 * weights


def test_gpt2_conv1d_fused_c_attn(gpt2_pair: tuple[Path, Path], gpt2_adapter: Path, tmp_path: Path) -> None:
    """Checkpoint weights are in×out: V is transposed, and c_attn (q, k, v fused) is one matrix."""
    from peft import PeftModel

    report, out = run(gpt2_adapter, *gpt2_pair, tmp_path / "out")
    base, aligned = builders.load_state(gpt2_pair[0]), builders.load_state(gpt2_pair[1])
    assert aligned["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    assert len(report.layers) == 6
    check_against_reference(report, gpt2_adapter, out, base, aligned, fan_in_fan_out=True)

    # PEFT's own merge of the patched adapter is W + s·(C·B·A)ᵀ for a projected Conv1D module.
    layer = next(x for x in report.layers if x.projected and x.module.endswith("c_attn"))
    a_key, b_key = lora_keys(gpt2_adapter / ADAPTER_FILE)[layer.module]
    lora = load_file(gpt2_adapter / ADAPTER_FILE)
    w = aligned[f"{layer.module}.weight"].double()
    c = reference.c_matrix(reference.v_matrix(base[f"{layer.module}.weight"], w, fan_in_fan_out=True))
    expected = w + 2.0 * (reference.projected_b(c, lora[b_key]) @ lora[a_key].double()).T
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_pair[1]), out).merge_and_unload()
    torch.testing.assert_close(merged.state_dict()[f"{layer.module}.weight"].double(), expected, rtol=1e-5, atol=1e-6)


def _with_name(key: str) -> str:
    return re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key)


def test_adapter_name_in_keys(llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path) -> None:
    """Older PEFT saved ``….lora_A.default.weight``; the result is the same and the keys are kept."""
    renamed = rewrite(llama_adapter, tmp_path / "renamed", lambda s: {_with_name(k): v for k, v in s.items()})
    report, out = run(renamed, *llama_pair, tmp_path / "out")
    plain, plain_out = run(llama_adapter, *llama_pair, tmp_path / "plain")

    assert [(x.module, x.similarity, x.projected) for x in report.layers] == [
        (x.module, x.similarity, x.projected) for x in plain.layers
    ]
    patched, expected = load_file(out / ADAPTER_FILE), load_file(plain_out / ADAPTER_FILE)
    assert patched.keys() == {_with_name(k) for k in expected}
    for k, v in expected.items():
        assert torch.equal(patched[_with_name(k)], v)


@pytest.mark.parametrize(
    ("checkpoint_dtype", "adapter_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["bf16-bf16", "fp16-fp16", "fp32-bf16", "bf16-fp32"],
)
def test_dtypes(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, checkpoint_dtype: torch.dtype, adapter_dtype: torch.dtype
) -> None:
    """Math in float32 whatever the dtypes; the projected lora_B keeps the adapter's dtype."""
    base, aligned = builders.llama_pair(tmp_path_factory.mktemp("pair"), dtype=checkpoint_dtype)
    adapter = builders.make_native_adapter(
        aligned, tmp_path / "adapter", dtype=adapter_dtype, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    base_state, aligned_state = builders.load_state(base), builders.load_state(aligned)
    assert base_state["model.layers.0.self_attn.q_proj.weight"].dtype == checkpoint_dtype
    assert {t.dtype for t in load_file(adapter / ADAPTER_FILE).values()} == {adapter_dtype}

    report, out = run(adapter, base, aligned, tmp_path / "out", Settings(mode="number", num_layers=6))
    check_against_reference(report, adapter, out, base_state, aligned_state)


# ---------------------------------------------------------------- DoRA


def test_dora_is_refused_by_default(llama_pair: tuple[Path, Path], dora_adapter: Path, tmp_path: Path) -> None:
    adapter = Path(shutil.copytree(dora_adapter, tmp_path / "adapter"))
    before = (adapter / ADAPTER_FILE).read_bytes()
    args = ("--base", llama_pair[0], "--aligned", llama_pair[1], "--adapter", adapter)
    code, output = cli(*args)

    assert code == 1
    assert "DoRA" in output
    assert "--allow-dora" in output
    assert (adapter / ADAPTER_FILE).read_bytes() == before
    assert cli(*args, "--allow-dora")[0] == 0
    assert (adapter / ADAPTER_FILE).read_bytes() != before


def test_allow_dora_projects_lora_b_and_keeps_magnitudes(
    llama_pair: tuple[Path, Path], llama_states: tuple[State, State], dora_adapter: Path, tmp_path: Path
) -> None:
    report, out = run(
        dora_adapter, *llama_pair, tmp_path / "out", Settings(mode="number", num_layers=2, allow_dora=True)
    )

    check_against_reference(report, dora_adapter, out, *llama_states)
    before, after = load_file(dora_adapter / ADAPTER_FILE), load_file(out / ADAPTER_FILE)
    magnitudes = [k for k in before if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 8
    for k in magnitudes:
        assert torch.equal(after[k], before[k])
    assert {k for k, _ in report.skipped} == set(magnitudes)
    assert all("magnitude" in why for _, why in report.skipped)
    assert any("DoRA" in note for note in report.notes)
    with open(out / ADAPTER_FILE, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "magnitude" in header["__metadata__"]["safelora.dora"]


# ---------------------------------------------------------------- passed through untouched


def test_embeddings_and_modules_to_save_pass_through(
    llama_pair: tuple[Path, Path], llama_states: tuple[State, State], tmp_path: Path
) -> None:
    adapter = builders.make_adapter(
        llama_pair[1], tmp_path / "adapter", target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]
    )
    report, out = run(adapter, *llama_pair, tmp_path / "out")

    check_against_reference(report, adapter, out, *llama_states)
    skipped = dict(report.skipped)
    assert set(skipped) == {
        "base_model.model.lm_head.weight",
        "base_model.model.model.embed_tokens.base_layer.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    }
    assert "modules_to_save" in skipped["base_model.model.lm_head.weight"]
    assert "embedding" in skipped["base_model.model.model.embed_tokens.lora_embedding_A"]
    before, after = load_file(adapter / ADAPTER_FILE), load_file(out / ADAPTER_FILE)
    for key in skipped:
        assert after[key].dtype == before[key].dtype
        assert after[key].numpy().tobytes() == before[key].numpy().tobytes()


def test_lora_bias_passes_through(
    llama_pair: tuple[Path, Path], llama_states: tuple[State, State], tmp_path: Path
) -> None:
    """``lora_bias=True`` adds ``lora_B.bias``: not defined by the method, kept as it is."""
    adapter = builders.make_adapter(llama_pair[1], tmp_path / "adapter", lora_bias=True)
    report, out = run(adapter, *llama_pair, tmp_path / "out")

    check_against_reference(report, adapter, out, *llama_states)
    before, after = load_file(adapter / ADAPTER_FILE), load_file(out / ADAPTER_FILE)
    biases = {k for k in before if k.endswith("lora_B.bias")}
    assert len(biases) == 8
    assert dict(report.skipped).keys() == biases
    assert all("lora_B bias" in why for _, why in report.skipped)
    assert all(torch.equal(after[k], before[k]) for k in biases)


class _ConvNet(torch.nn.Module):
    """Two linear layers beside a Conv2d and a Conv1d: PEFT gives the convolutions 3-/4-D LoRA weights."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = torch.nn.Linear(16, 24)
        self.lin2 = torch.nn.Linear(24, 16)
        self.conv2d = torch.nn.Conv2d(3, 8, 3)
        self.conv1d = torch.nn.Conv1d(4, 6, 3)


def test_convolution_lora_passes_through(tmp_path: Path) -> None:
    """Safe LoRA defines C for 2-D weights only: conv LoRA is kept, listed as skipped, never an error."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base_state = _ConvNet().state_dict()
    aligned_state = {k: v + 0.01 * torch.randn(v.shape) for k, v in base_state.items()}
    base = builders.save_checkpoint(base_state, tmp_path / "base", "safetensors")
    aligned = builders.save_checkpoint(aligned_state, tmp_path / "aligned", "safetensors")
    net = _ConvNet()
    net.load_state_dict(aligned_state)
    peft_model = get_peft_model(net, LoraConfig(r=2, target_modules=["lin1", "lin2", "conv2d", "conv1d"]))
    builders.randomize_lora(peft_model, seed=1)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter"

    report, out = run(adapter, base, aligned, tmp_path / "out", Settings(mode="number", num_layers=1))

    assert [x.module for x in report.layers] == ["lin1", "lin2"]
    check_against_reference(report, adapter, out, base_state, aligned_state)
    skipped = dict(report.skipped)
    assert set(skipped) == {f"base_model.model.{m}.lora_{p}.weight" for m in ("conv1d", "conv2d") for p in "AB"}
    assert all("convolution" in why for why in skipped.values())
    before, after = load_file(adapter / ADAPTER_FILE), load_file(out / ADAPTER_FILE)
    assert all(torch.equal(after[k], before[k]) for k in skipped)


# ---------------------------------------------------------------- degenerate and bad inputs


def test_zero_update_has_no_similarity_and_is_not_projected(
    llama_pair: tuple[Path, Path], llama_states: tuple[State, State], llama_adapter: Path, tmp_path: Path
) -> None:
    """B = 0, as PEFT initialises it: B·A = 0 and the cosine is undefined."""
    zero_b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    adapter = rewrite(llama_adapter, tmp_path / "adapter", lambda s: {**s, zero_b: torch.zeros_like(s[zero_b])})
    report, out = run(adapter, *llama_pair, tmp_path / "out", Settings())

    layer = next(x for x in report.layers if x.module == "model.layers.1.self_attn.v_proj")
    assert (layer.similarity, layer.projected) == (None, False)
    assert layer.reason is not None and "B·A = 0" in layer.reason
    assert next(x for x in report.to_json()["layers"] if x["module"] == layer.module)["similarity"] is None
    assert torch.equal(load_file(out / ADAPTER_FILE)[zero_b], torch.zeros(32, 8))
    assert all(x.similarity is not None for x in report.layers if x is not layer)


def test_module_aligned_equals_base_is_reported_not_projected(
    llama_pair: tuple[Path, Path], llama_states: tuple[State, State], llama_adapter: Path, tmp_path: Path
) -> None:
    """V = 0 for one module: nothing to project onto. Number mode must not pick it either."""
    target = "model.layers.2.self_attn.q_proj.weight"
    base, aligned = llama_states
    same = builders.save_checkpoint({**aligned, target: base[target]}, tmp_path / "aligned", "safetensors")
    report, out = run(llama_adapter, llama_pair[0], same, tmp_path / "out", Settings(mode="number", num_layers=8))

    layer = next(x for x in report.layers if x.module == "model.layers.2.self_attn.q_proj")
    assert (layer.similarity, layer.projected) == (None, False)
    assert layer.reason is not None and "V = 0" in layer.reason
    assert report.projected_count == 7
    b_key = lora_keys(llama_adapter / ADAPTER_FILE)[layer.module][1]
    assert torch.equal(load_file(out / ADAPTER_FILE)[b_key], load_file(llama_adapter / ADAPTER_FILE)[b_key])


@pytest.mark.parametrize(("which", "value"), [(0, float("nan")), (1, float("inf")), (1, float("-inf"))])
def test_nan_or_inf_in_a_checkpoint_names_the_tensor(
    llama_pair: tuple[Path, Path],
    llama_states: tuple[State, State],
    adapter_dir: Path,
    tmp_path: Path,
    which: int,
    value: float,
) -> None:
    target = "model.layers.3.self_attn.v_proj.weight"
    state = dict(llama_states[which])
    state[target] = state[target].clone()
    state[target][5, 7] = value
    bad = builders.save_checkpoint(state, tmp_path / "bad", "safetensors")
    dirs = [llama_pair[0], llama_pair[1]]
    dirs[which] = bad
    before = (adapter_dir / ADAPTER_FILE).read_bytes()

    code, output = cli("--base", dirs[0], "--aligned", dirs[1], "--adapter", adapter_dir)

    assert code == 1
    assert target in output
    assert "NaN or Inf" in output
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before
