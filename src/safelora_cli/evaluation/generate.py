"""The model, loaded once with transformers: its memory estimated first, prompts put through its
chat template, and answered by batched greedy decoding with left padding.

transformers and peft are the ``hf`` extra; they are imported when a model is loaded, never when
the package is. No code from model files: ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EvalModelError, MissingExtraError, ModelFitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HF_EXTRA = "pip install 'safelora[hf]'"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GiB = float(1 << 30)

Advance = Callable[[int], None]
Progress = Callable[[str, int], Advance]


def no_progress(label: str, total: int) -> Advance:
    return lambda n: None


def require_hf(what: str) -> None:
    """transformers and peft, or the one-line error that says how to install them."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"{what} needs transformers and peft ({e}): {HF_EXTRA}") from None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and advice off while ``eval`` works (its progress is its own,
    and each of its errors is one line); restored afterwards."""
    from transformers.utils import logging as hf_logging

    logging: Any = hf_logging  # partly untyped
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside transformers and peft
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalModelError("device cuda: no CUDA device is available here; evaluate on cpu")
    if device not in ("cpu", "cuda"):
        raise EvalModelError(f"device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bfloat16 matmuls there are slow), bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EvalModelError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def causal_config(spec: str, role: str) -> Any:
    """The transformers config of ``spec``, refused in one line unless it is a causal language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise EvalModelError(f"{role} {spec}: cannot be read as a transformers model ({_short(e)})") from None
    classes: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        classes |= {value} if isinstance(value, str) else set(value)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise EvalModelError(
            f"{role} {spec}: is a {config.model_type} model, which transformers has no causal language model for; "
            "pass a chat model"
        )
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a in classes for a in architectures):
        raise EvalModelError(
            f"{role} {spec}: its architecture {', '.join(architectures)} is not a causal language model "
            "(a …ForCausalLM); pass a chat model"
        )
    return config


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("…" if len(text) > 200 else "")


