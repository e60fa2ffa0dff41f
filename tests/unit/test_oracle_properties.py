"""Properties of the oracle on the tiny split model (random weights, float64 unless said).

A row's logits at its valid tokens depend on that row's valid tokens and positions only:
not on the amount or place of its padding, the other rows, or the batch size. Rows or
batches of padding only run and give finite outputs (and gradients). Caller position_ids
are used. A row longer than 4096 tokens works.

Tolerance ``TIGHT`` (relative 1e-10): both sides float64 with the same math; only the
summation order of matmuls over different shapes differs (measured ~1e-15).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from splitllama.config import CustomSplitLlamaConfig, llama_preset

from splitllama.verify.tiny import tiny_split_config
from tests.cases import (
    EDGE_MASKS,
    caller_position_ids,
    long_row_mask,
    masks,
    random_input_ids,
    shifted_position_ids,
)
from tests.unit.hf_llama import random_oracle

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
VOCAB = 256


@pytest.fixture(scope="module", params=["linear", "mlp"])
def model(request):
    """Tiny split model: 2 lower layers (h 64, GQA 4:1) -> adapter -> the last 2 of 6
    upper layers (h 128, GQA 8:1), llama3 rope."""
    return random_oracle(tiny_split_config(mlp=request.param == "mlp"), seed=3)


def _logits(model, ids, mask=None, position_ids=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=position_ids).logits


def _assert_rows_match_alone(model, ids, mask, position_ids=None, tolerance=TIGHT):
    """Each non-empty row's valid-token logits equal those of its valid tokens run alone
    (batch 1, no padding; the same positions when the caller gave them)."""
    full = _logits(model, ids, mask, position_ids)
    assert torch.isfinite(full).all()
    for row in range(mask.shape[0]):
        keep = mask[row]
        if not keep.any():
            continue
        alone_positions = None if position_ids is None else position_ids[row, keep][None]
        alone = _logits(model, ids[row, keep][None], None, alone_positions)[0]
        torch.testing.assert_close(full[row, keep], alone, **tolerance)


@given(mask=masks(), seed=st.integers(0, 2**16), caller_positions=st.booleans())
def test_row_logits_independent_of_padding_other_rows_and_batch(model, mask, seed, caller_positions):
    ids = random_input_ids(mask, VOCAB, seed)
    position_ids = caller_position_ids(mask, seed) if caller_positions else None
    _assert_rows_match_alone(model, ids, mask, position_ids)


@given(mask=masks(max_batch=3, max_seq=12), extra=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_relayout_keeps_row_logits(model, mask, extra, seed):
    """The same rows, in reverse order, each with its valid tokens scattered over new
    random places of a longer row: every valid token's logits are unchanged."""
    ids = random_input_ids(mask, VOCAB, seed)
    batch, seq = mask.shape
    generator = torch.Generator().manual_seed(seed)
    new_mask = torch.zeros(batch, seq + extra, dtype=torch.bool)
    new_ids = random_input_ids(new_mask, VOCAB, seed + 1)  # padding gets other ids
    for row in range(batch):
        count = int(mask[row].sum())
        places = torch.randperm(seq + extra, generator=generator)[:count].sort().values
        new_mask[batch - 1 - row, places] = True
        new_ids[batch - 1 - row, places] = ids[row, mask[row]]
    before, after = _logits(model, ids, mask), _logits(model, new_ids, new_mask)
    for row in range(batch):
        torch.testing.assert_close(after[batch - 1 - row, new_mask[batch - 1 - row]],
                                   before[row, mask[row]], **TIGHT)


@pytest.mark.parametrize("mask_name", sorted(EDGE_MASKS))
def test_edge_masks(model, mask_name):
    mask = EDGE_MASKS[mask_name]
    _assert_rows_match_alone(model, random_input_ids(mask, VOCAB, 5), mask)


@pytest.mark.parametrize("mask_name", ["all_padding_batch", "empty_row"])
def test_padding_only_rows_are_finite_forward_and_backward(model, mask_name):
    """Queries with no key to attend get a zero attention output, never NaN: outputs,
    hidden states and every parameter gradient stay finite."""
    mask = EDGE_MASKS[mask_name]
    out = model(random_input_ids(mask, VOCAB, 6), attention_mask=mask, output_hidden_states=True)
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    out.logits.sum().backward()
    try:
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    finally:
        model.zero_grad(set_to_none=True)


def test_caller_position_ids_are_used(model):
    """Default positions are cumsum(mask) - 1; caller positions replace them. A constant
    offset per row changes nothing (rotary attention sees only position differences);
    gapped positions change the logits."""
    mask = EDGE_MASKS["left_right_inside"]
    ids = random_input_ids(mask, VOCAB, 7)
    default = _logits(model, ids, mask)
    explicit_default = _logits(model, ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0))
    offset = _logits(model, ids, mask, shifted_position_ids(mask, 7))
    gapped = _logits(model, ids, mask, caller_position_ids(mask, 7))
    torch.testing.assert_close(explicit_default, default, rtol=0, atol=0)
    torch.testing.assert_close(offset[mask], default[mask], **TIGHT)
    assert (gapped[mask] - default[mask]).abs().max() > 1e-2


def test_float32_tracks_float64(model):
    """Same weights in float32: relative 1e-4 (float32 rounding, ~6e-8 per operation,
    accumulated over 4 layers of large random weights; measured ~1e-6)."""
    mask = EDGE_MASKS["left_right_inside"]
    ids = random_input_ids(mask, VOCAB, 8)
    low = model.to(torch.float32)
    try:
        got = _logits(low, ids, mask)
    finally:
        model.to(torch.float64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[mask].double(), _logits(model, ids, mask)[mask], rtol=1e-4, atol=1e-4)


def test_row_longer_than_4096_tokens():
    """A 4097-token row beside a left-padded 5-token row, in float32 on a model with few
    heads (the padded oracle holds [batch, heads, 4097, 4097] scores). Checks: finite
    everywhere; the short row and the long row's first 64 tokens equal themselves run
    alone (float32, relative 1e-5: only the summation order differs, measured ~1e-7); the
    long row equals a float64 run at every token (relative 1e-4: float32 rounding of
    softmax sums over up to 4097 keys, measured 1e-6)."""
    small = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_hidden_layers=1)
    config = CustomSplitLlamaConfig.from_llama_configs(
        llama_preset("tiny-llama3.1-8b", hidden_size=16, intermediate_size=56, **small),
        llama_preset("tiny-llama3.1-70b", hidden_size=32, intermediate_size=112, **small),
        1, 1, mlp=True,
    )
    model32 = random_oracle(config, seed=4, dtype=torch.float32)
    mask = long_row_mask(4097, batch=2)
    ids = random_input_ids(mask, VOCAB, 9)
    logits = _logits(model32, ids, mask)
    assert torch.isfinite(logits).all()
    float32 = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(logits[1, mask[1]], _logits(model32, ids[1, mask[1]][None])[0], **float32)
    torch.testing.assert_close(logits[0, :64], _logits(model32, ids[:1, :64])[0], **float32)
    model64 = random_oracle(config, seed=4, dtype=torch.float64)
    torch.testing.assert_close(logits[0].double(), _logits(model64, ids[:1])[0], rtol=1e-4, atol=1e-4)
