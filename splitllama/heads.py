"""The two heads on top of the final norm, and the one contract every model class calls.

``LMHead`` (``V x h_hi``, vocab-parallel) and ``ValueHead`` (``1 x h_hi``, replicated)
both take megatron's ``[S(/tp under SP), B, h_hi]`` hidden states and the batch's
``batches.HeadRequest`` and answer ``head(hidden, request)``:

* no labels: the head's outputs per token, float32 (float64 for float64 compute):
  logits ``[S, B, V]`` (``[S, B, Vp/tp]`` with ``request.vocab_parallel``, what the last
  pipeline stage hands to vocab-parallel losses; padded vocabulary columns hold
  ``PADDED_VOCAB_LOGIT``, a large finite negative, so a softmax gives them probability 0
  and their gradient is 0) or values ``[S, B]``;
* ``request.labels_SB``: ``[S, B, 2]`` = (log-probability of the label, entropy of the
  next-token distribution), of ``softmax(logits / request.temperature)``, the vocabulary
  kept split over TP. Only the LM head has them; the value head refuses with an error that
  says so. The temperature divides the hidden states before the head's GEMM: exact, since
  the head has no bias, and the gradient flows through the scale. The LM head's
  ``log_probs`` option picks how: ``"fused"`` (default:
  ``logprobs.fused_log_probs_entropy`` from the hidden states, the ``[S, B, V/tp]`` logits
  never held at once) or ``"materialise"`` (the logits, then vocab-parallel log-softmax and
  entropy). The fused path follows the model's activation recompute: with
  ``recompute="none"`` it keeps each logits tile's probabilities (16-bit) for backward,
  otherwise it recomputes the logits there (one head-sized GEMM more, no ``[T, V/tp]``
  memory).

Each head class names its kind (``kind``: the checkpoint's head tensor, ``weight_names``).
The padded, packed and pipeline model classes differ in how tokens are laid out, never in
what a head computes. Neither head is tied to the embedding (they come from different
checkpoints).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig

from splitllama.batches import OUTPUTS, HeadRequest
from splitllama.layers import param_device
from splitllama.logprobs import (
    fused_log_probs_entropy,
    lm_head_input,
    valid_vocab_columns,
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
)

# Logit of a padded vocabulary column in vocab-parallel logits: softmax gives it exactly 0
# (exp underflows), and it stays finite where -inf would not: 0 * -inf is NaN in any
# entropy that sums p * logit (megatron's and verl's), and a temperature down to 1e-8
# (what verl puts at padding) keeps it above float32's -3.4e38.
PADDED_VOCAB_LOGIT = -1e30


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are float32, or float64 when computing in float64."""
    return torch.promote_types(dtype, torch.float32)


