"""``megatron_configs.engine_configs``: what verl's ``override_transformer_config`` may set."""

from __future__ import annotations

import pytest
import torch

from splitllama.megatron_configs import engine_configs
from splitllama.verify.tiny import tiny_split_config


@pytest.mark.parametrize("value", ["float64", torch.float64])
def test_params_dtype_override_sets_the_model_dtype(value):
    """verl's engine dtype is bfloat16; ``params_dtype`` (a name, as YAML writes it, or a
    torch dtype) makes the model float64, and what pipeline stages exchange follows."""
    configs = engine_configs(tiny_split_config(), 1, 2, None, torch.bfloat16, {"params_dtype": value}, cpu=True)
    for config in (configs.parallel, configs.engine):
        assert (config.params_dtype, config.pipeline_dtype, config.bf16, config.fp16) == \
            (torch.float64, torch.float64, False, False)


def test_dtype_overrides_are_checked():
    with pytest.raises(ValueError, match=r"^override_transformer_config params_dtype='float128': allowed values "
                                         r"are \['bfloat16', 'float16', 'float32', 'float64'\]$"):
        engine_configs(tiny_split_config(), 1, 1, None, torch.bfloat16, {"params_dtype": "float128"}, cpu=True)