@dataclass(frozen=True)
class Estimate:
    """What a model needs in memory, by its config, before it is loaded."""

    parameters: int
    weights: int  # bytes
    kv_cache: int  # bytes, for one batch of ``batch`` sequences of ``tokens`` tokens
    batch: int
    tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def describe(self, dtype: torch.dtype) -> str:
        return (
            f"about {self.total / GiB:.2f} GiB ({self.parameters:,} parameters × {_itemsize(dtype)} bytes in "
            f"{str(dtype).removeprefix('torch.')} + {self.kv_cache / GiB:.2f} GiB of KV cache for a batch of "
            f"{self.batch} × {self.tokens} tokens)"
        )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate(config: Any, dtype: torch.dtype, batch: int, tokens: int) -> Estimate:
    """Parameters (counted on the meta device: no memory) × dtype bytes, plus the KV cache of a batch."""
    from transformers import AutoModelForCausalLM

    auto: Any = AutoModelForCausalLM  # from_config is untyped
    with torch.device("meta"):
        skeleton = auto.from_config(config, trust_remote_code=False)
    parameters = sum(p.numel() for p in skeleton.parameters())
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = int(getattr(config, "head_dim", None) or (hidden // heads if heads else 0))
    size = _itemsize(dtype)
    kv = 2 * layers * kv_heads * head_dim * batch * tokens * size
    return Estimate(parameters, parameters * size, kv, batch, tokens)


def available_memory(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (CPU: MemAvailable), or None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_fit(spec: str, role: str, need: Estimate, dtype: torch.dtype, device: torch.device) -> None:
    free = available_memory(device)
    if free is not None and need.total > free:
        raise ModelFitError(
            f"{role} {spec}: needs {need.describe(dtype)}, more than the {free / GiB:.2f} GiB free on {device.type}"
        )


SMALL_MODEL = 50_000_000


@contextmanager
def threads_for(need: Estimate, device: torch.device) -> Iterator[int]:
    """The torch threads a model runs with (yielded), restored afterwards: on CPU, one for a model
    under 50M parameters, whose matrices are too small for intra-op threads to pay for their hand-off
    (a tiny model generated 3 to 12 times slower on two threads than on one); else torch's default."""
    before = torch.get_num_threads()
    threads = 1 if device.type == "cpu" and need.parameters < SMALL_MODEL else before
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


@dataclass
class Loaded:
    """A causal LM and its tokenizer, on ``device`` in ``dtype``, in eval mode."""

    spec: str
    model: Any  # a PreTrainedModel, or the PeftModel wrapping it
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    context: int  # positions the model was trained on (1024 when its config does not say)

    @property
    def pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if isinstance(candidate, int):
                return candidate
        return 0

    @property
    def eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else []


def load_tokenizer(spec: str, role: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalModelError(f"{role} {spec}: its tokenizer cannot be loaded ({_short(e)})") from None


def load(
    spec: str, role: str, config: Any, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, device: torch.device
) -> Loaded:
    """The model's weights, loaded once (after ``require_fit``)."""
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=False, **{dtype_key: dtype})
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise EvalModelError(f"{role} {spec}: cannot be loaded ({_short(e)})") from None
    model.to(device)
    model.eval()
    context = next(
        (int(v) for k in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(config, k, None), int)),
        1024,
    )
    return Loaded(spec, model, tokenizer, device, dtype, context)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str) -> list[int]:
    """``messages`` through the tokenizer's chat template, ready for the assistant's turn."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template raises what its Jinja code raises (roles it refuses, say)
        raise EvalModelError(f"{where}: its chat template refused the conversation ({_short(e)})") from None
    ids: list[int] = tokenizer(str(text), add_special_tokens=False)["input_ids"]
    return ids


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None, where: str) -> list[int]:
    """A prompt as the model reads it: in its chat template (with ``system`` first) when it has one,
    else the plain text (``system`` and a blank line before it)."""
    if tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return encode_chat(tokenizer, messages, where)
    ids: list[int] = tokenizer(f"{system}\n\n{prompt}" if system else prompt)["input_ids"]
    return ids


def generate(
    loaded: Loaded,
    inputs: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    advance: Advance,
    on_halve: Callable[[int], None],
) -> list[str]:
    """Greedy answers to ``inputs`` (token ids), in their order.

    Batches are formed from the inputs sorted by length (stable), so padding stays short and a
    given batch size always forms the same batches. On CUDA an out-of-memory halves the batch
    (``on_halve`` is told the new size) and the batch is tried again; at batch size 1 it is an error.
    """
    from transformers import GenerationConfig

    make: Any = GenerationConfig  # untyped
    config = make(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=loaded.pad_id,
        eos_token_id=loaded.eos_ids or None,
    )
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    answers: list[str] = [""] * len(inputs)
    at, size = 0, batch_size
    while at < len(order):
        chunk = order[at : at + size]
        try:
            outputs = _batch(loaded, [inputs[i] for i in chunk], config)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise ModelFitError(f"{loaded.spec}: out of memory on {loaded.device} with a batch of 1") from None
            size = max(1, size // 2)
            torch.cuda.empty_cache()
            on_halve(size)
            continue
        for i, text in zip(chunk, outputs, strict=True):
            answers[i] = text
        at += len(chunk)
        advance(len(chunk))
    return answers


def _batch(loaded: Loaded, batch: list[list[int]], config: Any) -> list[str]:
    """One left-padded batch, decoded greedily; each answer cut at its first end-of-sequence token."""
    width = max(len(ids) for ids in batch)
    pad = loaded.pad_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    texts = []
    eos = set(loaded.eos_ids)
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(str(loaded.tokenizer.decode(row[:cut], skip_special_tokens=True)).strip())
    return texts


def release(device: torch.device) -> None:
    """Give memory back once a model is dropped (before the judge is loaded)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
