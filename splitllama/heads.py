"""The two heads on top of the final norm: LM head (``V x h_hi``) and value head (``1 x h_hi``).

Both take megatron's ``[S(/tp under SP), B, h_hi]`` hidden states. Neither is tied to the
embedding (they come from different checkpoints). Log-probabilities and entropy that keep
the vocabulary split are in ``logprobs.py``.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig

from splitllama.layers import param_device


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are float32, or float64 when computing in float64."""
    return torch.promote_types(dtype, torch.float32)


class LMHead(tensor_parallel.ColumnParallelLinear):
    """Vocab-parallel LM head: TP rank r holds vocabulary rows ``[r V/tp, (r+1) V/tp)``.
    Under SP the (sequence-sharded) input is all-gathered by the column-parallel linear."""

    def __init__(self, config: TransformerConfig, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, config=config, init_method=config.init_method,
                         bias=False, gather_output=False)

    def vocab_parallel_logits(self, hidden_SBH: torch.Tensor) -> torch.Tensor:
        """``[S, B, V/tp]`` in the compute dtype."""
        logits, _ = super().forward(hidden_SBH)
        return logits

    def forward(self, hidden_SBH: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``[S, B, V]`` in float32 (float64 for float64 compute)."""
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            self.vocab_parallel_logits(hidden_SBH)
        )
        return logits.to(output_dtype(logits.dtype))


class ValueHead(torch.nn.Linear):
    """One value per token. Output size 1 cannot be split over TP, so the weight is
    replicated; under SP each rank scores its own tokens, so its gradient is partial and
    the weight is marked for the TP all-reduce (``grads.py``, megatron's
    ``finalize_model_grads``)."""

    def __init__(self, config: TransformerConfig, hidden_size: int):
        super().__init__(hidden_size, 1, bias=False, dtype=config.params_dtype, device=param_device(config))
        self.sequence_parallel = config.sequence_parallel
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_SBH: torch.Tensor) -> torch.Tensor:
        """Values ``[S, B]`` in float32 (float64 for float64 compute)."""
        values = super().forward(hidden_SBH)
        if self.sequence_parallel:
            # Gather once. The loss is replicated on every rank, so the backward takes this
            # rank's slice of the gradient (a reduce-scatter would multiply it by tp).
            values = tensor_parallel.gather_from_sequence_parallel_region(
                values, tensor_parallel_output_grad=False
            )
        return values[..., 0].to(output_dtype(values.dtype))
