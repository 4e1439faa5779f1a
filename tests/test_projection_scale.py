"""The float32 path at the size of a real module (Llama-2-7B's 4096×4096 q_proj), against float64.

Small modules cannot show accumulation error: a float32 norm over all 16M entries of V was off by
~1e-3, and so was every projected lora_B, while the golden vectors still passed.
"""

from __future__ import annotations

import pytest
import torch

from safelora_cli.projection import Projector


@pytest.mark.parametrize("transpose", [False, True], ids=["out×in", "in×out (Conv1D)"])
def test_a_7b_sized_module_meets_the_float32_tolerances(transpose: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w_base = (torch.randn(4096, 4096, generator=g) * 0.02).half()
    low_rank = torch.randn(4096, 8, generator=g) @ torch.randn(8, 4096, generator=g)
    w_aligned = (w_base.float() + low_rank * 2e-3 + torch.randn(4096, 4096, generator=g) * 1e-3).half()
    lora_a = torch.randn(16, 4096, generator=g) * 0.01
    lora_b = torch.randn(4096, 16, generator=g) * 0.01

    # float64 reference in factored form (C·B = V·(Vᵀ·B)/‖V‖): the same algebra as C = V·Vᵀ/‖V‖
    # materialised, which would take seconds at this size.
    v = w_aligned.double() - w_base.double()
    want_b = v @ (v.T @ lora_b.double()) / torch.linalg.matrix_norm(v)
    pa, ba = want_b @ lora_a.double(), lora_b.double() @ lora_a.double()
    want_sim = float((pa * ba).sum() / (pa.norm() * ba.norm()))

    # Conv1D checkpoints store the out×in weight transposed.
    stored = (w_base.T.contiguous(), w_aligned.T.contiguous()) if transpose else (w_base, w_aligned)
    got = Projector(torch.float32).compute(*stored, lora_a, lora_b, transpose=transpose)

    assert got.similarity is not None and got.projected_b is not None
    assert abs(got.similarity - want_sim) < 1e-5
    assert float((got.projected_b.double() - want_b).norm() / want_b.norm()) < 1e-4
