"""Safe LoRA written literally from docs/method.md, in dense float64, for the tests to compare against.

It materialises everything the real code is careful never to form (C is out×out, ΔW is out×in) and
shares no code with ``safelora_cli``: the two agree only if both follow the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def v_matrix(w_base: torch.Tensor, w_aligned: torch.Tensor, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """V = W_aligned − W_base as out×in; Conv1D checkpoints (fan_in_fan_out) store the weight in×out."""
    v = w_aligned.double() - w_base.double()
    return v.T if fan_in_fan_out else v


def c_matrix(v: torch.Tensor) -> torch.Tensor:
    """C = V·Vᵀ / ‖V‖_F (out×out), with the Frobenius norm of the whole of V."""
    return v @ v.T / torch.linalg.matrix_norm(v, ord="fro")


def similarity(c: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    """The cosine of the flattened matrices C·ΔW and ΔW, with ΔW = B·A (the scale s cancels)."""
    delta = lora_b.double() @ lora_a.double()
    projected = (c @ delta).flatten()
    delta = delta.flatten()
    return float(projected @ delta / (projected.norm() * delta.norm()))


def projected_b(c: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The new lora_B of a selected module: C·B."""
    return c @ lora_b.double()


def select_threshold(similarities: Sequence[float], tau: float) -> list[bool]:
    """Threshold mode: project every module whose similarity, rounded to 5 decimals, is ≤ τ."""
    return [round(s, 5) <= tau for s in similarities]


def select_number(similarities: Sequence[float], k: int) -> tuple[float, list[bool]]:
    """Number mode: τ_k is the k-th smallest rounded similarity; every module at or below it is projected."""
    tau_k = sorted(round(s, 5) for s in similarities)[k - 1]
    return tau_k, select_threshold(similarities, tau_k)
