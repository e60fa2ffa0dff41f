"""Run megatron-core 0.16.1 on CPU with gloo: every change it needs, in this one place.

Production on GPU needs none of this. ``use_cpu()`` patches the running process:

* ``torch.cuda.current_device`` answers the CPU device, so megatron's buffers (SP
  all-gather buffers of ``parallel_state._GLOBAL_MEMORY_BUFFER``, linear-layer
  workspaces) are CPU tensors;
* an inference-mode RNG tracker replaces ``model_parallel_cuda_manual_seed`` (which needs
  CUDA); the model has no dropout, so no RNG stream is consumed;
* activation recompute saves and restores the CUDA RNG state around each recomputed
  region; on CPU there is none, so that part is a no-op (megatron still restores the CPU
  RNG state itself);
* ``cpu_schedule_context()`` wraps a pipeline schedule call: megatron's schedules
  allocate with ``device="cuda"`` and call ``torch.cuda.synchronize``; inside the context
  "cuda" means "cpu" and synchronize is a no-op. It also tags pipeline p2p messages by
  direction: gloo matches a batch of isend/irecv between two ranks in posting order, and
  megatron posts ``[send_prev, recv_prev, send_next, recv_next]``; with two pipeline
  ranks (prev == next) and interleaving, both directions are in flight at once and the
  activation would land in the gradient's buffer. Tags keep the two streams apart.

Models built after ``use_cpu()`` need ``use_cpu_initialization=True`` in their megatron
config (``distributed.megatron_config(layout, dtype, "cpu")`` sets it).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_state = {"enabled": False}


def use_cpu() -> None:
    """Make megatron-core run on CPU in this process. Idempotent; call before building a
    model and after (or before) ``torch.distributed.init_process_group("gloo")``."""
    if _state["enabled"]:
        return
    if torch.cuda.is_available():
        logger.warning("use_cpu() on a machine with CUDA: megatron will run on the CPU")
    torch.cuda.current_device = lambda: _CPU
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _state["enabled"] = True


def cpu_enabled() -> bool:
    return _state["enabled"]


class _CudaMeansCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments of tensor factories to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = dict(kwargs, device=_CPU)
        return func(*args, **kwargs)


class _Peer(int):
    """A pipeline neighbour's global rank that remembers which neighbour it is."""

    def __new__(cls, rank: int, direction: str):
        peer = super().__new__(cls, rank)
        peer.direction = direction
        return peer


# Tag of a message by the direction it travels: activations forward, gradients backward.
_FORWARD_TAG, _BACKWARD_TAG = 1, 2


def _tagged_p2p_op(op, tensor, peer, group=None, tag=0):
    direction = getattr(peer, "direction", None)
    if direction is not None:
        sending = op in (dist.isend, dist.send)
        forward = (direction == "next") == sending  # send to next / receive from prev
        tag = _FORWARD_TAG if forward else _BACKWARD_TAG
    return _P2POp(op, tensor, int(peer), group, tag)


_P2POp = dist.P2POp


@contextlib.contextmanager
def cpu_schedule_context():
    """Context for a megatron pipeline schedule call; a no-op unless ``use_cpu()`` ran."""
    if not _state["enabled"]:
        yield
        return
    from megatron.core.pipeline_parallel import p2p_communication

    communicator = p2p_communication.P2PCommunicator
    original_init = communicator.__init__

    def init_with_named_peers(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.prev_rank = _Peer(self.prev_rank, "prev")
        self.next_rank = _Peer(self.next_rank, "next")

    synchronize = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    communicator.__init__ = init_with_named_peers
    dist.P2POp = _tagged_p2p_op
    try:
        with _CudaMeansCpu():
            yield
    finally:
        torch.cuda.synchronize = synchronize
        communicator.__init__ = original_init
        dist.P2POp = _P2POp
