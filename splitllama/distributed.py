"""Distributed set-up, in one place: the process group, megatron's parallel state for a
``ParallelLayout``, its teardown, and the megatron config derived from a layout.

Used by ``splitllama check``, ``splitllama bench`` and the tests alike. A trainer that
owns its own process groups and megatron state needs none of this: the model classes
take its ``ModelParallelConfig`` directly.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from splitllama.cpu_support import use_cpu
from splitllama.layout import ParallelLayout


def init_distributed(device: str, timeout: datetime.timedelta | None = None,
                     init_method: str | None = None) -> None:
    """The process group: from ``init_method`` (with ``RANK`` and ``WORLD_SIZE`` from the
    environment; ``splitllama check`` hands its ranks a ``file://`` rendezvous in a fresh
    directory), else from torchrun's environment (``env://``), else a world of one held in
    this process's memory (no launcher, or ``WORLD_SIZE=1`` without ``MASTER_PORT``). No
    port is picked and released to be bound later: two runs started at once cannot take
    the same one. ``timeout`` bounds every collective, so a diverging rank becomes an error
    instead of a hang."""
    if dist.is_initialized():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if init_method is not None:
        dist.init_process_group(backend, init_method=init_method, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 or "MASTER_PORT" in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(backend, timeout=timeout)
    else:
        # for code that reads the launcher's variables (the command line reads RANK)
        for name in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(name, "0")
        os.environ["WORLD_SIZE"] = "1"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


# On a gloo world (CPU): megatron's groups of the default backend, by what megatron asked
# for (ranks, role, timeout), and the world they belong to. Kept from one setup_parallel to
# the next and handed back when megatron asks for the same group again: re-initialising for
# every layout (every test does) made ~20 groups and destroyed them again each time, and
# destroying a gloo group joins its TCP device's threads (measured on 2 busy cores: 0.11 s
# per setup at 1 process, 0.27 s at 2, 0.52 s at 4; 0.02-0.12 s with the groups kept).
# Bounded by the distinct groups of the layouts a process runs (~45 per rank over every
# layout at 4 processes, 3 idle threads each); they go with the world (``shutdown``).
_KEPT: dict = {"world": None, "groups": {}}


@contextlib.contextmanager
def _gloo_groups_kept():
    """Inside: ``torch.distributed.new_group`` hands back a kept group where megatron asks
    for one it asked for before (megatron's own ``create_group`` still records it), and
    keeps what it makes. Every rank asks for every group in the same order (non-members get
    ``NON_GROUP_MEMBER``, kept too), so all ranks find or make each group together. Groups
    of an explicit backend (megatron's ``*_GLOO`` ones, which its destroy_model_parallel
    destroys itself) or with backend options are made as before."""
    if _KEPT["world"] is not dist.group.WORLD:  # a new world: the old one's groups are gone
        _KEPT.update(world=dist.group.WORLD, groups={})
    new_group = dist.new_group

    def kept_or_new(ranks=None, backend=None, pg_options=None, **kwargs):
        if backend is not None or pg_options is not None or ranks is None:
            return new_group(ranks=ranks, backend=backend, pg_options=pg_options, **kwargs)
        key = (tuple(ranks), *sorted(kwargs.items()))  # group_desc, timeout, use_local_synchronization
        if key not in _KEPT["groups"]:
            _KEPT["groups"][key] = new_group(ranks=ranks, **kwargs)
        return _KEPT["groups"][key]

    dist.new_group = kept_or_new
    try:
        yield
    finally:
        dist.new_group = new_group


def setup_parallel(layout: ParallelLayout, device: str, seed: int = 0) -> None:
    """(Re)initialise megatron's parallel state for ``layout`` on the current world."""
    world = dist.get_world_size()
    if world % layout.world_size:
        raise ValueError(f"world size {world} is not a multiple of tp*pp={layout.world_size} ({layout})")
    if device == "cpu":
        use_cpu()
    teardown_parallel()
    with _gloo_groups_kept() if dist.get_backend() == "gloo" else contextlib.nullcontext():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
        )
    if device == "cuda":  # megatron's GPU weight init draws from its model-parallel RNG
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def kept_groups() -> set:
    """The kept groups (``_KEPT``) this rank belongs to."""
    if _KEPT["world"] is not dist.group.WORLD:
        return set()
    live = dist.distributed_c10d._world.pg_map
    return {group for group in _KEPT["groups"].values() if group in live}


def teardown_parallel() -> None:
    """Destroy megatron's parallel state AND the process groups it created on this rank,
    except the kept ones (``_KEPT``: a gloo world's, reused by the next ``setup_parallel``).

    megatron's destroy_model_parallel forgets its groups but destroys only its data-parallel
    gloo ones. Each gloo group left alive keeps 3 threads (two run loops, one TCP loop), so
    a test session that re-initialised for every layout and left them piled up thousands of
    threads per rank and crawled into the collective timeout; on GPUs every leaked group is
    an NCCL communicator holding device memory."""
    if not dist.is_initialized():
        return
    # megatron records every group this rank belongs to (None stands for the world group)
    groups = [g for g in (parallel_state._global_process_group_list or []) if g is not None]
    # a peer may still be finishing its last collective on these groups
    dist.barrier()
    parallel_state.destroy_model_parallel()
    live = dist.distributed_c10d._world.pg_map
    kept = kept_groups()
    for group in dict.fromkeys(groups):
        if group in live and group not in kept:
            dist.destroy_process_group(group)


def shutdown() -> None:
    """Leave the process group together: no rank exits while another still talks to it."""
    if dist.is_initialized():
        dist.barrier()
        _KEPT.update(world=None, groups={})
        dist.destroy_process_group()
