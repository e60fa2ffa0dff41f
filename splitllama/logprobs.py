"""Log-probabilities of given tokens and entropy from vocab-parallel logits.

Each TP rank holds logits for its ``V/tp`` slice of the vocabulary; the full vocabulary
is never gathered (an RL actor computes these for every token of every rollout). The
log-sum-exp subtracts the global max first, so logits of any magnitude are safe.
Computed in float32 at least (float64 for float64 logits), and differentiable.

Gradients assume the loss built from these outputs is the same on every TP rank (as an
RL loss is): the sum over ranks is an all-reduce forward, identity backward (megatron's
``reduce_from_tensor_model_parallel_region``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region


def _global_max(local_max: torch.Tensor) -> torch.Tensor:
    # Only a shift for stability: log-sum-exp does not depend on it, so no gradient.
    local_max = local_max.detach().clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    return local_max


def _logsumexp(logits_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits in compute dtype, global log-sum-exp over the vocabulary)."""
    logits = logits_local.to(torch.promote_types(logits_local.dtype, torch.float32))
    shift = _global_max(logits.max(dim=-1).values)
    sum_exp = reduce_from_tensor_model_parallel_region((logits - shift[..., None]).exp().sum(dim=-1))
    return logits, sum_exp.log() + shift


def vocab_parallel_log_probs(logits_local: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]`` for logits ``[..., V/tp]`` and labels ``[...]`` (global
    token ids) -> ``[...]``."""
    logits, logsumexp = _logsumexp(logits_local)
    width = logits.shape[-1]
    local = labels - parallel_state.get_tensor_model_parallel_rank() * width
    mine = (local >= 0) & (local < width)
    picked = logits.gather(-1, local.clamp(0, width - 1)[..., None])[..., 0] * mine
    return reduce_from_tensor_model_parallel_region(picked) - logsumexp


class _VocabParallelEntropy(torch.autograd.Function):
    """Entropy with its analytic gradient, ``dH/dl_j = -p_j (l_j - sum_i p_i l_i)``.

    Composing it from differentiable pieces is wrong under TP: the log-sum-exp is
    replicated but every rank's slice of ``sum_i p_i l_i`` depends on it, so its gradient
    would need an all-reduce that an identity-backward reduction does not do."""

    @staticmethod
    def forward(ctx, logits_local: torch.Tensor) -> torch.Tensor:
        logits, logsumexp = _logsumexp(logits_local)
        probs = (logits - logsumexp[..., None]).exp()  # exponent <= 0: no overflow
        mean_logit = (probs * logits).sum(dim=-1)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(mean_logit, group=parallel_state.get_tensor_model_parallel_group())
        ctx.save_for_backward(probs, logits, mean_logit)
        ctx.input_dtype = logits_local.dtype
        return logsumexp - mean_logit

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor) -> torch.Tensor:
        probs, logits, mean_logit = ctx.saved_tensors
        grad = -probs * (logits - mean_logit[..., None]) * grad_entropy[..., None]
        return grad.to(ctx.input_dtype)


def vocab_parallel_entropy(logits_local: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the whole vocabulary, ``[..., V/tp] -> [...]``."""
    return _VocabParallelEntropy.apply(logits_local)
