"""The sharding declaration: layouts of fused tensors, and shard/unshard as inverses."""

from __future__ import annotations

import pytest
import torch

from splitllama import weight_names as wn
from splitllama.verify.tiny import tiny_split_config
from splitllama.layout import padded_vocab_size, stage_layouts
from splitllama.checkpoint.sharding import FusedQKV, Split, VocabSplit, WeightSpec, fuse, local_slices, unshard, weight_specs


def shard(spec: WeightSpec, full: list[torch.Tensor], tp_rank: int, tp: int) -> torch.Tensor:
    """Full checkpoint tensors -> TP rank ``tp_rank``'s production tensor, as the loader
    makes it (``local_slices`` then ``fuse``) from tensors in memory."""
    slices = local_slices(spec, [tuple(t.shape) for t in full], tp_rank, tp)
    return fuse(spec, [t[s] for t, s in zip(full, slices, strict=True)], tp)


def full_tensors(config, head):
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in wn.split_checkpoint_shapes(config, head).items()}


@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("head", ["lm", "value"])
@pytest.mark.parametrize("tp", [1, 2])
def test_shard_then_unshard_is_identity(tp, head, mlp):
    config = tiny_split_config(mlp=mlp)
    tensors = full_tensors(config, head)
    (stage,) = stage_layouts(config)
    specs = weight_specs(config, stage, head)
    assert sorted(n for s in specs for n in s.names) == sorted(tensors)
    for spec in specs:
        full = [tensors[n] for n in spec.names]
        locals_ = [shard(spec, full, rank, tp) for rank in range(tp)]
        for got, want in zip(unshard(spec, locals_), full, strict=True):
            assert torch.equal(got, want), spec.param


def test_qkv_is_interleaved_per_query_group():
    """Megatron's linear_qkv rows: for each group g, its q heads, then k_g, then v_g."""
    heads, groups, d, hidden = 4, 2, 1, 3
    spec = WeightSpec("qkv", ("q", "k", "v"), FusedQKV(heads, groups, d))
    q = torch.arange(heads * d)[:, None].float().expand(-1, hidden) + 100
    k = torch.arange(groups * d)[:, None].float().expand(-1, hidden) + 200
    v = torch.arange(groups * d)[:, None].float().expand(-1, hidden) + 300
    fused = shard(spec, [q, k, v], 0, 1)[:, 0].tolist()
    assert fused == [100, 101, 200, 300, 102, 103, 201, 301]
    # TP=2: each rank keeps whole query groups
    assert shard(spec, [q, k, v], 1, 2)[:, 0].tolist() == [102, 103, 201, 301]


def test_gate_up_is_split_with_stride_two():
    spec = next(s for s in weight_specs(tiny_split_config(), stage_layouts(tiny_split_config())[0], "lm")
                if s.param.endswith("linear_fc1.weight"))
    gate = torch.arange(8)[:, None].float()
    up = torch.arange(8)[:, None].float() + 100
    assert shard(spec, [gate, up], 1, 2)[:, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]


def test_split_refuses_an_indivisible_size():
    spec = WeightSpec("w", ("w",), Split(0))
    with pytest.raises(ValueError, match="cannot be split over tensor_model_parallel_size=2"):
        shard(spec, [torch.zeros(3, 2)], 0, 2)


@pytest.mark.parametrize("vocab,tp,multiple", [(301, 2, 1), (301, 2, 128), (257, 4, 1), (256, 2, 1), (10, 3, 2)])
def test_vocab_split_pads_and_drops_the_padding(vocab, tp, multiple):
    """Rank r holds padded rows [r Vp/tp, (r+1) Vp/tp): the real ones among them from the
    checkpoint, zeros after; unshard gives back exactly the real rows."""
    padded = padded_vocab_size(vocab, tp, multiple)
    assert padded % (tp * multiple) == 0 and padded - vocab < tp * multiple
    spec = WeightSpec("lm_head.weight", (wn.LM_HEAD,), VocabSplit(vocab, padded))
    full = torch.randn(vocab, 3)
    locals_ = [shard(spec, [full], rank, tp) for rank in range(tp)]
    assert all(t.shape == (padded // tp, 3) for t in locals_)
    assert torch.equal(torch.cat(locals_)[:vocab], full) and not torch.cat(locals_)[vocab:].any()
    (back,) = unshard(spec, locals_)
    assert torch.equal(back, full)


def test_vocab_padding_that_leaves_a_rank_no_real_row_is_refused():
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by=128 .* no real vocabulary row"):
        padded_vocab_size(100, 2, 128)
