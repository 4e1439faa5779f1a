"""GGUF LoRA files against llama.cpp's own converter: projecting the GGUF it writes equals converting
the projected PEFT adapter, for every entry of safelora's GGUF table (each with GQA: q, k, v, o)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import builders, llamacpp
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from safelora_cli import api
from safelora_cli.adapters.gguf_names import TABLE

pytestmark = pytest.mark.skipif(llamacpp.converter_dir() is None, reason=llamacpp.SKIP_REASON)

_SHAPE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
MODELS: dict[str, tuple[type[PreTrainedModel], Any]] = {
    "LlamaForCausalLM": (LlamaForCausalLM, builders.llama_config(num_hidden_layers=2)),
    "MistralForCausalLM": (MistralForCausalLM, MistralConfig(**_SHAPE)),
    "Qwen2ForCausalLM": (Qwen2ForCausalLM, Qwen2Config(**_SHAPE)),
    "Qwen3ForCausalLM": (Qwen3ForCausalLM, Qwen3Config(head_dim=16, **_SHAPE)),
    "GemmaForCausalLM": (GemmaForCausalLM, GemmaConfig(head_dim=16, **_SHAPE)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_every_table_entry_is_tested_here() -> None:
    assert {cls for _, cls in TABLE} == set(MODELS)


def _pair(root: Path, hf_class: str) -> tuple[Path, Path]:
    model_cls, config = MODELS[hf_class]
    return builders.save_pair(model_cls, config, root, max_shard_size=None)


def _both_ways(tmp_path: Path, hf_class: str, outtype: str, **lora: Any) -> tuple[Path, Path]:
    """(the converter's GGUF projected by safelora, the projected PEFT adapter converted)."""
    base, aligned = _pair(tmp_path / "models", hf_class)
    peft = builders.make_adapter(
        aligned, tmp_path / "peft", model_cls=MODELS[hf_class][0], target_modules=TARGETS, **lora
    )
    gguf_in = llamacpp.convert(peft, base, tmp_path / "in.gguf", outtype)
    pair: dict[str, Any] = {"base": base, "aligned": aligned, "threshold": 0.99, "cache": False}
    api.project(gguf_in, output=tmp_path / "projected.gguf", **pair)
    api.project(peft, output=tmp_path / "peft-projected", **pair)
    reference = llamacpp.convert(tmp_path / "peft-projected", base, tmp_path / "reference.gguf", outtype)
    return tmp_path / "projected.gguf", reference


def _within_rounding(got: np.ndarray, want: np.ndarray, mantissa_bits: int) -> bool:
    """Within two roundings of a float with ``mantissa_bits``: the GGUF's B was rounded before it was
    projected, the reference's after, and each rounding moves a tensor by at most 2^-(bits+1) of its norm."""
    diff = np.linalg.norm(got.astype(np.float64) - want)
    return bool(diff <= 2.0**-mantissa_bits * np.linalg.norm(want))


@pytest.mark.parametrize("hf_class", sorted(MODELS))
def test_projecting_the_gguf_equals_converting_the_projected_adapter_f32(tmp_path: Path, hf_class: str) -> None:
    ours, reference = _both_ways(tmp_path, hf_class, "f32")
    got, want = llamacpp.tensors(ours), llamacpp.tensors(reference)
    assert got.keys() == want.keys()
    assert any(".attn_k." in k for k in want) and any(".attn_q." in k for k in want)
    original = llamacpp.tensors(tmp_path / "in.gguf")
    for name, w in want.items():
        rel = np.linalg.norm(got[name] - w) / np.linalg.norm(w)
        assert rel <= 1e-5, (name, rel)
        if name.endswith(".lora_b"):
            assert not np.allclose(original[name], w), name  # projected, so the test can tell row orders apart


@pytest.mark.parametrize("hf_class", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_f16_within_its_rounding(tmp_path: Path, hf_class: str) -> None:
    ours, reference = _both_ways(tmp_path, hf_class, "f16")
    assert set(llamacpp.types(ours).values()) == {"F16"}
    got, want = llamacpp.tensors(ours), llamacpp.tensors(reference)
    for name, w in want.items():
        assert _within_rounding(got[name], w, 10), name
        if name.endswith(".lora_a"):
            assert np.array_equal(got[name], w), name


def test_bf16_within_its_rounding(tmp_path: Path) -> None:
    ours, reference = _both_ways(tmp_path, "LlamaForCausalLM", "bf16")
    assert "BF16" in set(llamacpp.types(ours).values())
    got, want = llamacpp.tensors(ours), llamacpp.tensors(reference)
    for name, w in want.items():
        assert _within_rounding(got[name], w, 7), name
        if name.endswith(".lora_a"):
            assert np.array_equal(got[name], w), name


def test_q8_0_requantized_as_llama_cpp_quantizes(tmp_path: Path) -> None:
    """r = 32: lora_b's rows are whole Q8_0 blocks, so the converter quantizes it too."""
    ours, reference = _both_ways(tmp_path, "LlamaForCausalLM", "q8_0", r=32, lora_alpha=32)
    types = llamacpp.types(ours)
    assert types == llamacpp.types(reference)
    assert any(t == "Q8_0" for n, t in types.items() if n.endswith(".lora_b"))
    got, want = llamacpp.tensors(ours), llamacpp.tensors(reference)
    for name, w in want.items():
        if name.endswith(".lora_a"):
            assert np.array_equal(got[name], w), name  # untouched: the same bytes
        else:
            # The GGUF's B was quantized before it was projected: the two differ by Q8_0's error, no more.
            rel = np.linalg.norm(got[name] - w) / np.linalg.norm(w)
            assert rel <= 2e-2, (name, rel)
    # Requantizing is the gguf package's: dequantizing what was written and quantizing again is a fixed point.
    import gguf

    for t in gguf.GGUFReader(ours).tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            raw = np.array(t.data)
            again = gguf.quants.quantize(gguf.quants.dequantize(raw, t.tensor_type), t.tensor_type)
            assert np.array_equal(again, raw), t.name


def test_the_permutation_is_what_makes_attn_q_match(tmp_path: Path) -> None:
    """A Llama GGUF projected as though its rows were in Hugging Face order would not match: the table matters."""
    ours, reference = _both_ways(tmp_path, "LlamaForCausalLM", "f32")
    got, want = llamacpp.tensors(ours), llamacpp.tensors(reference)
    name = "blk.0.attn_k.weight.lora_b"
    rows = torch.from_numpy(want[name])
    heads = 2
    swapped = rows.reshape(heads, 2, -1, rows.shape[1]).swapaxes(1, 2).reshape(rows.shape).numpy()
    assert np.linalg.norm(got[name] - want[name]) <= 1e-5 * np.linalg.norm(want[name])
    assert not np.allclose(swapped, want[name])
