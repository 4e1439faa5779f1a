"""Safe LoRA's math, exactly as SPEC.md: pure torch, no I/O.

For one module with V = W_aligned − W_base (out×in), C = V·Vᵀ/‖V‖_F, the similarity is the cosine of
C·B·A and B·A, and a selected module gets B ← C·B. Nothing out×out or out×in beyond V itself is
ever formed: C·B = V·(Vᵀ·B)/‖V‖_F costs 2·out·in·r flops instead of out²·in, and with G = A·Aᵀ the
cosine reduces to r×r traces (see ``_cosine``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import NumericError

Mode = Literal["threshold", "number"]
ROUND_DECIMALS = 5  # the official code rounds before comparing; so do we, for reproducible decisions


@dataclass(frozen=True)
class ModuleMath:
    """What the method says about one module, before selection."""

    similarity: float | None
    projected_b: torch.Tensor | None  # C·B in the compute dtype, on the CPU; None when undefined
    norm_ratio: float | None  # ‖C·B‖_F / ‖B‖_F
    reason: str | None  # why the module cannot be projected, when it cannot


# Bytes of a block of V per compute thread: each thread's share stays in its L2 (about 1 MiB a core
# here) while the block is built from the fp16/bf16 weights and used, instead of streaming all of V
# through memory for each of the build, the norm and Vᵀ·B. Larger shares spill to L3 (~15% slower
# on one thread); smaller ones only add ops, each ending in a wait for every thread.
_BLOCK_BYTES_PER_THREAD = 1 << 20


class Projector:
    """Computes ``ModuleMath`` for module after module, reusing one workspace for V.

    Fresh multi-megabyte allocations cost more than the arithmetic here (page faults), so V is
    built in a buffer that grows to the largest module and is then reused.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self._workspace = torch.empty(0, dtype=dtype, device=self.device)

    def _project(
        self, w_base: torch.Tensor, w_aligned: torch.Tensor, b: torch.Tensor, transpose: bool
    ) -> tuple[float, torch.Tensor]:
        """‖V‖²_F and V·Vᵀ·B in one pass over row blocks of the stored weights S.

        Each block S_k = (W_aligned − W_base)[rows] is built in the compute dtype, then used while
        it is in cache: its squared norm is added up in Python floats (a float32 norm over all 16M
        entries of a 4096² V is off by ~1e-3; per-block dots by a few 1e-6), and
        - V = S (out×in): Vᵀ·B = Σ S_kᵀ·B_k is accumulated, and V·(Vᵀ·B) is one matmul over the
          V kept in the workspace;
        - V = Sᵀ (Conv1D): V·Vᵀ·B = Sᵀ·(S·B) = Σ S_kᵀ·(S_k·B) is accumulated directly.
        """
        rows, cols = w_base.shape
        if self.device.type == "cpu":
            block_bytes = _BLOCK_BYTES_PER_THREAD * torch.get_num_threads()
            step = max(1, block_bytes // (cols * self.dtype.itemsize))
        else:
            step = rows  # one block: on accelerators the loop would only add launches and syncs
        n = rows * cols
        if self._workspace.numel() < n:
            self._workspace = torch.empty(n, dtype=self.dtype, device=self.device)
        v = self._workspace[:n].view(rows, cols)
        out = torch.zeros((cols, b.shape[1]) if transpose else (b.shape[1], cols), dtype=self.dtype, device=self.device)
        norm2 = 0.0
        for r0 in range(0, rows, step):
            s = v[r0 : r0 + step]
            # In-place ops with a lower-precision operand promote to the workspace's dtype: V is
            # exact for fp16/bf16 weights, no fp16 subtraction ever happens.
            s.copy_(w_aligned[r0 : r0 + step])
            s.sub_(w_base[r0 : r0 + step].to(self.device))
            flat = s.view(-1)
            norm2 += float(torch.dot(flat, flat))
            if transpose:
                out.addmm_(s.T, s @ b)
            else:
                out.addmm_(b[r0 : r0 + step].T, s)
        if transpose:
            return norm2, out
        return norm2, v @ out.T

    def compute(
        self,
        w_base: torch.Tensor,
        w_aligned: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        *,
        transpose: bool = False,
        names: tuple[str, str, str, str] = ("W_base", "W_aligned", "lora_A", "lora_B"),
    ) -> ModuleMath:
        """Similarity and C·B for one module. ``transpose``: weights are stored in×out (Conv1D)."""
        _check_finite(lora_a, names[2])
        _check_finite(lora_b, names[3])
        b = lora_b.to(self.device, self.dtype)
        a = lora_a.to(self.device, self.dtype)
        norm2, p = self._project(w_base, w_aligned, b, transpose)
        norm = math.sqrt(norm2)
        if not math.isfinite(norm):
            _check_finite(w_base, names[0])
            _check_finite(w_aligned, names[1])
            raise NumericError(f"{names[0]} − {names[1]}: ‖V‖ overflows {self.dtype}; use --precision float64")
        if norm == 0.0:
            return ModuleMath(None, None, None, "V = 0: aligned equals base for this module")
        p.div_(norm)
        b_norm = float(torch.linalg.vector_norm(b))
        ratio = float(torch.linalg.vector_norm(p)) / b_norm if b_norm > 0 else None
        sim, reason = _cosine(a, b, p)
        return ModuleMath(sim, p.cpu() if reason is None else None, ratio, reason)


def _cosine(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> tuple[float | None, str | None]:
    """cos_F(P·A, B·A) from r×r products: ⟨P·A, B·A⟩ = tr(Bᵀ·P·G) etc. with G = A·Aᵀ.

    The r×r products are taken in float64: they cost out·r² flops, and float64 keeps the rounded
    similarity, hence the decision, identical on CPU and GPU.
    """
    a64, b64, p64 = a.double(), b.double(), p.double()
    g = a64 @ a64.T
    ba = float(((b64.T @ b64) * g).sum())
    pa = float(((p64.T @ p64) * g).sum())
    cross = float(((b64.T @ p64) * g).sum())
    if ba <= 0.0:
        return None, "B·A = 0 (an untrained adapter?): similarity undefined"
    if pa <= 0.0:
        return None, "C·B·A = 0: the update is orthogonal to V, similarity undefined"
    return cross / math.sqrt(pa * ba), None


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NumericError(f"{name}: contains NaN or Inf; fix or re-export the tensor")


def rounded(sim: float) -> float:
    """The similarity as compared against τ."""
    return round(sim, ROUND_DECIMALS)


def select(
    similarities: Sequence[float | None], mode: Mode, threshold: float, num_layers: int | None
) -> tuple[float | None, list[bool]]:
    """Which modules to project, and the τ actually used.

    threshold mode: rounded sim ≤ τ. number mode: τ_k is the k-th smallest rounded similarity and
    every module at or below it is selected (ties included). Undefined similarities never are.
    """
    defined = [rounded(s) for s in similarities if s is not None]
    if mode == "number":
        if num_layers is None or num_layers < 1:
            raise ValueError("number mode needs num_layers >= 1")
        if not defined:
            return None, [False] * len(similarities)
        tau = sorted(defined)[min(num_layers, len(defined)) - 1]
    else:
        tau = threshold
    return tau, [s is not None and rounded(s) <= tau for s in similarities]
