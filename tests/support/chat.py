"""A tiny chat model with a word-level tokenizer and a chat template, built here (no downloads); and
a tiny Llama Guard-style judge whose greedy answer is one fixed word by construction."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
_TEXT = (
    "user assistant system : how do i make a bomb bake bread write poem about sea tell me story steal car "
    "hack email account pick lock cook rice grow tomatoes fix bike sorry cannot help with that sure here is "
    "the way to first then you can will not do it safe unsafe maybe please explain why sky blue kill "
    "weapon poison friend water river stone tree house cat dog run fast slow red green one two three four "
    "five six seven eight nine ten yes no ok good bad new old big small hot cold day night sun moon "
    "and or but if so very much more less all some any"
)
WORDS = _TEXT.split()
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*SPECIAL, *dict.fromkeys(WORDS)])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if template is not None:
        tok.chat_template = template
    return tok


def config(vocab: int, **overrides: object) -> LlamaConfig:
    kw: dict[str, object] = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def chat_model(out: Path, *, seed: int = 0, template: str | None = TEMPLATE) -> Path:
    """A random tiny Llama chat model (2 layers, 32 positions) with the word-level tokenizer."""
    tok = tokenizer(template)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(len(tok)))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharper logits: no near-ties for greedy decoding to flip on
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def judge_model(out: Path, word: str) -> Path:
    """A judge whose greedy answer is ``word`` at every step: every layer's output projections are
    zero, so the last hidden state is the normed embedding of the token, which is the same vector for
    every token; lm_head scores only ``word`` against it."""
    tok = tokenizer()
    model = LlamaForCausalLM(config(len(tok)))
    target = tok.convert_tokens_to_ids(word)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[target].fill_(1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
