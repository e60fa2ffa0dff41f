"""Megatron distributed checkpoints (``megatron.core.dist_checkpointing``) of the production
model: save at one TP x PP x VPP layout, load at another.

``sharded_state_dict(chunk)`` describes every parameter of one model chunk as megatron's
``ShardedTensor``s of the SPLIT CHECKPOINT's tensors: keys are checkpoint names
(``model.layers_first.{i}.self_attn.q_proj.weight``, ...), so every layer carries its global
index in its stack whatever pipeline stage or virtual chunk holds it, and each tensor is
declared with its global shape and this rank's offset in it, read from ``sharding``'s
one declaration of every weight:

* ``Replicated``: the whole tensor, a main replica on TP rank 0 only;
* ``Split(dim)``: this rank's 1/tp block along ``dim``;
* ``FusedQKV`` / ``FusedGateUp``: a ``ShardedTensorFactory`` whose blocks are views of
  the local ``linear_qkv`` (rows interleaved per query group: one block of q, k and v per
  query group) or ``linear_fc1`` (``[gate_r; up_r]``, stride 2), and whose merge fuses the
  loaded blocks back into the state dict ``dist_checkpointing.load`` returns;
* ``VocabSplit``: the real vocabulary rows only (global shape ``[vocab, h]``), so a
  checkpoint does not depend on the TP size's vocabulary padding; a rank's real rows may
  be fewer than its padded shard (an irregular grid). The returned state dict zero-fills
  the padding; an in-place load leaves the padded rows as built (masked out of every
  output and gradient).

Every block is a view of the parameter, so ``dist_checkpointing.load`` fills each parameter
in place, whether or not the caller loads the returned state dict.

Megatron modules' own ``sharded_state_dict`` is not used: the model classes are plain
``torch.nn.Module`` trees whose default declares TP-sharded weights replicated, and whose
layer keys restart at 0 on every stage. The ``_extra_state`` entries of megatron's linear
layers (``None`` for these non-Transformer-Engine layers) are ``ShardedObject``s keyed
after the weight's checkpoint name, so ``load_state_dict(strict=True)`` finds them.

``save`` and ``load`` run ``dist_checkpointing`` on a model (or its list of VPP chunks)
with the state dict laid out as verl's ``MegatronCheckpointManager`` lays it out
(``model``, or ``model0``, ``model1``, ... for VPP chunks).
"""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from splitllama import weight_names as wn
from splitllama.cpu_support import cuda_means_cpu
from splitllama.checkpoint import model_chunks
from splitllama.checkpoint.sharding import (
    Replicated,
    Split,
    VocabSplit,
    WeightSpec,
    fuse,
    local_blocks,
    weight_specs,
)

EXTRA_STATE = "_extra_state"


def _global_offset(index: tuple[slice, ...], ndim: int) -> tuple[int, ...]:
    starts = [0] * ndim
    for dim, part in enumerate(index):
        starts[dim] = part.start or 0
    return tuple(starts)


def _regular(spec: WeightSpec) -> bool:
    """Whether every TP rank holds an equal block of each checkpoint tensor: all layouts but
    a padded vocabulary, whose last rank holds fewer real rows."""
    return not (isinstance(spec.sharding, VocabSplit) and spec.sharding.padded != spec.sharding.vocab)


