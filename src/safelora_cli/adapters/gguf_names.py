"""The closed table of GGUF LoRA layouts safelora reads: GGUF tensor names → Hugging Face modules,
and whether llama.cpp's converter permuted the rows of ``attn_q``/``attn_k``.

A GGUF LoRA file does not say which Hugging Face class it came from, nor whether its q/k rows were
reordered: ``convert_lora_to_gguf.py`` permutes them for the classes it converts as ``LlamaModel``
(rotary halves interleaved, per head; k with ``num_key_value_heads``) and not for Qwen2, Qwen3 or
Gemma. So a layout is looked up by (``general.architecture``, the base ``config.json``'s
``architectures[0]``), and anything not in the table is refused: a guess would project the wrong rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import AdapterError


@dataclass(frozen=True)
class Entry:
    """One supported layout: whether attn_q/attn_k rows are in llama.cpp's permuted order."""

    gguf_arch: str
    hf_class: str
    permuted: bool


TABLE: dict[tuple[str, str], Entry] = {
    (e.gguf_arch, e.hf_class): e
    for e in (
        Entry("llama", "LlamaForCausalLM", permuted=True),
        Entry("llama", "MistralForCausalLM", permuted=True),
        Entry("qwen2", "Qwen2ForCausalLM", permuted=False),
        Entry("qwen3", "Qwen3ForCausalLM", permuted=False),
        Entry("gemma", "GemmaForCausalLM", permuted=False),
    )
}
ARCHITECTURES = frozenset(arch for arch, _ in TABLE)

# The block tensors every entry names alike (llama.cpp's tensor map), and the head.
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"^blk\.(?P<layer>0|[1-9][0-9]{0,5})\.(?P<part>[a-z_]+)\.weight\.lora_(?P<ab>[ab])$")
_HEAD = re.compile(r"^output\.weight\.lora_(?P<ab>[ab])$")
PERMUTED_PARTS = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def supported() -> str:
    """The table as a message lists it."""
    return ", ".join(f"{e.gguf_arch} from {e.hf_class}" for e in TABLE.values())


def entry(gguf_arch: str, hf_class: str | None, where: str) -> Entry:
    """The entry for this pair of names; ``AdapterError`` naming what is supported otherwise."""
    found = TABLE.get((gguf_arch, hf_class or ""))
    if found is None:
        base = f"a base of class {hf_class}" if hf_class else "a base without config.json architectures"
        raise AdapterError(
            f"{where}: a GGUF LoRA for {gguf_arch!r} on {base} is not in safelora's table of GGUF layouts "
            f"(supported: {supported()}); pass the base the GGUF was converted from, or project the PEFT adapter"
        )
    return found


def split(name: str) -> tuple[str, str, int | None, str] | None:
    """(Hugging Face module, GGUF part, layer, ``a`` or ``b``) of a LoRA tensor name; None when the
    table does not name it."""
    m = _NAME.match(name)
    if m is not None and m["part"] in _BLOCK:
        layer = int(m["layer"])
        return f"model.layers.{layer}.{_BLOCK[m['part']]}", m["part"], layer, m["ab"]
    h = _HEAD.match(name)
    if h is not None:
        return "lm_head", "output", None, h["ab"]
    return None
