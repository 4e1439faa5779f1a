"""Tiny real models and real PEFT adapters for the tests (transformers + peft, no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel


def llama_config(**overrides: Any) -> LlamaConfig:
    """4 layers, hidden 64, GQA with 2 KV heads: q_proj 64×64, k/v_proj 32×64."""
    kw: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def _perturb(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The "aligned" twin: a low-rank update with a decaying spectrum plus noise on 2-D decoder weights."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in state.items():
        if w.ndim == 2 and ("layers." in name or ".h." in name or name.startswith("h.")):
            rows, cols = w.shape
            u, v = torch.randn(rows, 4, generator=g), torch.randn(4, cols, generator=g)
            delta = (u * torch.tensor([1.0, 0.5, 0.25, 0.125])) @ v * 0.02 + torch.randn(w.shape, generator=g) * 1e-3
            out[name] = (w.float() + delta).to(w.dtype)
        else:
            out[name] = w.clone()
    return out


def save_pair(
    model_cls: type[PreTrainedModel],
    config: Any,
    root: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = "50KB",
    seed: int = 0,
) -> tuple[Path, Path]:
    """Save ``root/base`` and ``root/aligned`` (aligned = base + low-rank update) with save_pretrained."""
    torch.manual_seed(seed)
    base = model_cls(config).to(dtype)
    base_dir, aligned_dir = root / "base", root / "aligned"
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    base.save_pretrained(base_dir, **kw)
    aligned = model_cls(config).to(dtype)
    aligned.load_state_dict(_perturb(base.state_dict(), seed + 1))
    aligned.save_pretrained(aligned_dir, **kw)
    return base_dir, aligned_dir


def llama_pair(root: Path, **kw: Any) -> tuple[Path, Path]:
    return save_pair(LlamaForCausalLM, llama_config(), root, **kw)


def gpt2_pair(root: Path, **kw: Any) -> tuple[Path, Path]:
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return save_pair(GPT2LMHeadModel, config, root, **kw)


def randomize_lora(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """PEFT initialises lora_B to zeros; give every LoRA weight random values instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def make_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    model_cls: type[PreTrainedModel] = LlamaForCausalLM,
    seed: int = 0,
    **lora_kwargs: Any,
) -> Path:
    """A real PEFT LoRA adapter trained (randomly) on ``model_dir``, saved to ``out_dir``."""
    model = model_cls.from_pretrained(model_dir)
    kw: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    kw.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**kw))
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return out_dir