def _blocks(spec: WeightSpec, local: torch.Tensor, shapes: list[tuple[int, ...]], tp_rank: int, tp: int,
            replica_id: tuple[int, int, int], key_prefix: str = "") -> list[ShardedTensor]:
    """``local`` (the rank's production tensor, or an optimizer state of its shape) as this
    rank's blocks of each checkpoint tensor of ``spec``, keyed ``key_prefix + name``. Each
    block's data is a view of ``local`` (``sharding.local_blocks``): megatron's load copies
    the checkpoint into the blocks' tensors, so it fills ``local`` itself, for callers that
    ignore the state dict ``dist_checkpointing.load`` returns (verl's initial
    ``load_mcore_dist_weights``) as for those that load it."""
    shape_of = dict(zip(spec.names, shapes, strict=True))
    out = []
    for name, piece, index in local_blocks(spec, local, shapes, tp_rank, tp):
        shape = shape_of[name]
        index = index + (slice(None),) * (len(shape) - len(index))
        local_shape = tuple(len(range(*part.indices(size))) for part, size in zip(index, shape))
        assert tuple(piece.shape) == local_shape, f"{name}: block {tuple(piece.shape)} vs index {local_shape}"
        fragments = tuple(size // n for size, n in zip(shape, local_shape)) if _regular(spec) else None
        out.append(ShardedTensor(key_prefix + name, piece, piece.dtype, local_shape, tuple(shape),
                                 _global_offset(index, len(shape)), fragments, replica_id))
    return out


def _sharded_weight(spec: WeightSpec, param: torch.Tensor, shapes: list[tuple[int, ...]],
                    tp_rank: int, tp: int, dp_rank: int):
    replicated = isinstance(spec.sharding, Replicated)
    # one main replica of each block: TP rank 0 for replicated weights, DP rank 0 always
    replica_id = (0, tp_rank if replicated else 0, dp_rank)
    if isinstance(spec.sharding, (Replicated, Split)):
        # the parameter itself (optimizers map their states to it by identity)
        (block,) = _blocks(spec, param, shapes, tp_rank, tp, replica_id)
        assert block.data is param, f"{spec.param}: a replicated or split block is the parameter itself"
        return block

    def build(key, tensor, replica, flattened_range):
        if flattened_range is not None:
            raise ValueError(f"{spec.param}: flattened (distributed-optimizer) ranges are not supported")
        # an optimizer's copy of the factory carries its state's prefix in the key
        # ("optimizer.state.exp_avg." + the first name), and each of its blocks too
        return _blocks(spec, tensor, shapes, tp_rank, tp, replica, key.removesuffix(spec.names[0]))

    def merge(loaded: list[torch.Tensor]) -> torch.Tensor:
        # the loaded blocks in build's order: grouped by checkpoint name, in fusion order
        names = [name for name, _, _ in local_blocks(spec, param, shapes, tp_rank, tp)]
        pieces = [torch.cat([t for n, t in zip(names, loaded, strict=True) if n == name]) for name in spec.names]
        return fuse(spec, pieces, tp)

    return ShardedTensorFactory(spec.names[0], param, build, merge, replica_id)


def sharded_state_dict(chunk: torch.nn.Module, prefix: str = "", sharded_offsets: tuple = (),
                       metadata: dict | None = None) -> dict:
    """Megatron's sharded state dict of one production model chunk: its ``state_dict``
    keys (under ``prefix``) -> ``ShardedTensor`` / ``ShardedTensorFactory`` /
    ``ShardedObject`` of the split checkpoint's tensors, named for the chunk's ``head_kind``.
    ``metadata``: megatron's ``dp_cp_group`` (default: its data-parallel group with context
    parallelism)."""
    if sharded_offsets:
        raise ValueError(
            f"sharded_offsets must be empty, got {sharded_offsets!r}: this model's checkpoint keys "
            "carry every layer's global index (no offset is prepended by a parent module)"
        )
    group = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_rank = torch.distributed.get_rank(group)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    head = chunk.head_kind
    shapes = wn.split_checkpoint_shapes(chunk.hf_config, head)
    out: dict = {}
    weight_key: dict[str, str] = {}
    for spec in weight_specs(chunk.hf_config, chunk.stage, head, chunk.padded_vocab_size):
        out[prefix + spec.param] = _sharded_weight(spec, chunk.get_parameter(spec.param),
                                                   [shapes[n] for n in spec.names], tp_rank, tp, dp_rank)
        weight_key[spec.param.removesuffix(".weight")] = spec.names[0]
    state = chunk.state_dict(keep_vars=True)
    for name, value in state.items():
        if name.endswith(EXTRA_STATE):
            module = name.removesuffix("." + EXTRA_STATE)
            assert module in weight_key, f"{name}: extra state of a module without a declared weight"
            out[prefix + name] = ShardedObject(f"{weight_key[module]}.{EXTRA_STATE}", value, (1,), (0,),
                                               replica_id=(0, tp_rank, dp_rank))
    declared = {k.removeprefix(prefix) for k in out}
    assert declared == set(state), f"sharded state dict and model state dict differ: {sorted(declared ^ set(state))}"
    return out


def _keyed_chunks(model_or_chunks) -> dict[str, torch.nn.Module]:
    """The chunks keyed as verl's checkpoint manager keys them: ``model`` for one chunk,
    ``model0``, ``model1``, ... for VPP chunks."""
    chunks = model_chunks(model_or_chunks)
    if len(chunks) == 1:
        return {"model": chunks[0]}
    return {f"model{i}": chunk for i, chunk in enumerate(chunks)}


def model_sharded_state_dict(model_or_chunks, metadata: dict | None = None) -> dict:
    """Every chunk's sharded state dict, under ``_keyed_chunks``'s keys."""
    return {key: chunk.sharded_state_dict(metadata=metadata) for key, chunk in _keyed_chunks(model_or_chunks).items()}


def save(model_or_chunks, checkpoint_dir: str | os.PathLike) -> None:
    """Write a distributed checkpoint of the model's weights. Collective: every rank."""
    directory = str(checkpoint_dir)
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    with cuda_means_cpu():
        dist_checkpointing.save(model_sharded_state_dict(model_or_chunks), directory)


def load(model_or_chunks, checkpoint_dir: str | os.PathLike) -> None:
    """Load a distributed checkpoint saved at any layout into the model (strict: every
    tensor of the model must be in it). Collective: every rank."""
    keyed = _keyed_chunks(model_or_chunks)
    with cuda_means_cpu():
        loaded = dist_checkpointing.load(model_sharded_state_dict(list(keyed.values())), str(checkpoint_dir))
    for key, chunk in keyed.items():
        chunk.load_state_dict(loaded[key], strict=True)
