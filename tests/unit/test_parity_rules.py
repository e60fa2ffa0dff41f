"""The comparison rules of ``splitllama.parity`` on hand-made tensors: what passes, what
fails, and that NaN never passes."""

from __future__ import annotations

import math

import torch

from splitllama.parity import BF16_FLOOR, _row


def test_bf16_rule_allows_twice_the_oracle_bf16_error():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    oracle_bf16 = ref + torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64)
    within = ref + torch.tensor([0.019, 0.0, 0.0], dtype=torch.float64)
    beyond = ref + torch.tensor([0.0, 0.0, 0.021 + BF16_FLOOR * 4], dtype=torch.float64)
    assert _row("x", within, ref, torch.bfloat16, oracle_bf16).passed
    assert not _row("x", beyond, ref, torch.bfloat16, oracle_bf16).passed


def test_nan_never_passes():
    ref = torch.ones(3, dtype=torch.float64)
    prod = torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64)
    assert not _row("x", prod, ref, torch.float64).passed
    assert not _row("x", prod, ref, torch.bfloat16, ref.clone()).passed


def test_exactly_zero_reference_is_judged_at_the_model_gradient_scale():
    zero = torch.zeros(4, dtype=torch.float64)
    noise = torch.full((4,), 1e-7, dtype=torch.float64)
    # bf16: the floor is 1e-4 of the largest gradient (here 2.0)
    assert _row("g", noise, zero, torch.bfloat16, zero.clone(), zero_scale=2.0).passed
    assert not _row("g", noise * 1e4, zero, torch.bfloat16, zero.clone(), zero_scale=2.0).passed
    # float64 keeps its 1e-9 relative tolerance at that scale
    assert not _row("g", noise, zero, torch.float64, zero_scale=2.0).passed
    assert _row("g", noise * 1e-3, zero, torch.float64, zero_scale=2.0).passed
