"""How every weight is sharded over tensor parallelism: declared ONCE, here.

Each ``WeightSpec`` ties one production parameter (its path in the model) to the
checkpoint tensor(s) it holds and how it is sharded (its ``sharding``):

* ``Replicated``   every TP rank holds the whole tensor (norms, the value head);
* ``Split(dim)``   contiguous 1/tp slices along ``dim`` (0: column-parallel outputs;
                   1: row-parallel inputs);
* ``VocabSplit``   the embedding and the LM head: ``vocab`` checkpoint rows, ``padded``
                   model rows (``layout.padded_vocab_size``); rank r holds model rows
                   ``[r padded/tp, (r+1) padded/tp)``, reads the real ones among them and
                   zero-fills the rest; gathering drops the padding again, so checkpoints
                   and gathered gradients have exactly ``vocab`` rows;
* ``FusedQKV``     megatron's ``linear_qkv``: rows interleaved per query group
                   ``[q heads of group g; k_g; v_g]`` for each g, groups split over TP;
* ``FusedGateUp``  megatron's ``linear_fc1``: ``[gate; up]``, each half split over TP
                   (stride 2: rank r holds ``[gate_r; up_r]``).

The loader, the saver and the tests' gradient gathering all read ``weight_specs``; the
three operations they need are ``local_slices`` (which part of each checkpoint tensor a
rank needs: lets the loader read only that), ``fuse`` and ``unfuse``; distributed
checkpoints read ``local_blocks`` (the same parts as views of the production tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig

from splitllama import weight_names as wn
from splitllama.config import CustomSplitLlamaConfig
from splitllama.layout import StageLayout, real_vocab_rows


@dataclass(frozen=True)
class Replicated:
    pass


@dataclass(frozen=True)
class Split:
    dim: int


@dataclass(frozen=True)
class VocabSplit:
    vocab: int
    padded: int


@dataclass(frozen=True)
class FusedQKV:
    heads: int
    groups: int
    head_dim: int


@dataclass(frozen=True)
class FusedGateUp:
    pass


Sharding = Replicated | Split | VocabSplit | FusedQKV | FusedGateUp


@dataclass(frozen=True)
class WeightSpec:
    param: str  # production parameter path, e.g. "model.lower.layers.0.mlp.linear_fc1.weight"
    names: tuple[str, ...]  # checkpoint tensors, in fusion order
    sharding: Sharding


def _layer_specs(param_prefix: str, name_of, sub: LlamaConfig) -> list[WeightSpec]:
    qkv = FusedQKV(sub.num_attention_heads, sub.num_key_value_heads, sub.head_dim)
    return [
        WeightSpec(f"{param_prefix}.input_layernorm.weight", (name_of("input_layernorm.weight"),), Replicated()),
        WeightSpec(
            f"{param_prefix}.self_attention.linear_qkv.weight",
            tuple(name_of(f"self_attn.{p}_proj.weight") for p in "qkv"),
            qkv,
        ),
        WeightSpec(f"{param_prefix}.self_attention.linear_proj.weight", (name_of("self_attn.o_proj.weight"),), Split(1)),
        WeightSpec(f"{param_prefix}.pre_mlp_layernorm.weight", (name_of("post_attention_layernorm.weight"),), Replicated()),
        WeightSpec(
            f"{param_prefix}.mlp.linear_fc1.weight",
            (name_of("mlp.gate_proj.weight"), name_of("mlp.up_proj.weight")),
            FusedGateUp(),
        ),
        WeightSpec(f"{param_prefix}.mlp.linear_fc2.weight", (name_of("mlp.down_proj.weight"),), Split(1)),
    ]


def weight_specs(config: CustomSplitLlamaConfig, stage: StageLayout, head: wn.Head,
                 padded_vocab: int | None = None) -> list[WeightSpec]:
    """Every parameter of one (virtual) pipeline stage, in model order. ``padded_vocab``:
    the model's embedding/LM-head rows (default: no padding)."""
    vocab = VocabSplit(config.vocab_size, padded_vocab or config.vocab_size)
    specs: list[WeightSpec] = []
    if stage.has_embedding:
        specs.append(WeightSpec("model.embed_tokens.weight", (wn.EMBED,), vocab))
    for k, i in enumerate(stage.lower_layers):
        specs += _layer_specs(f"model.lower.layers.{k}", lambda s, i=i: wn.lower_layer(i, s), config.lower)
    if stage.has_adapter:
        if config.mlp:
            specs.append(WeightSpec("model.adapter.linear_1.weight", (wn.ADAPTER_MLP_1,), Split(0)))
            specs.append(WeightSpec("model.adapter.linear_2.weight", (wn.ADAPTER_MLP_2,), Split(1)))
        else:
            specs.append(WeightSpec("model.adapter.proj.weight", (wn.ADAPTER_LINEAR,), Split(0)))
    for k, j in enumerate(stage.upper_layers):
        specs += _layer_specs(f"model.upper.layers.{k}", lambda s, j=j: wn.upper_layer(j, s), config.upper)
    if stage.has_head:
        specs.append(WeightSpec("model.norm.weight", (wn.FINAL_NORM,), Replicated()))
        if head == "lm":
            specs.append(WeightSpec("lm_head.weight", (wn.LM_HEAD,), vocab))
        else:
            specs.append(WeightSpec("output_layer.weight", (wn.VALUE_HEAD,), Replicated()))
    return specs


