"""The built-in tiny model ``splitllama check`` and the tests compare on: harness data, not
part of the product. Tiny 8B- and 70B-shaped stacks (the ``tiny-*`` presets of
``splitllama.config``) whose every non-shape setting differs between the stacks."""

from __future__ import annotations

import copy
from typing import Any

from splitllama.config import CustomSplitLlamaConfig, llama_preset

# The built-in tiny model's stacks and final norm differ in every non-shape setting, so
# that code reading one stack's setting for another's computes different numbers: rope
# type and theta (default 1e4 below, llama3 5e5 above), llama3 scaling with an original
# context other than 8192 (at head_dim 8 and theta 5e5 the wavelengths are 6.3, 167, 4443
# and 1.2e5 positions: with 4096 / low_freq_factor 1 the last two are divided by the
# factor), and three RMSNorm epsilons (lower, upper, final) far enough apart that reading
# one for another moves float64 outputs by about 1e-4 relative (the tolerance is 1e-9).
TINY_LOWER_SETTINGS: dict[str, Any] = dict(
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
)
TINY_UPPER_SETTINGS: dict[str, Any] = dict(
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 4096},
    rms_norm_eps=1e-3,
)
TINY_FINAL_NORM_EPS = 1e-2


def tiny_split_config(mlp: bool = False, num_lower: int = 2, num_upper: int = 2,
                      lower: dict[str, Any] | None = None, upper: dict[str, Any] | None = None,
                      **kwargs: Any) -> CustomSplitLlamaConfig:
    """The built-in tiny model: tiny 8B-shaped lower stack, tiny 70B-shaped upper stack,
    with the differing settings above. ``lower`` / ``upper``: overrides of either stack
    (shapes of a test's variant); ``kwargs`` go to the split config.

    The upper source model is deeper than ``num_upper`` so the index offset of the upper
    layers is always exercised."""
    lower_config = llama_preset("tiny-llama3.1-8b", **copy.deepcopy({**TINY_LOWER_SETTINGS, **(lower or {})}))
    upper_config = llama_preset("tiny-llama3.1-70b", **copy.deepcopy({**TINY_UPPER_SETTINGS, **(upper or {})}))
    kwargs.setdefault("rms_norm_eps", TINY_FINAL_NORM_EPS)
    return CustomSplitLlamaConfig.from_llama_configs(
        lower_config, upper_config, num_lower, num_upper, mlp=mlp, **kwargs
    )
