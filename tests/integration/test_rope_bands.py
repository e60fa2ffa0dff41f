"""llama3 rope scaling in all three of its bands, for each stack: production equals the
oracle and transformers' own rope.

llama3 rope keeps the frequencies whose wavelength is below ``window / high_freq_factor``
(``window`` = ``original_max_position_embeddings``), divides those above
``window / low_freq_factor`` by ``factor`` and interpolates in between (the smoothing
band). Swapping the two band factors moves only the smoothing band, and the built-in tiny
model's upper stack (head_dim 8, theta 5e5, window 4096: wavelengths 6.3, 167, 4443 and
1.2e5 positions) has nothing there, while its lower stack uses default rope. This
configuration gives BOTH stacks llama3 rope with a wavelength in each band (checked below,
so the configuration cannot drift out of covering them), with different theta, factor and
window per stack so that reading one stack's setting for the other shows too.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from splitllama.config import CustomSplitLlamaConfig, rope_parameters
from splitllama.verify.tiny import tiny_split_config
from splitllama.megatron_configs import megatron_config
from splitllama.layers import RotaryPositions
from splitllama.megatron_configs import stack_config
from splitllama.layout import ParallelLayout
from splitllama.verify.runner import run_parity
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import layouts
from tests.integration.test_parity import assert_passed, edge_case_microbatches

# head_dim 8 (the tiny presets'): wavelengths 2 pi theta^(2i/8), i = 0..3
LOWER_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}  # 6.3, 63 | 628 | 6283
UPPER_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # 6.3, 167 | 4443 | 1.2e5
# Positions from 0 past both windows: every band's angles are exercised.
POSITIONS = torch.tensor([[0, 1, 5, 77, 600, 2047, 2048, 3000, 8191, 8192, 12000]])


def rope_bands_config() -> CustomSplitLlamaConfig:
    return tiny_split_config(lower={"rope_parameters": LOWER_ROPE}, upper={"rope_parameters": UPPER_ROPE})


def band_counts(sub) -> dict[str, int]:
    """How many of the stack's rope frequencies fall in each llama3 band."""
    rope = rope_parameters(sub)
    window = rope["original_max_position_embeddings"]
    short, long = window / rope["high_freq_factor"], window / rope["low_freq_factor"]
    half = sub.head_dim // 2
    wavelengths = [2 * math.pi * rope["rope_theta"] ** (2 * i / sub.head_dim) for i in range(half)]
    return {"kept": sum(w < short for w in wavelengths),
            "smoothed": sum(short <= w <= long for w in wavelengths),
            "divided": sum(w > long for w in wavelengths)}


def rope_matches_transformers(which: str) -> bool:
    """Production's rotary (``layers.RotaryPositions``) of one stack against transformers'
    ``LlamaRotaryEmbedding`` of the same Llama config: the inverse frequencies exactly, and
    cos/sin of the angles. transformers forms angles in float32 (production in float64),
    so those agree to float32 rounding of the largest angle: 4 units of 2^-24 of it."""
    sub = getattr(rope_bands_config(), which)
    production = RotaryPositions(sub, stack_config(sub, megatron_config(ParallelLayout(), torch.float64, "cpu"), 1))
    reference = LlamaRotaryEmbedding(config=sub)
    if not torch.equal(production.inv_freq, reference.inv_freq.to(torch.float32)):
        return False
    angles = production(POSITIONS, torch.float64)[:, 0, 0]  # [S, head_dim]
    cos, sin = reference(torch.zeros((), dtype=torch.float64), POSITIONS)  # [1, S, head_dim]
    allowed = 4 * 2.0**-24 * float(angles.abs().max())
    return all(float((mine - theirs[0]).abs().max()) <= allowed
               for mine, theirs in ((angles.cos(), cos), (angles.sin(), sin)))


def test_each_stack_has_a_frequency_in_every_band():
    config = rope_bands_config()
    for which in ("lower", "upper"):
        counts = band_counts(getattr(config, which))
        assert all(counts.values()), f"{which} stack: {counts}"


@pytest.mark.parametrize("which", ["lower", "upper"])
@pytest.mark.parametrize("layout", layouts("tp1"))
def test_rope_matches_transformers(layout, which):
    assert rope_matches_transformers(which)


def rope_bands_checkpoint(factory) -> str:
    return factory("lm", False, config=rope_bands_config(), name="rope_bands")


def rope_bands_parity(ckpt: str, layout):
    return run_parity(ckpt, CustomSplitLlamaConfig.from_pretrained(ckpt), layout, "lm", DTYPE, DEVICE,
                      edge_case_microbatches("lm"))


@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp", "pp2_cut_lower"))
def test_rope_bands_parity(layout, checkpoint_factory):
    """Production at the layout equals the oracle, outputs and gradients, with both stacks'
    llama3 rope in all bands (a wrong smoothing-band frequency moves every angle at
    positions above 0)."""
    assert_passed(rope_bands_parity(rope_bands_checkpoint(checkpoint_factory), layout))
