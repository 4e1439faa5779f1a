"""Safe LoRA's math, exactly as docs/method.md states it: pure torch, no I/O.

For one module with V = W_aligned − W_base (out×in), C = V·Vᵀ/‖V‖_F, the similarity is the cosine of
C·B·A and B·A, and a selected module gets B ← C·B. C is never formed: C·B = V·(Vᵀ·B)/‖V‖_F costs
2·out·in·r flops against out²·in for V·Vᵀ (for a 4096×11008 down_proj and r=16, 2.9 GFLOP instead
of 369). A module's ``Operator`` is V and ‖V‖_F, and P is always computed from it, so a run served
by the projection cache and one that is not give identical bytes. With G = A·Aᵀ the cosine reduces
to r×r traces (see ``_cosine_terms``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import NumericError, PrecisionError

Mode = Literal["threshold", "number"]
ROUND_DECIMALS = 5  # the official code rounds before comparing; so do we, for reproducible decisions


@dataclass(frozen=True)
class ModuleMath:
    """What the method says about one module, before selection."""

    similarity: float | None
    projected_b: torch.Tensor | None  # C·B in the compute dtype, on the CPU; None when undefined
    norm_ratio: float | None  # ‖C·B‖_F / ‖B‖_F
    reason: str | None  # why the module cannot be projected, when it cannot


# Bytes of a block of V: a block stays in L2 (about 1 MiB a core here) while it is built from the
# fp16/bf16 weights and its squared norm is taken, instead of streaming all of V through memory for
# each step. Larger blocks spill to L3 (~15% slower); smaller ones only add ops. Fixed, not scaled
# with the thread count: the norm's rounding, hence every result bit, must not depend on it.
_BLOCK_BYTES = 1 << 20


def _block_rows(v: torch.Tensor) -> int:
    """Rows of V per block: ``_BLOCK_BYTES`` worth on the CPU; all of V on accelerators, where a
    loop would only add launches and syncs."""
    rows, cols = v.shape
    return max(1, _BLOCK_BYTES // (cols * v.element_size())) if v.device.type == "cpu" else rows


def build_v(
    w_base: torch.Tensor,
    w_aligned: torch.Tensor,
    out: torch.Tensor,
    names: tuple[str, str] = ("W_base", "W_aligned"),
) -> float:
    """V = W_aligned − W_base as stored, into ``out`` (compute dtype and device); returns ‖V‖²_F.

    One pass over row blocks: each is built in the compute dtype and its squared norm added up in
    Python floats while it is in cache (a float32 norm over all 16M entries of a 4096² V is off by
    ~1e-3; per-block dots by a few 1e-6). NaN/Inf in either weight, or a ‖V‖ the dtype cannot hold,
    raises ``NumericError`` naming the tensor.
    """
    step = _block_rows(out)
    norm2 = 0.0
    for r0 in range(0, out.shape[0], step):
        s = out[r0 : r0 + step]
        # In-place ops with a lower-precision operand promote to the workspace's dtype: V is
        # exact for fp16/bf16 weights, no fp16 subtraction ever happens.
        s.copy_(w_aligned[r0 : r0 + step])
        s.sub_(w_base[r0 : r0 + step].to(out.device))
        flat = s.view(-1)
        norm2 += float(torch.dot(flat, flat))
    if not math.isfinite(math.sqrt(norm2)):
        _check_finite(w_base, names[0])
        _check_finite(w_aligned, names[1])
        raise PrecisionError(f"{names[0]} − {names[1]}: ‖V‖ overflows {out.dtype}")
    return norm2


OperatorKind = Literal["V", "zero"]


@dataclass(frozen=True)
class Operator:
    """All a module's projection needs from the checkpoints: ``V`` (out×in) with ``norm = ‖V‖_F``,
    or ``zero`` when V = 0."""

    kind: OperatorKind
    matrix: torch.Tensor  # V in the compute dtype, contiguous; empty for "zero"
    norm: float  # ‖V‖_F
    out_features: int
    in_features: int


class Projector:
    """Computes ``ModuleMath`` for module after module, reusing its workspaces.

    Fresh multi-megabyte allocations cost more than the arithmetic here (page faults), so V is
    built in buffers that grow to the largest module and are then reused. An operator's matrix
    lives in those buffers (or in the V it was made from): it is valid until the next ``operator``,
    ``operator_from`` or ``load`` call.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self._workspace = torch.empty(0, dtype=dtype, device=self.device)
        self._transposed = torch.empty(0, dtype=dtype, device=self.device)

    def _buffer(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        buf: torch.Tensor = getattr(self, name)
        n = shape[0] * shape[1]
        if buf.numel() < n:
            buf = torch.empty(n, dtype=self.dtype, device=self.device)
            setattr(self, name, buf)
        return buf[:n].view(shape)

    def workspace(self, numel: int) -> torch.Tensor:
        """A flat buffer in the compute dtype and device, for ``build_v`` on another thread."""
        return torch.empty(numel, dtype=self.dtype, device=self.device)

    def operator(
        self,
        w_base: torch.Tensor,
        w_aligned: torch.Tensor,
        *,
        transpose: bool = False,
        names: tuple[str, str] = ("W_base", "W_aligned"),
    ) -> Operator:
        """The operator of one module. ``transpose``: weights are stored in×out (Conv1D)."""
        v = self._buffer("_workspace", (w_base.shape[0], w_base.shape[1]))
        return self.operator_from(v, build_v(w_base, w_aligned, v, names), transpose=transpose)

    def operator_from(self, v: torch.Tensor, norm2: float, *, transpose: bool = False) -> Operator:
        """The operator from ``build_v``'s V (as stored) and ‖V‖²; its matrix is ``v`` itself unless transposed."""
        norm = math.sqrt(norm2)
        if transpose:
            # Contiguous, like an operator loaded from the cache: the same matmul kernels then run
            # on the same layout, so cached and fresh runs give identical bytes.
            vt = self._buffer("_transposed", (v.shape[1], v.shape[0]))
            vt.copy_(v.T)
            v = vt
        out, inp = v.shape
        if norm == 0.0:
            return Operator("zero", v[:0, :0], 0.0, out, inp)
        return Operator("V", v, norm, out, inp)

    def load(self, kind: OperatorKind, data: torch.Tensor, norm: float, out: int, inp: int) -> Operator:
        """An operator from stored values (the cache), copied into this projector's workspace."""
        if kind == "zero":
            return Operator("zero", data.new_empty(0, 0), 0.0, out, inp)
        m = self._buffer("_workspace", (out, inp))
        m.copy_(data.view(m.shape))
        return Operator(kind, m, norm, out, inp)

    def apply(
        self,
        op: Operator,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        names: tuple[str, str] = ("lora_A", "lora_B"),
    ) -> ModuleMath:
        """Similarity and C·B for one module, from its operator."""
        _check_finite(lora_a, names[0])
        _check_finite(lora_b, names[1])
        if op.kind == "zero":
            return ModuleMath(None, None, None, "V = 0: aligned equals base for this module")
        b = lora_b.to(self.device, self.dtype)
        a = lora_a.to(self.device, self.dtype)
        p = _project(op.matrix, b)
        p.div_(op.norm)
        # Every scalar in one transfer: on a GPU each read of a value is a wait for the device.
        norms = torch.stack([torch.linalg.vector_norm(b), torch.linalg.vector_norm(p)]).double()
        b_norm, p_norm, ba, pa, cross = torch.cat([norms, _cosine_terms(a, b, p)]).tolist()
        ratio = p_norm / b_norm if b_norm > 0 else None
        sim, reason = _cosine(ba, pa, cross)
        return ModuleMath(sim, p.cpu() if reason is None else None, ratio, reason)

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
        op = self.operator(w_base, w_aligned, transpose=transpose, names=(names[0], names[1]))
        return self.apply(op, lora_a, lora_b, (names[2], names[3]))


def _project(v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """V·(Vᵀ·B), over row blocks of V: Vᵀ·B from the last block to the first, then V·X from the first.

    V was just built first row to last, so its last rows are still in cache (L3 holds ~40 of a
    4096² V's 64 MB here): the backward pass reads them first and leaves the first rows in cache
    for the forward one, so part of each pass reads cache instead of memory (one 4096² module is
    ~12% faster on one thread here).
    """
    step = _block_rows(v)
    starts = range(0, v.shape[0], step)
    xt = v.new_zeros(b.shape[1], v.shape[1])
    for r0 in reversed(starts):
        xt.addmm_(b[r0 : r0 + step].T, v[r0 : r0 + step])
    x = xt.T.contiguous()
    p = v.new_empty(v.shape[0], b.shape[1])
    for r0 in starts:
        torch.mm(v[r0 : r0 + step], x, out=p[r0 : r0 + step])
    return p


def _cosine_terms(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """⟨B·A, B·A⟩, ⟨P·A, P·A⟩ and ⟨B·A, P·A⟩ from r×r products: ⟨X·A, Y·A⟩ = Σ (Xᵀ·Y) ∘ G, G = A·Aᵀ.

    Taken in float64: they cost out·r² flops, and float64 keeps the rounded similarity, hence the
    decision, identical on CPU and GPU. A rank above min(in, out) (which PEFT allows) would make
    the r×r matrices larger than the update itself (r = 60000 on a 64×64 module: 28.8 GB), so then
    the products of the smaller side are taken instead: B·A and P·A (out×in) a block of rows at a time.
    """
    rank, inp = a.shape
    if rank > min(inp, b.shape[0]):
        return _cosine_terms_by_rows(a, b, p)
    a64, b64, p64 = a.double(), b.double(), p.double()
    g = a64 @ a64.T
    return torch.stack([((x.T @ y) * g).sum() for x, y in ((b64, b64), (p64, p64), (b64, p64))])


def _cosine_terms_by_rows(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``_cosine_terms`` from the out×in products themselves, over blocks of rows of ~16 MB each."""
    a64 = a.double()
    rows = max(1, (16 << 20) // (8 * max(a.shape)))
    terms = torch.zeros(3, dtype=torch.float64, device=a.device)
    for r0 in range(0, b.shape[0], rows):
        x = b[r0 : r0 + rows].double() @ a64
        y = p[r0 : r0 + rows].double() @ a64
        terms += torch.stack([(x * x).sum(), (y * y).sum(), (x * y).sum()])
    return terms


def _cosine(ba: float, pa: float, cross: float) -> tuple[float | None, str | None]:
    """cos_F(P·A, B·A) from ``_cosine_terms``, or why it is undefined."""
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
