"""Run megatron-core 0.16.1 on CPU with gloo: every change it needs, in this one place.

Production on GPU needs none of this. ``use_cpu()`` patches the running process:

* ``torch.cuda.current_device`` answers the CPU device, so megatron's buffers (SP
  all-gather buffers of ``parallel_state._GLOBAL_MEMORY_BUFFER``, linear-layer
  workspaces) are CPU tensors;
* an inference-mode RNG tracker replaces ``model_parallel_cuda_manual_seed`` (which needs
  CUDA); the model has no dropout, so no RNG stream is consumed;
* this package's compiled element-wise functions (``elementwise.py``) and any megatron
  jit fusion (``torch.compile``) run eagerly: the same functions, uncompiled, because
  compiling took 3.5-21 s per new shape on a 2-core CPU, and the tiny models' shapes vary
  per test;
* activation recompute saves and restores the CUDA RNG state around each recomputed
  region; on CPU there is none, so that part is a no-op (megatron still restores the CPU
  RNG state itself);
* megatron's distributed optimizer over torch's Adam (no Transformer Engine or apex
  here) gets its states from a dummy step before a checkpoint is loaded into it, and a
  step count of its own per parameter after loading;
* ``cpu_schedule_context()`` wraps a pipeline schedule call: megatron's schedules
  allocate with ``device="cuda"`` and call ``torch.cuda.synchronize``; inside the context
  "cuda" means "cpu" and synchronize is a no-op. It also tags pipeline p2p messages by
  direction: gloo matches a batch of isend/irecv between two ranks in posting order, and
  megatron posts ``[send_prev, recv_prev, send_next, recv_next]``; with two pipeline
  ranks (prev == next) and interleaving, both directions are in flight at once and the
  activation would land in the gradient's buffer. Tags keep the two streams apart;
* ``cuda_means_cpu()`` is the device part of that context alone, for megatron's
  distributed checkpointing (``checkpoint.megatron_dist.save``/``load`` enter it) and for building
  and stepping megatron's optimizers (they allocate on "cuda" and pick a parameter's
  handling by its type string, "torch.cuda.FloatTensor").

Models built after ``use_cpu()`` need ``use_cpu_initialization=True`` in their megatron
config (``megatron_configs.megatron_config(layout, dtype, "cpu")`` sets it).

``use_cpu_for_verl()`` also lets verl 0.9.1's own entry points (its ``TrainingWorker`` and
SFT trainer) run here, through verl's platform plugin API (``verl.plugin.platform``): a CPU
platform answers what verl asks its platform (device name, ids, memory figures, the
collective backend), and ``VERL_ENGINE_DEVICE=cuda`` is verl's own override for its engine
registry, where the Megatron engine is registered for "cuda" only. verl's code is not
changed; the megatron calls inside it still need ``cuda_means_cpu()`` around them.
"""

from __future__ import annotations

import contextlib
import logging
import os

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
    torch.compiler.set_stance("force_eager")
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _distributed_optimizer_over_torch_adam()
    _state["enabled"] = True


