"""Parallel layout: the ONE object that describes it (``ParallelLayout``), what a
tensor-parallel size requires of the config, and THE function that places layers, the
adapter, the embedding and the head on pipeline stages.

Model order is: embedding, lower layers 0..N-1, adapter, upper layers 0..M-1, final norm,
head. Layers are split over ``pp * vpp`` virtual stages; the adapter always travels with
upper layer 0, so a boundary "at the adapter" means one stage ends with the last lower
layer and the next starts with the adapter (and receives an ``h_lo``-wide tensor).
Megatron's interleaving puts model chunk ``c`` of pipeline rank ``r`` at virtual stage
``c * pp + r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitllama.config import CustomSplitLlamaConfig
from splitllama.parallel_sizes import MEGATRON_NAMES, check_parallel_sizes, round_up


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor (``tp``), sequence (``sp``, needs tp > 1 to split anything), pipeline
    (``pp``) and virtual pipeline (``vpp`` model chunks per pipeline rank) parallelism,
    and optionally the number of layers on each virtual stage in model order
    (``layers_per_stage``, ``pp * vpp`` counts; default: an even split). It is the one
    owner of the pipeline split: ``pipeline.build_chunks`` places each chunk from it.

    Megatron's ``ModelParallelConfig`` is derived from it (``splitllama.distributed``),
    and ``from_megatron`` reads the sizes back, so they are written in one place; the
    architecture config holds no parallel setting."""

    tp: int = 1
    sp: bool = False
    pp: int = 1
    vpp: int | None = None
    layers_per_stage: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_parallel_sizes(self.tp, self.sp, self.pp, self.vpp)
        if self.layers_per_stage is not None:
            counts = self.layers_per_stage
            if isinstance(counts, (str, bytes)) or not hasattr(counts, "__iter__"):
                raise ValueError(f"layers_per_stage must be None or a sequence of layer counts, got {counts!r}")
            object.__setattr__(self, "layers_per_stage", tuple(counts))

    @classmethod
    def from_megatron(cls, megatron_config: Any) -> ParallelLayout:
        """The parallel sizes of a megatron ``ModelParallelConfig`` (or ``TransformerConfig``),
        with an even pipeline split (megatron's configs do not hold this model's split)."""
        vpp = megatron_config.virtual_pipeline_model_parallel_size
        return cls(
            tp=megatron_config.tensor_model_parallel_size,
            sp=bool(megatron_config.sequence_parallel) and megatron_config.tensor_model_parallel_size > 1,
            pp=megatron_config.pipeline_model_parallel_size,
            vpp=vpp if vpp and vpp > 1 else None,
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def validate(self, config: CustomSplitLlamaConfig) -> list[StageLayout]:
        """Refuse a layout the config cannot take (naming the field); its stages."""
        validate_tensor_parallel(config, self.tp)
        return stage_layouts(config, self.pp, self.vpp, self.layers_per_stage)

    def __str__(self) -> str:
        parts = [f"tp{self.tp}"] + (["sp"] if self.sp else []) + [f"pp{self.pp}"]
        if self.vpp:
            parts.append(f"vpp{self.vpp}")
        if self.layers_per_stage:
            parts.append("split" + "-".join(map(str, self.layers_per_stage)))
        return "_".join(parts)


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


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 1) -> int:
    """Rows of the embedding and LM head: ``vocab_size`` rounded up to a multiple of
    ``divisible_by * tp`` (megatron's ``make_vocab_size_divisible_by``), so any vocabulary
    splits over any TP. TP rank r holds rows ``[r Vp/tp, (r+1) Vp/tp)``; rows ``>= vocab_size``
    are padding (zero, never looked up, masked out of every output; see ``heads.LMHead``)."""
    multiple = divisible_by * tp
    padded = round_up(vocab_size, multiple)
    if padded - vocab_size >= padded // tp:
        raise ValueError(
            f"make_vocab_size_divisible_by={divisible_by} at tensor_model_parallel_size={tp} pads "
            f"vocab_size={vocab_size} to {padded}, leaving the last TP rank no real vocabulary row: "
            f"use a smaller make_vocab_size_divisible_by"
        )
    return padded


def real_vocab_rows(start: int, width: int, vocab_size: int) -> range:
    """The real rows (global indices below ``vocab_size``) among the ``width`` padded
    vocabulary rows that begin at global row ``start``: a TP rank's share of the embedding,
    the LM head or the logits' columns (rank r starts at ``r * width``)."""
    return range(min(start, vocab_size), min(start + width, vocab_size))


def validate_tensor_parallel(config: CustomSplitLlamaConfig, tp: int) -> None:
    """Refuse a TP size that does not divide what megatron shards (the vocabulary is
    padded instead: ``padded_vocab_size``)."""
    check_parallel_sizes(tp=tp, names=MEGATRON_NAMES)
    checks = []
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
    overrides the even split."""
    vpp = vpp or 1
    check_parallel_sizes(pp=pp, vpp=vpp, names=MEGATRON_NAMES)
    n, m = config.num_lower, config.num_upper
    total, stages = n + m, pp * vpp
    if layers_per_stage is None:
        if total < stages:
            raise ValueError(
                f"{total} layers (num_layers_8={n} + num_layers_70={m}) cannot fill "
                f"{stages} pipeline stages (pp={pp} x vpp={vpp}): every stage needs a layer"
            )
        if total % stages:
            raise ValueError(
                f"{total} layers (num_layers_8={n} + num_layers_70={m}) do not split evenly "
                f"over {stages} pipeline stages (pp={pp} x vpp={vpp}); pass "
                f"layers_per_stage, a list of {stages} counts summing to {total}"
            )
        layers_per_stage = [total // stages] * stages
    counts = list(layers_per_stage)
    if len(counts) != stages or sum(counts) != total or any(
        not isinstance(c, int) or c < 1 for c in counts
    ):
        raise ValueError(
            f"layers_per_stage={counts} must hold {stages} (pp={pp} x vpp={vpp}) "
            f"positive counts summing to {total} (num_layers_8={n} + num_layers_70={m})"
        )

    layouts, start = [], 0
    for v, count in enumerate(counts):
        stop = start + count
        lower = range(min(start, n), min(stop, n))
        upper = range(max(start, n) - n, max(stop, n) - n)
        has_adapter = 0 in upper
        layouts.append(
            StageLayout(
                virtual_stage=v, pp_rank=v % pp, chunk=v // pp,
                lower_layers=lower, has_adapter=has_adapter, upper_layers=upper,
                has_embedding=v == 0, has_head=v == stages - 1,
            )
        )
        start = stop
    return layouts


def stage_layout(
    config: CustomSplitLlamaConfig, pp: int, vpp: int | None, pp_rank: int, chunk: int,
    layers_per_stage: list[int] | tuple[int, ...] | None = None,
) -> StageLayout:
    """The layout of one (pipeline rank, model chunk)."""
    vpp = vpp or 1
    if not 0 <= pp_rank < pp or not 0 <= chunk < vpp:
        raise ValueError(f"pp_rank={pp_rank}, chunk={chunk} outside pp={pp}, vpp={vpp}")
    return stage_layouts(config, pp, vpp, layers_per_stage)[chunk * pp + pp_rank]
