"""The oracle equals Hugging Face's LlamaForCausalLM (float64, every valid token).

A split model assembled (identity adapter) from ONE random Llama checkpoint with N + M =
its layer count is that Llama; one assembled from a lower checkpoint A and a DEEPER upper
checkpoint B is the HF Llama stacking A's embedding and first N layers with B's last M
layers, norm and head. Both rope settings (Llama-3.1 ``llama3`` scaling, default rope).

Two references:
* ``widened``: HF Llama with its two float32 steps (RMSNorm normalises in float32 even in a
  float64 model; rotary angles ``position * inv_freq`` are computed in float32) widened to
  float64. Everything else is HF's own code, so the oracle must agree to float64 rounding:
  relative 1e-10 (measured ~2e-15).
* ``stock``: HF Llama as shipped. Its float32 RMSNorm and rope angles leave float32
  rounding (~6e-8 relative per step, measured 3.4e-6 absolute on logits of magnitude ~4 at
  positions < 40), hence 2e-5 absolute + relative there.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.llama import modeling_llama

from tests.cases import EDGE_MASKS, caller_position_ids, masks, random_input_ids
from tests.unit.hf_llama import (
    assembled_oracle,
    hf_positions,
    random_llama,
    save_llama,
    stacked_llama,
    tiny_llama_config,
)

TIGHT = {"rtol": 1e-10, "atol": 1e-10}  # float64 on both sides, same math
STOCK = {"rtol": 2e-5, "atol": 2e-5}  # HF's float32 norm / rope angles, see module docstring
VOCAB = 256


def _rmsnorm_float64(self, hidden_states):
    dtype = hidden_states.dtype
    wide = hidden_states.to(torch.float64)
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * wide.to(dtype)


def _rotary_float64(self, x, position_ids):
    angles = position_ids[..., None].to(torch.float64) * self.inv_freq.to(x.device, torch.float64)
    angles = torch.cat((angles, angles), dim=-1)
    return ((angles.cos() * self.attention_scaling).to(x.dtype),
            (angles.sin() * self.attention_scaling).to(x.dtype))


@contextlib.contextmanager
def widened_hf_precision():
    """HF Llama's float32 RMSNorm and rope angles computed in float64 instead."""
    with mock.patch.object(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_float64), \
            mock.patch.object(modeling_llama.LlamaRotaryEmbedding, "forward", _rotary_float64):
        yield


@pytest.fixture(scope="module", params=["llama3", "default"])
def pairs(request, tmp_path_factory):
    """(oracle, HF reference) for one checkpoint (N + M = 4 = its depth) and for two (N = 3
    of A's 4 layers, M = 2 of B's 6: global layers 4 and 5). A is saved in shards."""
    rope = request.param
    root = tmp_path_factory.mktemp(f"hf_{rope}")
    a = random_llama(tiny_llama_config(rope), seed=1)
    b = random_llama(tiny_llama_config(rope, num_hidden_layers=6), seed=2)
    save_llama(a, root / "a", max_shard_size="100KB")
    save_llama(b, root / "b")
    single = assembled_oracle(root / "a", root / "a", 2, 2, root / "single")
    double = assembled_oracle(root / "a", root / "b", 3, 2, root / "double")
    return {"single": (single, a), "double": (double, stacked_llama(a, b, 3, 2))}


def _compare(oracle, reference, mask, position_ids=None, tolerance=TIGHT):
    ids = random_input_ids(mask, VOCAB, seed=int(mask.sum()))
    hf_position_ids = hf_positions(mask) if position_ids is None else position_ids
    with torch.no_grad():
        got = oracle(ids, attention_mask=mask, position_ids=position_ids).logits
        want = reference(ids, attention_mask=mask.long(), position_ids=hf_position_ids).logits
    assert got.dtype == torch.float64
    assert torch.isfinite(got).all()  # padding positions too: never NaN
    torch.testing.assert_close(got[mask], want[mask], **tolerance)


@pytest.mark.parametrize("which", ["single", "double"])
@pytest.mark.parametrize("mask_name", sorted(EDGE_MASKS))
def test_edge_masks_equal_widened_hf(pairs, which, mask_name):
    oracle, reference = pairs[which]
    with widened_hf_precision():
        _compare(oracle, reference, EDGE_MASKS[mask_name])


@pytest.mark.parametrize("which", ["single", "double"])
@pytest.mark.parametrize("mask_name", ["left_right_inside", "odd_token_count", "empty_row"])
def test_edge_masks_equal_stock_hf(pairs, which, mask_name):
    oracle, reference = pairs[which]
    _compare(oracle, reference, EDGE_MASKS[mask_name], tolerance=STOCK)


@given(mask=masks(max_batch=3, max_seq=20))
def test_random_masks_equal_widened_hf(pairs, mask):
    for oracle, reference in pairs.values():
        with widened_hf_precision():
            _compare(oracle, reference, mask)


@given(mask=masks(max_batch=3, max_seq=16), seed=st.integers(0, 2**16))
def test_caller_positions_equal_widened_hf(pairs, mask, seed):
    """Caller position_ids with random gaps (up to ~5000 apart), where llama3 rope scaling
    changes the low frequencies (head_dim 8: wavelengths 6, 170, 4440 and 125,000
    positions; the last two are smoothed / divided by 8), so a missing or wrong llama3
    rule shows."""
    position_ids = caller_position_ids(mask, seed)
    for oracle, reference in pairs.values():
        with widened_hf_precision():
            _compare(oracle, reference, mask, position_ids=position_ids)
