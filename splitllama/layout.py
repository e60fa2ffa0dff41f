"""Parallel layout: what a tensor-parallel size requires of the config, and THE function
that places layers, the adapter, the embedding and the head on pipeline stages.

Model order is: embedding, lower layers 0..N-1, adapter, upper layers 0..M-1, final norm,
head. Layers are split over ``pp * vpp`` virtual stages; the adapter always travels with
upper layer 0, so a boundary "at the adapter" means one stage ends with the last lower
layer and the next starts with the adapter (and receives an ``h_lo``-wide tensor).
Megatron's interleaving puts model chunk ``c`` of pipeline rank ``r`` at virtual stage
``c * pp + r``.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitllama.config import CustomSplitLlamaConfig


@dataclass(frozen=True)
class StageLayout:
    virtual_stage: int
    pp_rank: int
    chunk: int
    lower_layers: range  # indices into the split model's lower stack
    has_adapter: bool
    upper_layers: range  # indices into the split model's upper stack
    has_embedding: bool
    has_head: bool  # final norm + LM/value head
    input_hidden: int | None  # width of the tensor received from the previous stage
    output_hidden: int  # width of the tensor this stage emits (before the head)

    @property
    def num_layers(self) -> int:
        return len(self.lower_layers) + len(self.upper_layers)


def validate_tensor_parallel(config: CustomSplitLlamaConfig, tp: int) -> None:
    """Refuse a TP size that does not divide what megatron shards."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_model_parallel_size must be a positive int, got {tp!r}")
    checks = [("vocab_size", config.vocab_size)]
    for field, sub in (("lower_config", config.lower), ("upper_config", config.upper)):
        checks += [
            (f"{field}.num_attention_heads", sub.num_attention_heads),
            (f"{field}.num_key_value_heads", sub.num_key_value_heads),
            (f"{field}.intermediate_size", sub.intermediate_size),
        ]
    checks.append(("upper_config.hidden_size (adapter output)", config.h_hi))
    for name, value in checks:
        if value % tp:
            raise ValueError(
                f"{name}={value} is not divisible by tensor_model_parallel_size={tp}"
            )


def stage_layouts(
    config: CustomSplitLlamaConfig,
    pp: int = 1,
    vpp: int | None = None,
    layers_per_stage: list[int] | None = None,
) -> list[StageLayout]:
    """All virtual stages in model order. ``layers_per_stage`` (length ``pp * vpp``)
    overrides the even split; it defaults to ``config.pipeline_layers_per_stage``."""
    vpp = vpp or 1
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pipeline_model_parallel_size must be a positive int, got {pp!r}")
    if not isinstance(vpp, int) or vpp < 1:
        raise ValueError(f"virtual_pipeline_model_parallel_size must be a positive int, got {vpp!r}")
    if vpp > 1 and pp == 1:
        raise ValueError("virtual_pipeline_model_parallel_size > 1 needs pipeline_model_parallel_size > 1")
    n, m = config.num_lower, config.num_upper
    total, stages = n + m, pp * vpp
    if layers_per_stage is None:
        layers_per_stage = config.pipeline_layers_per_stage
    if layers_per_stage is None:
        if total < stages:
            raise ValueError(
                f"{total} layers (num_layers_8={n} + num_layers_70={m}) cannot fill "
                f"{stages} pipeline stages (pp={pp} x vpp={vpp}): every stage needs a layer"
            )
        if total % stages:
            raise ValueError(
                f"{total} layers (num_layers_8={n} + num_layers_70={m}) do not split evenly "
                f"over {stages} pipeline stages (pp={pp} x vpp={vpp}); set "
                f"pipeline_layers_per_stage to a list of {stages} counts summing to {total}"
            )
        layers_per_stage = [total // stages] * stages
    counts = list(layers_per_stage)
    if len(counts) != stages or sum(counts) != total or any(
        not isinstance(c, int) or c < 1 for c in counts
    ):
        raise ValueError(
            f"pipeline_layers_per_stage={counts} must hold {stages} (pp={pp} x vpp={vpp}) "
            f"positive counts summing to {total} (num_layers_8={n} + num_layers_70={m})"
        )

    layouts, start = [], 0
    for v, count in enumerate(counts):
        stop = start + count
        lower = range(min(start, n), min(stop, n))
        upper = range(max(start, n) - n, max(stop, n) - n)
        has_adapter = 0 in upper
        input_hidden = None if v == 0 else (config.h_lo if start <= n else config.h_hi)
        output_hidden = config.h_lo if stop <= n else config.h_hi
        layouts.append(
            StageLayout(
                virtual_stage=v, pp_rank=v % pp, chunk=v // pp,
                lower_layers=lower, has_adapter=has_adapter, upper_layers=upper,
                has_embedding=v == 0, has_head=v == stages - 1,
                input_hidden=input_hidden, output_hidden=output_hidden,
            )
        )
        start = stop
    return layouts


def stage_layout(
    config: CustomSplitLlamaConfig, pp: int, vpp: int | None, pp_rank: int, chunk: int
) -> StageLayout:
    """The layout of one (pipeline rank, model chunk)."""
    vpp = vpp or 1
    if not 0 <= pp_rank < pp or not 0 <= chunk < vpp:
        raise ValueError(f"pp_rank={pp_rank}, chunk={chunk} outside pp={pp}, vpp={vpp}")
    return stage_layouts(config, pp, vpp)[chunk * pp + pp_rank]
