"""Megatron distributed checkpoints (``splitllama.dist_checkpoint``): saved at one layout,
loaded at another, the weights are bit for bit the split checkpoint's; the declaration
covers every checkpoint tensor exactly once whatever the layout.

Each layout of a world size saves with that world's processes; the loads run at layouts
of fewer model-parallel ranks too (the rest of the world is data parallel), as a trainer
resuming at another layout would.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

from splitllama import dist_checkpoint
from splitllama import weight_names as wn
from splitllama.checkpoints import gather_full_state, load_checkpoint
from splitllama.config import CustomSplitLlamaConfig
from splitllama.distributed import setup_parallel
from splitllama.verify.runner import build_production
from tests.integration.conftest import DEVICE, DTYPE, world_size
from tests.integration.layouts import LAYOUTS, layout_name, layouts
from tests.integration.test_checkpoints import read_all

# save layout -> the layouts each load runs at, per world size. At world 4 the save is
# TP=2 x PP=2 (a stage boundary inside the lower stack) and TP=2 x PP=2 x VPP=2 (a boundary
# at every cut); the loads at TP=1 and TP=2 + SP put every layer at another stage.
RESHARD = {
    "tp1": ("tp1",),
    "tp2": ("tp2_sp", "tp1", "pp2_vpp2"),
    "pp2_vpp2": ("tp2_sp", "tp1"),
    "tp2_sp_pp2": ("tp1", "tp2_sp"),
    "tp2_pp2_vpp2": ("tp1", "tp2_sp"),
}


def build(ckpt: str, layout, head: str):
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    setup_parallel(layout, DEVICE)
    return build_production(config, layout, head, DTYPE, DEVICE)


def dist_round_trip_mismatches(source: str, save_layout, load_layouts, head: str, directory: str) -> list[str]:
    """Load the split checkpoint ``source`` at ``save_layout``, save a distributed
    checkpoint, load it at each of ``load_layouts`` into a model whose weights are NaN;
    the names of tensors that did not come back bit for bit (the first failing load's,
    with its layout). Every rank returns the same list (the full state is gathered)."""
    chunks = build(source, save_layout, head)
    load_checkpoint(chunks, source, progress=False)
    dist_checkpoint.save(chunks, directory)
    expected = read_all(source)
    for layout in load_layouts:
        chunks = build(source, layout, head)
        with torch.no_grad():
            for chunk in chunks:
                for param in chunk.parameters():
                    param.fill_(float("nan"))
        dist_checkpoint.load(chunks, directory)
        got = gather_full_state(chunks)
        bad = sorted(set(expected) ^ set(got)) + [
            name for name, tensor in expected.items()
            if name in got and not (got[name].dtype == tensor.dtype and torch.equal(got[name], tensor))
        ]
        if bad:
            return [f"{layout}: {name}" for name in bad]
    return []


def declaration_problems(ckpt: str, layout, head: str) -> list[str]:
    """What is wrong with the model's sharded state dict at ``layout``, over all ranks:
    every split-checkpoint tensor must be declared with its global shape and tiled by the
    main replicas' blocks exactly once, and nothing else declared. Every rank returns the
    same list."""
    chunks = build(ckpt, layout, head)
    blocks = []
    for chunk in chunks:
        state = chunk.sharded_state_dict()
        apply_factories(state)
        for value in state.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, ShardedTensor) and not any(item.replica_id):
                    blocks.append((item.key, item.global_shape, item.global_offset, item.local_shape))
                elif not isinstance(item, (ShardedTensor, ShardedObject)):
                    blocks.append((f"not sharded: {type(item).__name__}", (), (), ()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, blocks)
    shapes = wn.split_checkpoint_shapes(CustomSplitLlamaConfig.from_pretrained(ckpt), head)
    cover = {name: torch.zeros(shape, dtype=torch.int32) for name, shape in shapes.items()}
    problems = []
    for key, global_shape, offset, local_shape in dict.fromkeys(b for part in gathered for b in part):
        if key not in shapes or tuple(global_shape) != shapes[key]:
            problems.append(f"{key} declared with global shape {global_shape}, expected {shapes.get(key)}")
            continue
        cover[key][tuple(slice(o, o + n) for o, n in zip(offset, local_shape))] += 1
    problems += [f"{name} covered {int(c.min())}..{int(c.max())} times" for name, c in cover.items()
                 if not bool((c == 1).all())]
    return problems


@pytest.mark.parametrize("head,mlp", [("lm", False), ("value", True)], ids=["lm-linear", "value-mlp"])
@pytest.mark.parametrize("layout", layouts(*RESHARD))
def test_dist_checkpoint_reshards_bitwise(layout, head, mlp, checkpoint_factory, scratch_dir):
    source = checkpoint_factory(head, mlp, name=f"round-trip-{DTYPE}", dtype=DTYPE)
    loads = [LAYOUTS[n] for n in RESHARD[layout_name(layout)]]
    assert dist_round_trip_mismatches(source, layout, loads, head, scratch_dir) == []
    assert os.path.exists(os.path.join(scratch_dir, "metadata.json"))


@pytest.mark.parametrize("layout", layouts("tp1", "tp2"))
def test_dist_checkpoint_of_a_padded_vocabulary(layout, checkpoint_factory, scratch_dir):
    """Vocabulary 301, padded to 302 at TP=2: the checkpoint holds the 301 real rows
    (an irregular grid over TP ranks), and loads at TP=1 (no padding) and back at TP=2."""
    from tests.integration.test_parity import odd_vocab_config

    source = checkpoint_factory("lm", False, config=odd_vocab_config(), name=f"odd_vocab-{DTYPE}", dtype=DTYPE)
    loads = [LAYOUTS["tp1"]] + ([LAYOUTS["tp2_sp"]] if world_size() == 2 else [])
    assert dist_round_trip_mismatches(source, layout, loads, "lm", scratch_dir) == []


@pytest.mark.parametrize("head", ["lm", "value"])
@pytest.mark.parametrize("layout", layouts("tp2", "pp2_vpp2", "tp2_sp_pp2", "tp2_pp2_vpp2"))
def test_declaration_tiles_every_checkpoint_tensor_once(layout, head, checkpoint_factory):
    assert declaration_problems(checkpoint_factory(head, head == "value"), layout, head) == []