def _part(size: int, tp_rank: int, tp: int, what: str) -> slice:
    if size % tp:
        raise ValueError(f"{what} of size {size} cannot be split over tensor_model_parallel_size={tp}")
    step = size // tp
    return slice(tp_rank * step, (tp_rank + 1) * step)


def local_slices(spec: WeightSpec, shapes: list[tuple[int, ...]], tp_rank: int, tp: int) -> list[tuple[slice, ...]]:
    """For each checkpoint tensor of ``spec``, the index that TP rank ``tp_rank`` needs."""
    kind = spec.sharding
    if isinstance(kind, Replicated):
        return [(slice(None),) for _ in shapes]
    if isinstance(kind, Split):
        (shape,) = shapes
        index = [slice(None)] * len(shape)
        index[kind.dim] = _part(shape[kind.dim], tp_rank, tp, spec.names[0])
        return [tuple(index)]
    if isinstance(kind, VocabSplit):
        rows = _part(kind.padded, tp_rank, tp, f"{spec.names[0]} (padded vocabulary)")
        real = real_vocab_rows(rows.start, rows.stop - rows.start, kind.vocab)
        return [(slice(real.start, real.stop),)]
    if isinstance(kind, FusedQKV):
        # Whole query groups per rank: rank r holds groups [r*g/tp, (r+1)*g/tp).
        group_part = _part(kind.groups, tp_rank, tp, f"{spec.names[1]} query groups")
        q_rows = kind.heads // kind.groups * kind.head_dim
        return [
            (slice(group_part.start * rows, group_part.stop * rows),)
            for rows in (q_rows, kind.head_dim, kind.head_dim)
        ]
    if isinstance(kind, FusedGateUp):
        return [(_part(shape[0], tp_rank, tp, name),) for shape, name in zip(shapes, spec.names)]
    raise AssertionError(f"unknown sharding {kind!r}")


