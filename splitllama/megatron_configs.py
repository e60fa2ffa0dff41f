"""Megatron's configurations of this model, made in ONE place.

* ``megatron_config``: the ``ModelParallelConfig`` of a ``ParallelLayout`` (the check, the
  benchmark and the tests build models with it; a trainer passes its own);
* ``stack_config``: a ``TransformerConfig`` for one Llama stack (lower or upper), from its
  Llama config and the caller's parallel settings, with the activation recompute of
  ``RECOMPUTE``;
* ``schedule_config``: the config megatron's pipeline schedules and verl's engine read as
  ``model.config`` (the upper stack's, with the pipeline settings);
* ``engine_configs``: what the verl bridge builds from megatron's parallel state and verl's
  ``override_transformer_config`` (the model's parallel config, its recompute choice, and
  the engine's ``TransformerConfig``).

Every other module takes these configs as they come; none sets megatron fields itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import LlamaConfig

from splitllama.layout import ParallelLayout
from splitllama.options import RECOMPUTE_CHOICES


def megatron_config(layout: ParallelLayout, dtype: torch.dtype, device: str,
                    initialize: bool = False) -> ModelParallelConfig:
    """Megatron's config of ``layout``. ``initialize=False`` skips weight init (the
    weights are loaded right after construction); benchmarks draw random ones."""
    return ModelParallelConfig(
        tensor_model_parallel_size=layout.tp,
        sequence_parallel=layout.sp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device == "cpu",
        perform_initialization=initialize,
    )


def parallel_fields(megatron_config: ModelParallelConfig) -> dict:
    """The ``ModelParallelConfig`` fields of the caller's config (which may itself be a
    ``TransformerConfig``)."""
    return {
        f.name: getattr(megatron_config, f.name)
        for f in dataclasses.fields(ModelParallelConfig)
        if f.init and hasattr(megatron_config, f.name)
    }


# Activation recompute, megatron's settings per choice. ``selective`` recomputes the MLP:
# its [tokens, 2 ffn] and [tokens, ffn] intermediates are about two thirds of a layer's
# activations (ffn = 3.5 h). Not core attention, megatron's default: a varlen kernel keeps
# no [S, S] scores, so there is nothing to save there. Not the norms: megatron-core
# 0.16.1's norm recompute (CheckpointWithoutOutput) needs Transformer Engine. ``full``
# keeps only each layer's input.
RECOMPUTE: dict[str, dict] = {
    "none": dict(recompute_granularity=None),
    "selective": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
assert tuple(RECOMPUTE) == RECOMPUTE_CHOICES, "one setting per recompute choice"


def stack_config(sub: LlamaConfig, megatron_config: ModelParallelConfig, num_layers: int,
                 recompute: str = "none") -> TransformerConfig:
    """Megatron config of one Llama stack. Pipeline fields are reset: a stack's layers do
    not depend on them, and stage placement is ``layout.stage_layouts``'s job alone.
    ``recompute``: a key of ``RECOMPUTE`` (``options.ModelOptions`` validated it)."""
    fields = parallel_fields(megatron_config)
    fields.update(
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        # needs apex's fused wgrad kernel, which this package does not require
        gradient_accumulation_fusion=False,
        num_layers=max(num_layers, 1),
        hidden_size=sub.hidden_size,
        ffn_hidden_size=sub.intermediate_size,
        num_attention_heads=sub.num_attention_heads,
        num_query_groups=sub.num_key_value_heads,
        kv_channels=sub.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=sub.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # SwiGLU is ``SwiGLU`` in the MLP's activation slot, which megatron reads only with
        # this flag (named for Transformer Engine, which is not used); its own fused SwiGLU
        # (bias_activation_fusion) is off: see ``SwiGLU`` for why
        use_te_activation_func=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        init_method_std=sub.initializer_range,
        **RECOMPUTE[recompute],
    )
    return TransformerConfig(**fields)


def schedule_config(upper_config: TransformerConfig, megatron_config: ModelParallelConfig) -> TransformerConfig:
    """The config megatron's pipeline schedules (and verl's engine: ``sequence_parallel``,
    ``fp8``) read as ``model.config``: the upper stack's, with the pipeline settings.

    Stages exchange tensors of different widths (h_lo before the adapter, h_hi after)
    and lengths (packed batches), so p2p must send shapes first: variable_seq_lengths.
    Set after construction, because TransformerConfig validation would otherwise ask for
    an all-to-all MoE dispatcher this dense model does not have."""
    config = dataclasses.replace(upper_config)
    config.pipeline_model_parallel_size = megatron_config.pipeline_model_parallel_size
    config.virtual_pipeline_model_parallel_size = megatron_config.virtual_pipeline_model_parallel_size
    config.microbatch_group_size_per_vp_stage = (megatron_config.microbatch_group_size_per_vp_stage
                                                 or megatron_config.pipeline_model_parallel_size)
    config.variable_seq_lengths = True
    config.pipeline_dtype = megatron_config.pipeline_dtype or megatron_config.params_dtype
    return config


_PARALLEL_FIELDS = {f.name for f in dataclasses.fields(ModelParallelConfig)}
_TRANSFORMER_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


class EngineConfigs(NamedTuple):
    parallel: ModelParallelConfig  # what the model chunks are built with
    recompute: str  # their activation recompute (a key of RECOMPUTE)
    engine: TransformerConfig  # what the engine reads as model.config (schedule_config's, with its overrides)


# The compute dtypes ``override_transformer_config`` may name (YAML cannot write a torch dtype).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
_DTYPE_FIELDS = ("params_dtype", "pipeline_dtype")


def _dtype(field: str, value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPE_NAMES.values():
        return value
    if isinstance(value, str) and value in DTYPE_NAMES:
        return DTYPE_NAMES[value]
    raise ValueError(f"override_transformer_config {field}={value!r}: allowed values are {sorted(DTYPE_NAMES)}")


def engine_configs(hf_config, tp: int, pp: int, vpp: int | None, dtype: torch.dtype,
                   overrides: Mapping[str, Any], cpu: bool) -> EngineConfigs:
    """The verl bridge's configs for megatron's parallel sizes (``tp``, ``pp``, ``vpp``;
    sequence parallelism on with TP unless overridden) and verl's
    ``override_transformer_config`` (``overrides``): ``ModelParallelConfig`` fields the model
    follows, ``recompute_granularity`` (``none | selective | full``: the model's activation
    recompute) and other ``TransformerConfig`` fields, which only the engine reads. A field
    megatron does not have, or a layout the config cannot take, is refused by name.

    ``params_dtype`` (a torch dtype or one of ``DTYPE_NAMES``) replaces ``dtype``, the
    engine's, as the model's compute dtype: verl's engine accepts only bfloat16 and float16,
    and a float64 check needs more. ``pipeline_dtype`` (what pipeline stages exchange) and
    the bf16 / fp16 flags follow it unless overridden themselves."""
    if "params_dtype" in overrides:
        dtype = _dtype("params_dtype", overrides["params_dtype"])
    fields = dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None, sequence_parallel=tp > 1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, use_cpu_initialization=cpu,
    )
    recompute, engine_only = "none", {}
    for key, value in overrides.items():
        if key == "recompute_granularity":
            recompute = value or "none"
            if recompute not in RECOMPUTE:
                raise ValueError(f"recompute_granularity={value!r} is not one of {sorted(RECOMPUTE)}")
        elif key in _DTYPE_FIELDS:
            fields[key] = _dtype(key, value)
        elif key in _PARALLEL_FIELDS:
            fields[key] = value
        elif key in _TRANSFORMER_FIELDS:
            engine_only[key] = value
        else:
            raise ValueError(f"override_transformer_config has {key!r}, which is no field of megatron's "
                             "TransformerConfig")
    parallel = ModelParallelConfig(**fields)
    # a layout the config cannot take is refused here, naming the field
    ParallelLayout.from_megatron(parallel).validate(hf_config)
    engine = schedule_config(stack_config(hf_config.upper, parallel, hf_config.num_upper, recompute), parallel)
    for key, value in engine_only.items():
        setattr(engine, key, value)
    return EngineConfigs(parallel, recompute, engine)