def _distributed_optimizer_over_torch_adam() -> None:
    """Without Transformer Engine or apex, megatron's distributed optimizer wraps torch's
    Adam, whose state (and its step count, which ``state_dict`` reads) exists only after a
    first step; building the sharded state dict to load a checkpoint into a fresh
    optimizer then fails. Before that, take megatron's own dummy step (zero gradients),
    whose states the loaded ones replace."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    sharded_state_dict = cls.sharded_state_dict

    def with_states(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and not distrib_optimizer.HAVE_APEX_OR_TE and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    cls.sharded_state_dict = with_states

    # Loading gives every parameter's Adam state ONE shared step tensor, which torch's Adam
    # then increments in place once per parameter: after the next step it counts
    # parameters, not steps. Each state gets its own copy.
    load_state_dict = cls.load_state_dict

    def with_own_steps(self, state_dict):
        load_state_dict(self, state_dict)
        if not distrib_optimizer.HAVE_APEX_OR_TE:
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()

    cls.load_state_dict = with_own_steps

    # The model-space formats (fully_reshardable) restore each state tensor a parameter's
    # Adam state holds; torch's Adam also holds its step there, which those formats keep
    # in the parameter groups (restored by load_state_dict): it stays as loaded.
    set_states = cls._set_main_param_and_optimizer_states

    def keeping_step(self, model_param, tensors):
        if not distrib_optimizer.HAVE_APEX_OR_TE and "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            if "step" in self.optimizer.state[main_param]:
                tensors = {**tensors, "step": self.optimizer.state[main_param]["step"]}
        return set_states(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = keeping_step


def cpu_enabled() -> bool:
    return _state["enabled"]


class _CudaMeansCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments of tensor factories to the CPU, makes
    ``tensor.cuda()`` return the (CPU) tensor itself, and ``tensor.type()`` name a CPU
    tensor's type as its CUDA type (megatron's distributed optimizer accepts parameters
    of type ``torch.cuda.FloatTensor`` and the half types only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = dict(kwargs, device=_CPU)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_means_cpu():
    """Inside: "cuda" devices mean the CPU and ``torch.cuda.synchronize`` is a no-op; a no-op
    context unless ``use_cpu()`` ran. For megatron code that allocates on "cuda" or waits for
    the GPU: its pipeline schedules, and its distributed checkpointing (``dist_checkpointing``
    save/load, whose writers synchronise and whose fully parallel load exchanges "cuda"
    buffers)."""
    if not _state["enabled"]:
        yield
        return
    synchronize = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        with _CudaMeansCpu():
            yield
    finally:
        torch.cuda.synchronize = synchronize


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

    communicator.__init__ = init_with_named_peers
    dist.P2POp = _tagged_p2p_op
    try:
        with cuda_means_cpu():
            yield
    finally:
        communicator.__init__ = original_init
        dist.P2POp = _P2POp


# ---- verl's entry points on CPU ------------------------------------------------------------
class _CpuDeviceModule:
    """What verl calls on ``get_torch_device()`` (its platform's device module), for the CPU:
    the CPU has no device memory statistics, so the memory figures verl logs are 0."""

    @staticmethod
    def is_available() -> bool:
        # verl/utils/memory_utils.py aggressive_empty_cache: no device cache to empty
        return False

    @staticmethod
    def current_device() -> torch.device:
        # verl/workers/engine/megatron/transformer_impl.py forward_step: batch.to(get_device_id())
        return _CPU

    @staticmethod
    def set_device(index) -> None:
        # verl/utils/distributed.py initialize_global_process_group: set_device(local_rank)
        pass

    @staticmethod
    def synchronize(*args, **kwargs) -> None:
        pass

    @staticmethod
    def device_count() -> int:
        # verl/workers/engine/megatron/utils.py set_random_seed: no device RNG to seed
        return 0

    @staticmethod
    def empty_cache() -> None:
        # verl/utils/memory_utils.py aggressive_empty_cache, the engine's optimizer_step
        pass

    @staticmethod
    def max_memory_allocated(*args, **kwargs) -> int:
        # verl/workers/engine_workers.py TrainingWorker._postprocess_output: perf/max_memory_*
        return 0

    max_memory_reserved = memory_allocated = memory_reserved = max_memory_allocated

    @staticmethod
    def mem_get_info(*args, **kwargs) -> tuple[int, int]:
        # verl/utils/profiler/performance.py _get_current_mem_info (log_gpu_memory_usage)
        return 0, 0

    @staticmethod
    def get_device_name(*args, **kwargs) -> str:
        # verl/utils/flops_counter.py get_device_flops: "CPU" is a key of its _DEVICE_FLOPS
        return "CPU"

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(*args, **kwargs) -> torch.Tensor:
        # verl/utils/checkpoint/megatron_checkpoint_manager.py get_rng_state
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs) -> None:
        torch.set_rng_state(state)


def _cpu_platform():
    """verl's ``PlatformBase`` for the CPU (see ``use_cpu_for_verl``)."""
    from verl.plugin.platform import PlatformBase

    class CpuPlatform(PlatformBase):
        device_name = "cpu"  # torch.device(get_device_name()) allocations, the SFT trainer's .to()
        vendor_name = "cpu"
        device_module = _CpuDeviceModule

        def is_available(self) -> bool:
            return True

        def current_device(self) -> torch.device:
            return _CPU

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            # verl/utils/distributed.py initialize_global_process_group: "cpu:gloo,cpu:gloo"
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self):
            return None

    return CpuPlatform()


def use_cpu_for_verl() -> None:
    """``use_cpu()``, and verl's platform set to the CPU (module docstring). Idempotent; call
    before verl's ``TrainingWorker`` or trainer is built."""
    use_cpu()
    if _state.get("verl"):
        return
    from verl.plugin.platform import set_platform

    # verl/workers/engine/base.py EngineRegistry.get_engine_cls: the Megatron engine is
    # registered for device "cuda"; this is the override verl reads there
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    set_platform(_cpu_platform())
    _state["verl"] = True
