"""Gradients: megatron's DistributedDataParallel around the model chunks for training
(``wrap_ddp``), and the same sequence-parallel reduction for plain modules.

Parameters replicated over TP but fed different tokens under sequence parallelism (the
RMSNorm weights, the value head) carry partial gradients; ``sequence_parallel=True`` on
the parameter marks them. Megatron's ``finalize_model_grads`` all-reduces those in
training (it needs DDP-wrapped chunks); ``allreduce_sequence_parallel_grads`` is the same
reduction for plain modules.
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


def wrap_ddp(chunks: list[torch.nn.Module], ddp_config) -> list[torch.nn.Module]:
    """Each chunk in megatron's ``DistributedDataParallel`` (gradients in float32 or the
    weights' dtype ``main_grad`` buffers, per ``ddp_config``), bucketing on the first chunk
    only, as megatron's training loop wraps virtual pipeline chunks."""
    from megatron.core.distributed import DistributedDataParallel

    return [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=k > 0) for k, chunk in enumerate(chunks)]
