"""llama3 rope scaling checked against the published formula, written out here.

The oracle and production both take llama3 inverse frequencies from transformers'
``ROPE_INIT_FUNCTIONS`` (the definition Hugging Face's Llama uses), so the parity tests
cannot see a mistake in it; this test does: it recomputes the frequencies with Meta's
reference ``apply_scaling`` (llama-models, Llama 3.1) in float64 Python."""

from __future__ import annotations

import math

import pytest
import torch

from oracle.modeling import rope_inverse_frequencies
from splitllama.config import llama_preset, rope_parameters
from splitllama.verify.tiny import TINY_UPPER_SETTINGS


def published_llama3_frequencies(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                                 high_freq_factor: float, old_context_len: int) -> list[float]:
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


@pytest.mark.parametrize("sub", [
    llama_preset("llama3.1-70b"),
    llama_preset("tiny-llama3.1-70b", **TINY_UPPER_SETTINGS),
], ids=["llama3.1-70b", "tiny-upper"])
def test_llama3_inverse_frequencies_follow_the_published_formula(sub):
    params = rope_parameters(sub)
    assert params["rope_type"] == "llama3"
    want = published_llama3_frequencies(sub.head_dim, params["rope_theta"], params["factor"],
                                        params["low_freq_factor"], params["high_freq_factor"],
                                        params["original_max_position_embeddings"])
    got, scaling = rope_inverse_frequencies(sub)
    assert scaling == 1.0
    # float32 frequencies (as transformers and megatron keep them) vs float64 Python
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
