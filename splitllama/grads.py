"""Gradient finalisation for models not wrapped in megatron's DistributedDataParallel.

Parameters replicated over TP but fed different tokens under sequence parallelism (the
RMSNorm weights, the value head) carry partial gradients; ``sequence_parallel=True`` on
the parameter marks them. Megatron's ``finalize_model_grads`` all-reduces those in
training (it needs DDP-wrapped chunks); this is the same reduction for plain modules.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def allreduce_sequence_parallel_grads(chunks: torch.nn.Module | list[torch.nn.Module]) -> None:
    """Sum the gradients of ``sequence_parallel``-marked parameters over the TP group."""
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [
        p.grad
        for chunk in chunks
        for p in chunk.parameters()
        if getattr(p, "sequence_parallel", False) and p.grad is not None
    ]
    if not grads:
        return
    coalesced = _flatten_dense_tensors(grads)
    dist.all_reduce(coalesced, group=parallel_state.get_tensor_model_parallel_group())
    for grad, synced in zip(grads, _unflatten_dense_tensors(coalesced, grads)):
        grad.copy_(synced)
