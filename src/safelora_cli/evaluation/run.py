"""One evaluation, end to end: read the files, load the model once, answer every prompt with every
variant (the model alone, each adapter, each original found), judge, and compute the figures.

Nothing here writes: the adapters are read through safelora's reader, their bytes handed to PEFT in
memory. The files ``eval`` writes (records, summary, model card) are the caller's.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..errors import EvalModelError, UsageError
from . import generate as gen
from .judges import Markers, conversation, parse_verdict, read_markers
from .perplexity import perplexity
from .prompts import PromptSet, read_prompts, read_text
from .result import BENIGN, HARMFUL, Comparison, EvalResult, Record, Score, UtilityText, Variant
from .stats import discordant, holm, mcnemar_exact
from .variants import Weights, attach, read_all

JUDGE_TOKENS = 16  # a verdict is a word or two: "unsafe\nS1"
MARKER_WARNING = (
    "refusal markers are a crude judge: a refusal that then complies counts as a refusal, and a harmful answer "
    "without any marker as compliance; read the records, or judge again with a classifier"
)


def evaluate(
    model: str,
    adapters: Sequence[str],
    *,
    prompts: Path,
    benign: Path | None = None,
    utility: Path | None = None,
    refusal_markers: Path | None = None,
    judge: str | None = None,
    system_prompt: str | None = None,
    prompt_column: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    original: str | None = None,
    progress: gen.Progress = gen.no_progress,
) -> EvalResult:
    """See ``api.evaluate``."""
    gen.require_hf("eval")
    with gen.quiet_transformers():
        return _evaluate(
            model,
            adapters,
            prompts=prompts,
            benign=benign,
            utility=utility,
            refusal_markers=refusal_markers,
            judge=judge,
            system_prompt=system_prompt,
            prompt_column=prompt_column,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            original=original,
            progress=progress,
        )


def _evaluate(
    model: str,
    adapters: Sequence[str],
    *,
    prompts: Path,
    benign: Path | None,
    utility: Path | None,
    refusal_markers: Path | None,
    judge: str | None,
    system_prompt: str | None,
    prompt_column: str | None,
    max_new_tokens: int,
    batch_size: int,
    dtype: str,
    device: str,
    original: str | None,
    progress: gen.Progress,
) -> EvalResult:
    if max_new_tokens < 1 or batch_size < 1:
        raise UsageError("max_new_tokens and batch_size must be at least 1")
    if original is not None and len(adapters) != 1:
        raise UsageError("original names the original of one adapter: give exactly one adapter with it")
    sets = [read_prompts(Path(prompts), HARMFUL, "prompts", prompt_column)]
    if benign is not None:
        sets.append(read_prompts(Path(benign), BENIGN, "benign", prompt_column))
    markers = read_markers(Path(refusal_markers) if refusal_markers is not None else None)
    text = read_text(Path(utility), "utility") if utility is not None else None
    run_device = gen.resolve_device(device)
    run_dtype = gen.resolve_dtype(dtype, run_device)
    notes: list[str] = []
    with read_all(list(adapters), original, notes) as weights:
        config = gen.causal_config(model, "model")
        tokenizer = gen.load_tokenizer(model, "model")
        if not tokenizer.chat_template:
            notes.append(f"model {model}: its tokenizer has no chat template; prompts are given as plain text")
        inputs = {
            s.name: [gen.encode_prompt(tokenizer, p, system_prompt, f"model {model}") for p in s.prompts] for s in sets
        }
        longest = max(len(ids) for ids in (i for s in inputs.values() for i in s))
        need = gen.estimate(config, run_dtype, batch_size, longest + max_new_tokens)
        gen.require_fit(model, "model", need, run_dtype, run_device)
        with gen.threads_for(need, run_device) as threads:
            loaded = gen.load(model, "model", config, tokenizer, run_dtype, run_device)
            peft_model, adapter_names = attach(loaded.model, weights, model)
            if peft_model is not None:
                loaded.model = peft_model
            variants = [Variant("model", "model", None, None)] + [_variant(w) for w in weights]
            answers, final_batch = _answer_all(
                loaded, variants, adapter_names, inputs, max_new_tokens, batch_size, progress, notes
            )
            ppl = {}
            if text is not None:
                ids: list[int] = tokenizer("\n".join(text.text.splitlines()))["input_ids"]
                if len(ids) < 2:
                    raise EvalModelError(f"utility {text.path}: fewer than 2 tokens; give a longer text")
                for v in variants:
                    with _active(loaded.model, adapter_names.get(v.name)):
                        ppl[v.name] = perplexity(loaded.model, ids, loaded.context, run_device)
            del loaded, peft_model
    gen.release(run_device)
    verdicts = _judge(judge, sets[0], variants, answers, run_dtype, run_device, batch_size, progress) if judge else None
    records = _records(variants, sets, answers, markers, verdicts)
    scored = tuple(_scored(v, records, sets, ppl.get(v.name)) for v in variants)
    if judge is None:
        notes.append(MARKER_WARNING)
    settings = _settings(
        max_new_tokens, batch_size, final_batch, run_dtype, run_device, threads, system_prompt, tokenizer
    )
    return EvalResult(
        model=model,
        judge=_judge_json(judge, markers),
        judge_text=_judge_text(judge, markers),
        prompt_sets=tuple(sets),
        utility=None if text is None else UtilityText(str(text.path), text.sha256),
        settings=settings,
        variants=scored,
        comparisons=_comparisons(weights, records, sets),
        records=tuple(records),
        notes=tuple(notes),
    )


def _variant(w: Weights) -> Variant:
    return Variant(w.name, w.kind, str(w.path), w.digest, w.source, w.original_path)


def _active(model: Any, adapter_name: str | None) -> Any:
    """The context a variant runs in: its PEFT adapter set, or every adapter off (the model alone)."""
    if adapter_name is None:
        return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    model.set_adapter(adapter_name)
    return nullcontext()


def _answer_all(
    loaded: gen.Loaded,
    variants: list[Variant],
    adapter_names: dict[str, str],
    inputs: dict[str, list[list[int]]],
    max_new_tokens: int,
    batch_size: int,
    progress: gen.Progress,
    notes: list[str],
) -> tuple[dict[tuple[str, str], list[str]], int]:
    """Every variant's answers to every set, by (variant, set); and the batch size it ended with."""
    advance = progress("generating", len(variants) * sum(len(v) for v in inputs.values()))
    size = batch_size

    def halved(new: int) -> None:
        nonlocal size
        size = new
        notes.append(f"out of memory on {loaded.device}: batch size halved to {new}")

    answers: dict[tuple[str, str], list[str]] = {}
    for v in variants:
        for name, ids in inputs.items():
            with _active(loaded.model, adapter_names.get(v.name)):
                answers[(v.name, name)] = gen.generate(
                    loaded, ids, max_new_tokens=max_new_tokens, batch_size=size, advance=advance, on_halve=halved
                )
    return answers, size


