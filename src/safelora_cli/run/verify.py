"""Verification by recomputation: the original adapter projected again against the pair, with the
settings the stamp records, must reproduce the adapter being checked.

The original is projected in memory's terms (into a private temporary directory that is deleted
afterwards, with a throwaway backup store so nothing is recorded on this machine), from the
checkpoints' own weights: never from the shared projection cache. Every module is projected (τ = ∞)
so that both outcomes of each decision are at hand; the decisions are then taken here from the
recomputed similarities and the recorded settings, and the adapter must hold, for each module:

- the decision: the same, except for a module whose recomputed similarity lies within 1e-6 of a
  rounding boundary of ``projection.rounded`` or of τ, which may go either way;
- lora_B: projected, ‖B − B_recomputed‖_F ≤ 1e-5 ‖B_recomputed‖_F (float32/float64) or each
  element within one unit in the last place of its dtype (float16/bfloat16); not projected, the
  original's lora_B;
- every other tensor (lora_A included) equal to the original's (as float32 for float16/bfloat16/float32,
  so a lossless widening passes), under the same normalized names;
- the covered config equal to the original's, and the stamp's ``safelora.projected`` the decisions found.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from ..adapters import Adapter, Named, load_adapter, open_adapter
from ..adapters.digest import normalized_names
from ..adapters.location import file_of
from ..errors import SafeLoraError
from ..io import ranges, safefs, stfile
from ..outputs.report import Report
from ..projection import ROUND_DECIMALS, select
from ..results import Precision, Settings
from ..sources import Source
from ..stores.backups import BackupStore
from .audit import Recompute
from .pipeline import project_adapters

__all__ = ["Recompute", "recompute", "recomputer"]

NEAR = 1e-6  # how close to a boundary a recomputed similarity may go either way
FP32_RTOL = 1e-5
_WIDENED = frozenset({"F16", "BF16", "F32"})
_MANTISSA = {torch.float16: (10, -24), torch.bfloat16: (7, -133)}  # mantissa bits, log2 of the least subnormal


def recomputer(original: safefs.Directory, base: Source, aligned: Source) -> Recompute:
    """``recompute`` of an adapter from ``original`` against this pair."""
    return lambda adapter: recompute(adapter, original, base, aligned)


def recompute(adapter: Adapter, original: safefs.Directory, base: Source, aligned: Source) -> str | None:
    """None when ``original`` projected against ``base``/``aligned`` with ``adapter``'s recorded
    settings reproduces ``adapter``; else what differs (one line)."""
    prov = adapter.provenance()
    mode = prov.get("safelora.mode")
    precision = prov.get("safelora.precision")
    tau = adapter.provenance_value("threshold", "null", (int, float, type(None)))
    k = adapter.provenance_value("num_layers", "null", (int, type(None)))
    known = mode == "number" or (mode == "threshold" and tau is not None)
    if not known or precision not in ("float32", "float64"):
        return "the stamp records no settings this safelora knows"
    with tempfile.TemporaryDirectory(prefix="safelora-verify-") as tmp:
        # A single-file original (GGUF) is recomputed into a file, a directory adapter into a directory.
        name = file_of(original)
        out = Path(tmp) / ("recomputed" if name is None else f"recomputed{Path(name).suffix}")
        exact: Precision = "float64" if precision == "float64" else "float32"
        settings = Settings(mode="threshold", threshold=math.inf, precision=exact, output=out, backup=False)
        [outcome] = project_adapters(
            [Named(original.path, original)], base, aligned, settings, backups=BackupStore(Path(tmp) / "store")
        )
        if isinstance(outcome, SafeLoraError):
            raise outcome
        assert isinstance(outcome, Report)
        with open_adapter(out) as where:
            projected = load_adapter(where, base.model_config)
            try:
                source = load_adapter(original, base.model_config)
                try:
                    return _compare(adapter, source, projected, outcome, str(mode), tau, k)
                finally:
                    source.close()
            finally:
                projected.close()


def _near_boundary(sim: float, tau: float | None) -> bool:
    step = 10.0**-ROUND_DECIMALS
    half = (math.floor(sim / step) + 0.5) * step
    return abs(sim - half) <= NEAR or (tau is not None and abs(sim - tau) <= NEAR)


def _compare(
    adapter: Adapter,
    original: Adapter,
    projected: Adapter,
    run: Report,
    mode: str,
    tau: float | None,
    k: int | None,
) -> str | None:
    if adapter.format.covered_config(adapter) != original.format.covered_config(original):
        return "adapter_config.json differs from the original's"
    if original.provenance():
        return "the original carries a safelora stamp itself: pass the adapter as it was before projection"
    mine, theirs = normalized_names(adapter), normalized_names(original)
    by_name = {v: key for key, v in theirs.items()}
    if set(mine.values()) != set(by_name):
        return "its tensors are not the original's (other names)"
    sims = [layer.similarity for layer in run.layers]
    if mode == "number":
        want_tau, decided = select(sims, "number", 0.0, k)
    else:
        want_tau, decided = select(sims, "threshold", float(tau or 0.0), None)
    if mode == "number" and (tau is None or want_tau is None or abs(tau - want_tau) > NEAR):
        return f"the stamp's threshold {tau} is not the recomputed {want_tau}"
    modules = {m.module: m for m in adapter.modules}
    b_keys = set()
    found: list[str] = []
    for layer, want in zip(run.layers, decided, strict=True):
        m = modules.get(layer.module)
        if m is None:
            return f"{layer.module}: missing"
        b_keys.add(m.b_key)
        b = adapter.tensor(m.b_key)
        p_module = next(x for x in projected.modules if x.module == layer.module)
        o_module = next(x for x in original.modules if x.module == layer.module)
        is_projected = layer.projected and _close(b, projected.tensor(p_module.b_key))
        is_original = _equal(b, original.tensor(o_module.b_key))
        if not (is_projected or is_original):
            return f"{layer.module}: lora_B is neither its projection nor the original's"
        got = is_projected and not is_original
        if got != want and not (layer.similarity is not None and _near_boundary(layer.similarity, want_tau)):
            return f"{layer.module}: {'projected' if got else 'not projected'}, the recomputation says otherwise"
        if got:
            found.append(layer.module)
    for key, name in mine.items():
        if key not in b_keys and not _same_tensor(adapter, key, original, by_name[name]):
            return f"{key}: differs from the original's"
    recorded = adapter.provenance_value("projected", "[]", (list,))
    if sorted(map(str, recorded)) != sorted(found):
        return "the stamp's list of projected modules is not what its tensors hold"
    return None


def _same_tensor(a: Adapter, a_key: str, b: Adapter, b_key: str) -> bool:
    """One tensor of each: equal values as float32 for float16/bfloat16/float32, else equal bytes."""
    ea, eb = a.header.tensors[a_key], b.header.tensors[b_key]
    if ea.shape != eb.shape:
        return False
    if ea.dtype in _WIDENED and eb.dtype in _WIDENED:
        return _equal(_read(a, ea), _read(b, eb))
    return ea.dtype == eb.dtype and _bytes(a, ea) == _bytes(b, eb)


def _bytes(adapter: Adapter, entry: stfile.TensorEntry) -> bytes:
    return b"".join(ranges.FileRange(adapter.handle.fileno(), entry.start, entry.end).chunks())


def _read(adapter: Adapter, entry: stfile.TensorEntry) -> torch.Tensor:
    return stfile.tensor_from_bytes(entry, bytearray(_bytes(adapter, entry)))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_floating_point() and b.is_floating_point() and a.element_size() <= 4 and b.element_size() <= 4:
        return bool(torch.equal(a.float(), b.float()))
    return a.dtype == b.dtype and bool(torch.equal(a, b))


def _close(b: torch.Tensor, want: torch.Tensor) -> bool:
    """lora_B against its recomputation: one ulp of the recomputation's dtype (float16/bfloat16), or
    a relative Frobenius distance of 1e-5 (float32/float64)."""
    if b.shape != want.shape:
        return False
    if want.dtype in _MANTISSA:
        bits, least = _MANTISSA[want.dtype]
        w = want.double()
        _, exp = torch.frexp(w)
        ulp = torch.clamp(torch.pow(2.0, (exp - 1 - bits).double()), min=2.0**least)
        ulp = torch.where(w == 0, torch.full_like(w, 2.0**least), ulp)  # frexp(0) is (0, 0)
        return bool(((b.double() - w).abs() <= ulp).all())
    diff = torch.linalg.norm((b.double() - want.double()).flatten())
    return bool(diff <= FP32_RTOL * torch.linalg.norm(want.double().flatten()))
