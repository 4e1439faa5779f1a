"""Perplexity on a utility text: a sliding window, each token scored once.

The text is tokenized whole. A window of ``min(context, 1024)`` tokens moves by half its length;
each window scores only the tokens the previous window did not, each with the window's tokens
before it as its context (so every token but the first is scored, most with at least half a window
of context). Perplexity is ``exp`` of the mean negative log-likelihood over the scored tokens,
summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

MAX_WINDOW = 1024


@dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int  # tokens scored
    window: int
    stride: int

    def to_json(self) -> dict[str, object]:
        value = self.value if math.isfinite(self.value) else None  # JSON has no infinity
        return {"perplexity": value, "tokens": self.tokens, "window": self.window, "stride": self.stride}


def windows(length: int, window: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``length`` tokens."""
    stride = max(1, window // 2)
    spans: list[tuple[int, int, int]] = []
    scored_to = 1  # position 0 has no context: never scored
    begin = 0
    while scored_to < length:
        end = min(begin + window, length)
        if end > scored_to:
            spans.append((begin, end, scored_to))
            scored_to = end
        begin += stride
    return spans


def perplexity(model: Any, ids: list[int], context: int, device: torch.device) -> Perplexity:
    """The perplexity of ``model`` on the token ids ``ids`` (at least two)."""
    window = max(2, min(context, MAX_WINDOW))
    total = 0.0
    count = 0
    with torch.inference_mode():
        for begin, end, first in windows(len(ids), window):
            chunk = torch.tensor([ids[begin:end]], device=device)
            logits = model(input_ids=chunk).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)  # row j predicts token j + 1
            targets = chunk[0, 1:]
            picked = logp.gather(1, targets[:, None])[:, 0]
            scored = picked[first - begin - 1 :]
            total -= float(scored.double().sum())
            count += scored.numel()
    mean = total / count
    value = math.exp(mean) if mean < 700 else math.inf  # exp overflows a double past ~709; NaN stays NaN
    return Perplexity(value, count, window, max(1, window // 2))
