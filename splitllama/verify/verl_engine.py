"""verl's own Megatron engine code driving a model the bridge built (tests, benchmark).

verl 0.9.1's engine (``MegatronEngineWithLMHead`` / ``MegatronEngineWithValueHead``) is
normally constructed by its ray workers from verl's configs, a tokenizer and a checkpoint
path. ``engine()`` leaves that constructor out and sets the attributes its training-loop
methods read: the model chunks, the bridge's TransformerConfig, verl's own
``McoreEngineConfig`` and a model config with the pad token. What then runs is verl's code,
unchanged: ``forward_backward_batch`` (micro-batches, megatron's pipeline schedule),
``forward_step``, ``gptmodel_forward_model_engine`` (thd packing, per-sequence TP padding)
and the LM head's logits processor (temperature, entropy, megatron's vocab-parallel
cross entropy for log-probs).

Needs verl and mbridge (``pip install --no-deps verl==0.9.1 mbridge==0.15.1`` plus the
``verl-ci`` extra; docs/verl.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def rows_as_nested(rows: list[torch.Tensor]) -> torch.Tensor:
    """verl's no-padding batch layout: one jagged nested tensor ``[batch, j]``."""
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def engine(bridge, chunks: list[torch.nn.Module], *, value: bool, pad_token_id: int = 0):
    """verl's engine object around ``chunks`` (see the module docstring)."""
    from verl.workers.config import McoreEngineConfig
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead, MegatronEngineWithValueHead

    cls = MegatronEngineWithValueHead if value else MegatronEngineWithLMHead
    eng = object.__new__(cls)
    eng.engine_config = McoreEngineConfig(use_remove_padding=True)
    eng.model_config = SimpleNamespace(
        hf_config=bridge.hf_config, mtp=SimpleNamespace(enable=False, enable_train=False),
        tokenizer=SimpleNamespace(pad_token_id=pad_token_id), model_type="value_model" if value else "language_model")
    eng.tf_config = bridge.config
    eng.module = chunks
    eng.bridge = bridge
    eng.enable_routing_replay = False
    eng.mini_layer_topk_idx_list = []
    eng.is_value_model = value
    return eng


def batch(rows: list[torch.Tensor], *, micro_batch_size: int, temperature: float = 1.0,
          calculate_entropy: bool = True):
    """A verl training batch of token rows (no padding), split into micro-batches of
    ``micro_batch_size`` rows in order."""
    from verl.utils import tensordict_utils as tu

    nested = rows_as_nested(rows)
    return tu.get_tensordict(
        {"input_ids": nested, "loss_mask": rows_as_nested([torch.ones_like(r) for r in rows]),
         "temperature": torch.full((len(rows),), temperature)},
        {"use_dynamic_bsz": False, "micro_batch_size_per_gpu": micro_batch_size,
         "calculate_entropy": calculate_entropy},
    )