def _judge(
    judge: str,
    harmful: PromptSet,
    variants: list[Variant],
    answers: dict[tuple[str, str], list[str]],
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    progress: gen.Progress,
) -> dict[str, list[str]]:
    """The judge's verdict (safe/unsafe) on each variant's answer to each harmful prompt."""
    config = gen.causal_config(judge, "judge")
    tokenizer = gen.load_tokenizer(judge, "judge")
    if not tokenizer.chat_template:
        raise EvalModelError(
            f"judge {judge}: its tokenizer has no chat template; a Llama Guard-style judge formats the conversation "
            "with its own"
        )
    inputs = {
        v.name: [
            gen.encode_chat(tokenizer, conversation(p, r), f"judge {judge}")
            for p, r in zip(harmful.prompts, answers[(v.name, HARMFUL)], strict=True)
        ]
        for v in variants
    }
    longest = max(len(i) for ids in inputs.values() for i in ids)
    need = gen.estimate(config, dtype, batch_size, longest + JUDGE_TOKENS)
    gen.require_fit(judge, "judge", need, dtype, device)
    with gen.threads_for(need, device):
        return _verdicts(
            judge,
            gen.load(judge, "judge", config, tokenizer, dtype, device),
            harmful,
            variants,
            inputs,
            batch_size,
            progress,
        )


