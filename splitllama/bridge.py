"""The model for verl's Megatron engine: an mbridge ``Bridge`` for ``custom_split_llama``.

verl builds, loads, saves and exports every Megatron model through a bridge. Importing this
module (verl: ``actor_rollout_ref.model.external_lib=splitllama.bridge``) registers
``SplitLlamaBridge`` with mbridge for ``model_type: custom_split_llama`` (and registers the
config with transformers' ``AutoConfig``), so that

* ``mbridge.AutoBridge.from_config(hf_config, dtype=...)`` checks the config and megatron's
  current parallel state (TP, SP, PP, VPP) against each other;
* ``get_model(...)`` builds this rank's model chunks, the production pipeline classes
  (``ParallelCustomSplitLLamaForCausalLMRmPadPP`` or, when verl asks for a value model,
  ``...ForValueRmPadPP``), one per virtual pipeline stage, as megatron returns them;
* ``load_weights`` / ``save_weights`` read / write a split checkpoint through
  ``checkpoint/split.py`` (strict, each rank reading its own slices);
* ``export_weights`` yields every tensor of the split checkpoint once, full (TP-gathered)
  and under its checkpoint name, on every rank: what verl hands to the rollout engine.

It also gives verl's FLOPs counter (``verl/utils/flops_counter.py``, which keys its
estimators by ``model_type`` and logs MFU 0 for a type it does not know) this model's FLOP
count: ``bench_workload.useful_flops``, the count ``splitllama bench`` reports.

mbridge's own weight-name mapping (GPTModel names) is not used: ``checkpoint/sharding.py`` declares
every weight of this model once, and the loader, saver and exporter read that.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Generator

import torch
from mbridge.core import Bridge, register_model
from mbridge.core.util import unwrap_model
from megatron.core.enums import ModelType
from megatron.core.transformer.transformer_config import TransformerConfig

from splitllama import weight_names as wn
from splitllama.bench_workload import useful_flops
from splitllama.checkpoint.split import iter_full_state, load_checkpoint, save_checkpoint
from splitllama.config import MODEL_TYPE, CustomSplitLlamaConfig
from splitllama.cpu_support import cpu_enabled
from splitllama.grads import wrap_ddp
from splitllama.megatron_configs import EngineConfigs, engine_configs
from splitllama.options import ModelOptions
from splitllama.pipeline import (
    ParallelCustomSplitLLamaForCausalLMRmPadPP,
    ParallelCustomSplitLLamaForValueRmPadPP,
    build_chunks,
)
from splitllama.checkpoint.directory import check_model_type
from splitllama.checkpoint.safetensors_io import SafetensorsReader

# Callbacks mbridge's and verl's get_model pass for GPTModel: a value head in place of
# the output layer (this bridge builds the value class instead) and a frozen MoE router
# (this model has none).
_VALUE_CALLBACK = "make_value_model"
_IGNORED_CALLBACKS = {_VALUE_CALLBACK, "freeze_moe_router"}


def split_config(hf_config) -> CustomSplitLlamaConfig:
    """The bridge's config: a ``CustomSplitLlamaConfig`` (or any config object of that
    model type), validated."""
    check_model_type(getattr(hf_config, "model_type", None), "hf_config")
    if not isinstance(hf_config, CustomSplitLlamaConfig):
        hf_config = CustomSplitLlamaConfig.from_dict(hf_config.to_dict())
    hf_config.check_split()
    return hf_config


def _device() -> torch.device:
    if cpu_enabled() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@register_model(MODEL_TYPE)
class SplitLlamaBridge(Bridge):
    """mbridge's ``Bridge`` for a Custom Split LLaMA (see the module docstring).

    ``config`` is the megatron ``TransformerConfig`` verl's engine reads (parallel sizes,
    ``sequence_parallel``, dtypes; the upper stack's shapes). ``set_extra_args`` (verl's
    ``override_transformer_config``) may set ``ModelParallelConfig`` fields, which the model
    follows, ``recompute_granularity`` (``none | selective | full``: the model's activation
    recompute) and other ``TransformerConfig`` fields, which only the engine reads."""

    def __init__(self, hf_config, dtype: torch.dtype = torch.bfloat16, parallel_states=None,
                 make_vocab_size_divisible_by: int | None = None):
        super().__init__(split_config(hf_config), dtype, parallel_states, make_vocab_size_divisible_by)

    # ---- config -------------------------------------------------------------------------
    def _configs(self) -> EngineConfigs:
        """The model's parallel config, recompute choice and the engine's config, from
        megatron's parallel state (mbridge's ``mpu``) and verl's overrides (``extra_args``)."""
        return engine_configs(self.hf_config, self.mpu.tp_size, self.mpu.pp_size, self.mpu.vpp_size, self.dtype,
                              self.extra_args, cpu=_device().type == "cpu")

    def _build_config(self) -> TransformerConfig:
        return self._configs().engine

    # ---- model --------------------------------------------------------------------------
    def get_model(self, weight_path: str | None = None, model_type=ModelType.encoder_or_decoder,
                  wrap_with_ddp: bool = False, fp16: bool = False, bf16: bool = True,
                  post_model_creation_callbacks: list[Callable] = (), ddp_config: dict | None = None,
                  value: bool = False, **kwargs) -> list[torch.nn.Module]:
        """This rank's model chunks (one per virtual pipeline stage), in ``self.dtype``.
        A value model is built when ``value=True`` or when the callbacks include mbridge's
        ``make_value_model`` (how verl asks for a critic). ``wrap_with_ddp``: megatron's
        ``DistributedDataParallel`` around each chunk (``ddp_config``: its fields).

        No ``Float16Module``: the chunks already compute in ``self.dtype`` and return float32
        outputs, and its cast of every buffer would round the float32 rotary frequencies."""
        callbacks = list(post_model_creation_callbacks or ())
        value = value or any(getattr(cb, "__name__", "") == _VALUE_CALLBACK for cb in callbacks)
        configs = self._configs()
        parallel, recompute = configs.parallel, configs.recompute
        cls = ParallelCustomSplitLLamaForValueRmPadPP if value else ParallelCustomSplitLLamaForCausalLMRmPadPP
        options = ModelOptions(recompute=recompute, make_vocab_size_divisible_by=self.make_vocab_size_divisible_by or 1)
        chunks = build_chunks(cls, self.hf_config, parallel, options)
        for chunk in chunks:
            chunk.model_type = model_type
            for cb in callbacks:
                if getattr(cb, "__name__", "") not in _IGNORED_CALLBACKS:
                    cb(chunk, chunk.pre_process, chunk.post_process, chunk.config, self.hf_config)
        if weight_path:
            self.load_weights(chunks, weight_path)
        if wrap_with_ddp:
            from megatron.core.distributed import DistributedDataParallelConfig

            ddp = DistributedDataParallelConfig(**{"grad_reduce_in_fp32": True, "use_distributed_optimizer": True,
                                                   **(ddp_config or {})})
            chunks = wrap_ddp(chunks, ddp)
        return chunks

    # ---- weights ------------------------------------------------------------------------
    def load_weights(self, models: list[torch.nn.Module], weights_path: str, memory_efficient: bool = False) -> None:
        """Load a split checkpoint (strict; each rank reads its slices). A value model
        loaded from a causal-LM checkpoint (no ``score.weight``, as verl's critic starts
        from the actor's weights) gets a fresh value head."""
        chunks = [unwrap_model(m) for m in models]
        fresh = chunks[0].head_kind == "value" and wn.VALUE_HEAD not in SafetensorsReader(weights_path)
        load_checkpoint(chunks, weights_path, fresh_value_head=fresh, progress=False)

    def save_weights(self, models: list[torch.nn.Module], weights_path: str, memory_efficient: bool = False) -> None:
        """Write a split checkpoint (collective: every rank calls it)."""
        save_checkpoint([unwrap_model(m) for m in models], weights_path, progress=False)

    def export_weights(self, models: list[torch.nn.Module]) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Every tensor of the split checkpoint, once, as ``(checkpoint name, full tensor)``
        on every rank, in model order (``checkpoint.split.iter_full_state``; collective: all
        ranks iterate together)."""
        yield from iter_full_state([unwrap_model(m) for m in models])


# ---- verl's FLOPs counter -------------------------------------------------------------------
def estimate_tflops(hf_config, tokens_sum: int, batch_seqlens: list[int], delta_time: float) -> float:
    """Achieved TFLOP/s of one training step over documents of ``batch_seqlens`` tokens
    taking ``delta_time`` seconds: verl's estimator signature (``tokens_sum`` is their sum)."""
    return useful_flops(split_config(hf_config), [int(n) for n in batch_seqlens]) / delta_time / 1e12


if importlib.util.find_spec("verl") is not None:  # mbridge alone has no FLOPs counter to tell
    from verl.utils import flops_counter

    flops_counter.ESTIMATE_FUNC[MODEL_TYPE] = estimate_tflops
