"""The stage layout function and the TP requirements: placement and clear errors."""

from __future__ import annotations

import pytest

from splitllama.verify.tiny import tiny_split_config
from splitllama.layout import ParallelLayout, stage_layout, stage_layouts, validate_tensor_parallel


def describe(stage):
    return (list(stage.lower_layers), stage.has_adapter, list(stage.upper_layers),
            stage.has_embedding, stage.has_head)


def test_whole_model_on_one_stage():
    config = tiny_split_config()
    (stage,) = stage_layouts(config)
    assert describe(stage) == ([0, 1], True, [0, 1], True, True)


@pytest.mark.parametrize("split,expected", [
    # boundary inside the lower stack: stage 1 receives h_lo and holds the adapter
    ((1, 3), [([0], False, [], True, False), ([1], True, [0, 1], False, True)]),
    # boundary at the adapter: stage 1 starts with it (and receives h_lo)
    ((2, 2), [([0, 1], False, [], True, False), ([], True, [0, 1], False, True)]),
    # boundary inside the upper stack: stage 1 receives h_hi
    ((3, 1), [([0, 1], True, [0], True, False), ([], False, [1], False, True)]),
])
def test_pipeline_boundaries(split, expected):
    stages = stage_layouts(tiny_split_config(), pp=2, layers_per_stage=list(split))
    assert [describe(s) for s in stages] == expected


def test_interleaved_chunks_follow_megatron_order():
    config = tiny_split_config()
    stages = stage_layouts(config, pp=2, vpp=2)
    assert [(s.pp_rank, s.chunk) for s in stages] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert stage_layout(config, 2, 2, pp_rank=0, chunk=1) == stages[2]
    assert stages[2].has_adapter and list(stages[2].upper_layers) == [0]


def test_parallel_layout_sets_the_split():
    layout = ParallelLayout(pp=2, layers_per_stage=[3, 1])
    assert layout.layers_per_stage == (3, 1)  # normalised: the layout is frozen and hashable
    stages = layout.validate(tiny_split_config())
    assert [len(s.upper_layers) for s in stages] == [1, 1]


@pytest.mark.parametrize("kwargs,message", [
    (dict(tp=0), "tp must be a positive int"),
    (dict(sp=True), "sp needs tp > 1"),
    (dict(vpp=2), "vpp 2 needs pp > 1"),
    (dict(pp=2, vpp=0), "vpp must be None or a positive int"),
    (dict(pp=2, layers_per_stage=3), "layers_per_stage must be None or a sequence"),
    (dict(pp=2, layers_per_stage="2,2"), "layers_per_stage must be None or a sequence"),
])
def test_parallel_layout_refuses_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(pp=3), "do not split evenly over 3 pipeline stages"),
    (dict(pp=2, vpp=4), "cannot fill 8 pipeline stages"),
    (dict(pp=2, layers_per_stage=[4, 0]), "positive counts summing to 4"),
    (dict(pp=2, layers_per_stage=[1, 1]), "summing to 4"),
    (dict(pp=2, layers_per_stage=[1, 1, 2]), "must hold 2"),
    (dict(pp=1, vpp=2), "needs pipeline_model_parallel_size > 1"),
    (dict(pp=0), "pipeline_model_parallel_size must be a positive int"),
])
def test_layout_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stage_layouts(tiny_split_config(), **kwargs)


@pytest.mark.parametrize("tp,field", [
    (3, "lower_config.num_attention_heads=8"),
    (4, "lower_config.num_key_value_heads=2"),
])
def test_tensor_parallel_errors_name_the_field(tp, field):
    with pytest.raises(ValueError, match=field):
        validate_tensor_parallel(tiny_split_config(), tp)


def test_tensor_parallel_sizes_that_divide():
    validate_tensor_parallel(tiny_split_config(), 1)
    validate_tensor_parallel(tiny_split_config(), 2)