def _verdicts(
    judge: str,
    loaded: gen.Loaded,
    harmful: PromptSet,
    variants: list[Variant],
    inputs: dict[str, list[list[int]]],
    batch_size: int,
    progress: gen.Progress,
) -> dict[str, list[str]]:
    advance = progress("judging", sum(len(i) for i in inputs.values()))
    verdicts: dict[str, list[str]] = {}
    for v in variants:
        said = gen.generate(
            loaded,
            inputs[v.name],
            max_new_tokens=JUDGE_TOKENS,
            batch_size=batch_size,
            advance=advance,
            on_halve=lambda n: None,
        )
        parsed = []
        for number, text in enumerate(said, 1):
            verdict = parse_verdict(text)
            if verdict is None:
                shown = " ".join(text.split())[:80]
                raise EvalModelError(
                    f"judge {judge}: answered {shown!r} to prompt {number} of {harmful.path} ({v.name}), neither safe "
                    "nor unsafe; pass a Llama Guard-style classifier"
                )
            parsed.append(verdict)
        verdicts[v.name] = parsed
    return verdicts


def _records(
    variants: list[Variant],
    sets: list[PromptSet],
    answers: dict[tuple[str, str], list[str]],
    markers: Markers,
    verdicts: dict[str, list[str]] | None,
) -> list[Record]:
    records = []
    for v in variants:
        for s in sets:
            for i, (prompt, response) in enumerate(zip(s.prompts, answers[(v.name, s.name)], strict=True)):
                if verdicts is not None and s.name == HARMFUL:
                    verdict = verdicts[v.name][i]
                    records.append(Record(v.name, s.name, prompt, response, verdict == "safe", verdict))
                else:
                    records.append(Record(v.name, s.name, prompt, response, markers.refused(response)))
    return records


def _outcomes(records: list[Record], variant: str, name: str) -> list[bool]:
    return [r.refused for r in records if r.variant == variant and r.set == name]


def _scored(v: Variant, records: list[Record], sets: list[PromptSet], ppl: Any) -> Variant:
    scores = {}
    for s in sets:
        outcomes = _outcomes(records, v.name, s.name)
        scores[s.name] = Score(sum(outcomes), len(outcomes))
    return Variant(v.name, v.kind, v.path, v.digest, v.source, v.original_path, scores, ppl)


def _comparisons(weights: list[Weights], records: list[Record], sets: list[PromptSet]) -> tuple[Comparison, ...]:
    """Each adapter against its original (when evaluated) and against the model alone, on each set;
    Holm across all of them."""
    pairs: list[tuple[str, str, str]] = []
    for i, w in enumerate(weights):
        if w.kind != "adapter":
            continue
        others = ["model"]
        if i + 1 < len(weights) and weights[i + 1].kind == "original":
            others.insert(0, weights[i + 1].name)
        pairs += [(w.name, other, s.name) for other in others for s in sets]
    tests = []
    for variant, other, name in pairs:
        b, c = discordant(_outcomes(records, variant, name), _outcomes(records, other, name))
        tests.append((variant, other, name, b, c, mcnemar_exact(b, c)))
    adjusted = holm([t[5] for t in tests])
    return tuple(Comparison(*t, p_holm=a) for t, a in zip(tests, adjusted, strict=True))


def _settings(
    max_new_tokens: int,
    batch_size: int,
    final_batch: int,
    dtype: torch.dtype,
    device: torch.device,
    threads: int,
    system_prompt: str | None,
    tokenizer: Any,
) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "batch_size_final": final_batch,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": threads,
        "system_prompt": system_prompt,
        "chat_template": bool(tokenizer.chat_template),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def _judge_json(judge: str | None, markers: Markers) -> dict[str, Any]:
    doc: dict[str, Any] = {"harmful": {"kind": "classifier", "model": judge} if judge else markers.to_json()}
    doc["benign"] = markers.to_json()
    return doc


def _judge_text(judge: str | None, markers: Markers) -> str:
    if judge is None:
        return markers.describe() + " (a crude judge)"
    return f"{judge} (Llama Guard-style classifier) on the harmful set; {markers.describe()} on the benign set"
