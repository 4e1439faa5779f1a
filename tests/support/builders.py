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


def qwen2_pair(root: Path, **kw: Any) -> tuple[Path, Path]:
    """2 layers, hidden 64, GQA; q/k/v_proj carry biases (``q_proj.bias``) as in Qwen2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return save_pair(Qwen2ForCausalLM, config, root, **kw)


def make_native_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    model_cls: type[PreTrainedModel] = LlamaForCausalLM,
    dtype: torch.dtype,
    seed: int = 0,
    **lora_kwargs: Any,
) -> Path:
    """Like ``make_adapter``, but the LoRA weights keep ``dtype`` (PEFT would upcast them to float32)."""
    model = model_cls.from_pretrained(model_dir, dtype=dtype)
    kw: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    kw.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**kw), autocast_adapter_dtype=False)
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return out_dir


def save_checkpoint(state: dict[str, torch.Tensor], out_dir: Path, layout: str, shards: int = 3) -> Path:
    """Write a state dict as transformers would: ``layout`` is one of
    ``safetensors``, ``safetensors-sharded``, ``bin``, ``bin-sharded`` (shards + index)."""
    import json

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    ext, stem = ("safetensors", "model") if layout.startswith("safetensors") else ("bin", "pytorch_model")

    def write(part: dict[str, torch.Tensor], name: str) -> None:
        if ext == "safetensors":
            save_file(part, str(out_dir / name), metadata={"format": "pt"})
        else:
            torch.save(part, out_dir / name)

    if not layout.endswith("-sharded"):
        write(state, f"{stem}.{ext}")
        return out_dir
    names = list(state)
    weight_map = {}
    for i in range(shards):
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in names[i * len(names) // shards : (i + 1) * len(names) // shards]}
        write(part, shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    index["weight_map"] = weight_map
    (out_dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, whatever its layout (safetensors or .bin, sharded or not)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    for f in sorted(model_dir.glob("*.bin")):
        state.update(torch.load(f, weights_only=True))
    return state
