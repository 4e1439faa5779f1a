"""A tiny base/aligned/adapter set built from nothing but torch, for ``safelora demo``.

Both models carry a transformers ``config.json`` and the aligned one a word-level tokenizer with a
chat template, so ``safelora eval`` runs on them too. Their weights are random: whatever they answer
means nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB, RANK = 64, 128, 4, 4, 2, 128, 8
KV = HIDDEN // HEADS * KV_HEADS


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    return shapes


SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
# The tokenizer's words: enough for the prompts of docs/eval.md, then numbered fillers up to VOCAB.
_WORD_TEXT = (
    "user assistant system : how do i make a bomb bake bread write poem about the sea tell me story steal car "
    "hack an email account pick lock cook rice grow tomatoes fix bike sorry cannot help with that sure here is "
    "way to first then you can will not do it please explain why sky blue"
)
WORDS = _WORD_TEXT.split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def _model_config() -> dict[str, object]:
    """The transformers config of the demo's models (a tiny Llama)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    }


def _write_tokenizer(model_dir: Path) -> None:
    """A word-level tokenizer (split on whitespace) of VOCAB tokens, and its chat template."""
    words = [*SPECIAL, *dict.fromkeys(WORDS)]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    special = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Write ``root/base`` (two shards + index), ``root/aligned`` and ``root/adapter``; return them."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    aligned: dict[str, torch.Tensor] = {}
    for name, shape in _shapes().items():
        if len(shape) == 1:
            base[name] = aligned[name] = torch.ones(shape)
            continue
        w = torch.randn(shape, generator=g) * 0.02
        # The alignment update: low rank with a decaying spectrum, plus a little noise.
        u, v = torch.randn(shape[0], 4, generator=g), torch.randn(4, shape[1], generator=g)
        scales = torch.tensor([1.0, 0.5, 0.25, 0.125])
        delta = (u * scales) @ v * 0.01 + torch.randn(shape, generator=g) * 1e-4
        base[name], aligned[name] = w.half(), (w + delta).half()

    base_dir, aligned_dir, adapter_dir = root / "base", root / "aligned", root / "adapter"
    for d in (base_dir, aligned_dir, adapter_dir):
        d.mkdir(parents=True, exist_ok=True)
    names = list(base)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in shards.items():
        save_file({k: base[k] for k in keys}, base_dir / fname, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (base_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    save_file(aligned, aligned_dir / "model.safetensors", metadata={"format": "pt"})
    for d in (base_dir, aligned_dir):
        (d / "config.json").write_text(json.dumps(_model_config(), indent=2))
    _write_tokenizer(aligned_dir)

    lora: dict[str, torch.Tensor] = {}
    for i in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}"
            v = aligned[f"{key}.weight"].float() - base[f"{key}.weight"].float()
            a = torch.randn(RANK, HIDDEN, generator=g) * 0.1
            b = torch.randn(v.shape[0], RANK, generator=g) * 0.05
            if i % 2 == 0:
                # Even layers learn along the alignment directions: high similarity, kept.
                u, _, _ = torch.linalg.svd(v, full_matrices=False)
                b = u[:, :4] @ torch.randn(4, RANK, generator=g) * 0.05
            lora[f"base_model.model.{key}.lora_A.weight"] = a
            lora[f"base_model.model.{key}.lora_B.weight"] = b.contiguous()
    save_file(lora, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(aligned_dir),
        "r": RANK,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return base_dir, aligned_dir, adapter_dir