def fuse(spec: WeightSpec, pieces: list[torch.Tensor], tp: int = 1) -> torch.Tensor:
    """Checkpoint slices (from ``local_slices``) -> the local production tensor."""
    kind = spec.sharding
    if isinstance(kind, VocabSplit):
        (piece,) = pieces
        return torch.nn.functional.pad(piece, (0, 0, 0, kind.padded // tp - piece.shape[0]))
    if isinstance(kind, FusedQKV):
        q, k, v = pieces
        d, hidden = kind.head_dim, q.shape[-1]
        groups = k.shape[0] // d
        fused = torch.cat(
            [q.reshape(groups, -1, hidden), k.reshape(groups, d, hidden), v.reshape(groups, d, hidden)], dim=1
        )
        return fused.reshape(-1, hidden)
    if isinstance(kind, FusedGateUp):
        return torch.cat(pieces, dim=0)
    (piece,) = pieces
    return piece


def unfuse(spec: WeightSpec, local: torch.Tensor) -> list[torch.Tensor]:
    """The local production tensor -> its slice of each checkpoint tensor (inverse of fuse)."""
    kind = spec.sharding
    if isinstance(kind, FusedQKV):
        d, hidden = kind.head_dim, local.shape[-1]
        per_group = kind.heads // kind.groups * d
        grouped = local.reshape(-1, per_group + 2 * d, hidden)
        q, k, v = grouped.split([per_group, d, d], dim=1)
        return [t.reshape(-1, hidden) for t in (q, k, v)]
    if isinstance(kind, FusedGateUp):
        return list(local.chunk(2, dim=0))
    return [local]


def local_blocks(spec: WeightSpec, local: torch.Tensor, shapes: list[tuple[int, ...]], tp_rank: int,
                 tp: int) -> list[tuple[str, torch.Tensor, tuple[slice, ...]]]:
    """``local`` (TP rank ``tp_rank``'s production tensor, or a tensor of its shape) as
    contiguous VIEWS of it, each with its index in one checkpoint tensor: ``(name, view,
    index)``, grouped by checkpoint name in fusion order. Writing every checkpoint block
    into its view fills ``local`` in place (what an in-place distributed-checkpoint load
    does), padded vocabulary rows aside (no checkpoint block covers them). A rank's q (k, v)
    rows of several query groups are not contiguous in ``linear_qkv`` (groups interleave
    ``[q_g; k_g; v_g]``), so those come one query group at a time; ``cat`` of a name's views
    is ``unfuse``'s piece."""
    assert local.is_contiguous(), f"{spec.param}: a local tensor must be contiguous to be viewed in blocks"
    indices = local_slices(spec, shapes, tp_rank, tp)
    kind = spec.sharding
    if not isinstance(kind, FusedQKV):
        out = []
        for name, shape, piece, index in zip(spec.names, shapes, unfuse(spec, local), indices, strict=True):
            rows = len(range(*index[0].indices(shape[0])))
            if rows < piece.shape[0]:  # a padded vocabulary shard: its real rows lead
                piece = piece[:rows]
            out.append((name, piece, index))
        return out
    d, hidden = kind.head_dim, local.shape[-1]
    per_group = kind.heads // kind.groups * d
    grouped = local.view(-1, per_group + 2 * d, hidden)  # [local groups, q_g + k_g + v_g, hidden]
    first = indices[1][0].start // d  # this rank's first query group (k rows are d per group)
    out = []
    for name, rows, start in zip(spec.names, (per_group, d, d), (0, per_group, per_group + d), strict=True):
        for g in range(grouped.shape[0]):
            out.append((name, grouped[g, start:start + rows], (slice((first + g) * rows, (first + g + 1) * rows),)))
    return out


def concat_dim(spec: WeightSpec) -> int | None:
    """Dimension along which per-rank pieces concatenate back (None: replicated)."""
    if isinstance(spec.sharding, Replicated):
        return None
    if isinstance(spec.sharding, Split):
        return spec.sharding.dim
    return 0  # VocabSplit, FusedQKV, FusedGateUp


def unshard(spec: WeightSpec, locals_by_rank: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every TP rank's production tensor (rank order) -> the full checkpoint tensors."""
    dim = concat_dim(spec)
    if dim is None:
        return unfuse(spec, locals_by_rank[0])
    per_rank = [unfuse(spec, t) for t in locals_by_rank]
    full = [torch.cat([pieces[i] for pieces in per_rank], dim=dim) for i in range(len(spec.names))]
    if isinstance(spec.sharding, VocabSplit):
        assert full[0].shape[0] == spec.sharding.padded, f"{spec.param}: {tuple(full[0].shape)} vs {spec.sharding}"
        return [full[0][: spec.sharding.vocab]]
    return full


def tensor_parallel_attributes(spec: WeightSpec) -> tuple[bool, int, int]:
    """Megatron's marks of the parameter: (split over TP, partition dim, partition stride)."""
    sharding = spec.sharding
    if isinstance(sharding, Replicated):
        return False, 0, 1
    if isinstance(sharding, Split):
        return True, sharding.dim, 1
    if isinstance(sharding, FusedGateUp):
        return True, 0, 2
    return True, 0, 1  # VocabSplit, FusedQKV: whole rows per rank


def mark_tensor_parallel(model: torch.nn.Module, specs: list[WeightSpec]) -> None:
    """Set megatron's ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``
    on every parameter from its declaration. Megatron's layers set them only when they
    initialise their weights (``perform_initialization``), and its gradient norm (for
    clipping), distributed optimizer and checkpointing read them: an unmarked split weight
    counts as a replica and only TP rank 0's shard enters the norm."""
    for spec in specs:
        param = model.get_parameter(spec.param)
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = tensor_parallel_attributes(spec)