class LMHead(tensor_parallel.ColumnParallelLinear):
    """Vocab-parallel LM head: ``padded_vocab_size`` rows (``layout.padded_vocab_size``), TP
    rank r holds rows ``[r Vp/tp, (r+1) Vp/tp)``; rows ``>= vocab_size`` are padding, excluded
    from every output (sliced off the full logits, ``PADDED_VOCAB_LOGIT`` in vocab-parallel logits, left out
    of log-sum-exp and entropy), so they never influence a real row or its gradient.
    Under SP the (sequence-sharded) input is all-gathered by the column-parallel linear,
    or by ``lm_head_input`` before the fused log-probs. ``log_probs``: ``fused`` (chunked,
    the logits never materialised) or ``materialise``. ``recompute_logits``: whether the
    fused path recomputes its logits tiles in backward (``fused_log_probs_entropy``)."""

    kind = "lm"

    def __init__(self, config: TransformerConfig, hidden_size: int, vocab_size: int,
                 padded_vocab_size: int | None = None, log_probs: str = "fused", recompute_logits: bool = True):
        super().__init__(hidden_size, padded_vocab_size or vocab_size, config=config,
                         init_method=config.init_method, bias=False, gather_output=False)
        self.vocab_size = vocab_size
        self.log_probs = log_probs  # one of options.LOG_PROBS_CHOICES (ModelOptions validated it)
        self.recompute_logits = recompute_logits

    def vocab_parallel_logits(self, hidden_SBH: torch.Tensor) -> torch.Tensor:
        """``[S, B, Vp/tp]`` in the compute dtype, padded columns included."""
        if torch.is_grad_enabled() and getattr(self.weight, "grad_added_to_main_grad", False):
            raise ValueError(
                "the LM head's logits are asked for after a fused log-prob backward in the same "
                "iteration: megatron DDP now skips this weight's .grad (grad_added_to_main_grad), "
                "so their gradient would be lost. Compute the logits micro-batches first, or all "
                "log-probs through one path (log_probs option)")
        logits, _ = super().forward(hidden_SBH)
        return logits

    def forward(self, hidden_SBH: torch.Tensor, request: HeadRequest = OUTPUTS) -> torch.Tensor:
        if request.labels_SB is not None:
            return self.token_scores(hidden_SBH, request)
        logits = self.vocab_parallel_logits(hidden_SBH)
        if request.vocab_parallel:
            valid = valid_vocab_columns(logits.shape[-1], self.vocab_size, logits.device)
            if valid is not None:
                logits = torch.where(valid, logits, PADDED_VOCAB_LOGIT)
        else:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., : self.vocab_size]
        return logits.to(output_dtype(logits.dtype))

    def token_scores(self, hidden_SBH: torch.Tensor, request: HeadRequest) -> torch.Tensor:
        """``[S, B, 2]``: log-probability of each label and entropy (zeros when not asked),
        at ``request.temperature``."""
        if request.temperature is not None and request.temperature != 1.0:
            # softmax(W h / T) = softmax(W (h / T)): no bias; backward flows through the scale
            hidden_SBH = hidden_SBH / request.temperature
        labels_SB = request.labels_SB
        if self.log_probs == "materialise":
            logits = self.vocab_parallel_logits(hidden_SBH)
            log_probs = vocab_parallel_log_probs(logits, labels_SB, vocab_size=self.vocab_size)
            entropy = (vocab_parallel_entropy(logits, vocab_size=self.vocab_size) if request.entropy
                       else torch.zeros_like(log_probs))
            return torch.stack([log_probs, entropy], dim=-1)
        # [S(/tp), B, h] -> every token on every TP rank, [S, B, h]; the backward reduces
        # the per-shard partial gradients as the column-parallel linear would
        hidden = lm_head_input(hidden_SBH, self.sequence_parallel)
        seq, batch, width = hidden.shape
        # Under megatron's DistributedDataParallel the weight has a ``main_grad`` buffer
        # (float32 with grad_reduce_in_fp32): the op adds its float32 product sums straight
        # into it, so a 16-bit weight's gradient is never rounded to 16 bits per micro-batch.
        # Unwrapped, the gradient is returned into weight.grad (the weight's dtype).
        log_probs, entropy = fused_log_probs_entropy(
            hidden.reshape(seq * batch, width), self.weight, labels_SB.reshape(seq * batch),
            entropy=request.entropy, vocab_size=self.vocab_size,
            check_labels=False,  # the batch checked them
            grad_weight_into=getattr(self.weight, "main_grad", None),
            recompute_logits=self.recompute_logits,
        )
        if entropy is None:
            entropy = torch.zeros_like(log_probs)
        return torch.stack([log_probs, entropy], dim=-1).view(seq, batch, 2)


class ValueHead(torch.nn.Linear):
    """One value per token. Output size 1 cannot be split over TP, so the weight is
    replicated; under SP each rank scores its own tokens, so its gradient is partial and
    the weight is marked for the TP all-reduce (``grads.py``, megatron's
    ``finalize_model_grads``)."""

    kind = "value"

    def __init__(self, config: TransformerConfig, hidden_size: int):
        super().__init__(hidden_size, 1, bias=False, dtype=config.params_dtype, device=param_device(config))
        self.sequence_parallel = config.sequence_parallel
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_SBH: torch.Tensor, request: HeadRequest = OUTPUTS) -> torch.Tensor:
        """Values ``[S, B]`` in float32 (float64 for float64 compute)."""
        if request.labels_SB is not None:
            raise ValueError(
                "log-probabilities and entropy need an LM head, and this model has a value head "
                "(score.weight, one value per token): call the model itself for values, or build "
                "a CausalLM class for log-probs"
            )
        values = super().forward(hidden_SBH)
        if self.sequence_parallel:
            # Gather once. The loss is replicated on every rank, so the backward takes this
            # rank's slice of the gradient (a reduce-scatter would multiply it by tp).
            values = tensor_parallel.gather_from_sequence_parallel_region(
                values, tensor_parallel_output_grad=False
            )
        return values[..., 0].to(output_dtype(values.dtype))
