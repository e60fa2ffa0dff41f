"""Validation paths of the public API without a test elsewhere: each feeds the bad value
and expects the ValueError that names it. (The rest: test_config.py, test_layout.py,
tests/integration/test_checkpoints.py, tests/integration/test_input_validation.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MistralConfig

from splitllama.checkpoint.directory import read_split_config
from splitllama.checkpoint.split import iter_stage_tensors, load_checkpoint
from splitllama.config import CustomSplitLlamaConfig, llama_preset
from splitllama.verify.tiny import tiny_split_config
from splitllama.layout import ParallelLayout, stage_layout, stage_layouts, validate_tensor_parallel


# ---- CustomSplitLlamaConfig --------------------------------------------------------------------
def test_sub_config_object_of_another_model_type_refused():
    with pytest.raises(ValueError, match="upper_config must be a Llama config, got model_type='mistral'"):
        CustomSplitLlamaConfig(num_layers_8=1, num_layers_70=1, lower_config=llama_preset("tiny-llama3.1-8b"),
                               upper_config=MistralConfig())


def test_sub_config_of_another_type_refused():
    with pytest.raises(ValueError, match="lower_config must be a dict or LlamaConfig, got str"):
        CustomSplitLlamaConfig(num_layers_8=1, num_layers_70=1, lower_config="llama3.1-8b")


def test_derived_field_without_sub_configs_refused():
    with pytest.raises(ValueError, match="hidden_size is given but lower_config/upper_config are missing"):
        CustomSplitLlamaConfig.from_dict({"num_layers_8": 1, "num_layers_70": 1, "hidden_size": 64})


def test_heads_not_a_multiple_of_kv_heads_refused():
    lower = llama_preset("tiny-llama3.1-8b", num_attention_heads=6, num_key_value_heads=4, head_dim=8, hidden_size=48)
    with pytest.raises(ValueError, match="lower_config.num_attention_heads=6 is not a multiple of "
                                         "lower_config.num_key_value_heads=4"):
        CustomSplitLlamaConfig.from_llama_configs(lower, llama_preset("tiny-llama3.1-70b"), 1, 1)


# ---- ParallelLayout, validate_tensor_parallel, stage_layouts --------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(pp=0), "pp must be a positive int, got 0"),
    (dict(tp=True), "tp must be a positive int, got True"),
    (dict(tp=2.0), "tp must be a positive int, got 2.0"),
    (dict(pp=2, vpp="2"), "vpp must be None or a positive int, got '2'"),
])
def test_parallel_layout_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**kwargs)


@pytest.mark.parametrize("tp", [0, -2, "2"])
def test_validate_tensor_parallel_refuses_a_non_positive_size(tp):
    with pytest.raises(ValueError, match="tensor_model_parallel_size must be a positive int"):
        validate_tensor_parallel(tiny_split_config(), tp)


def test_tensor_parallel_error_names_a_field_of_the_upper_stack():
    config = tiny_split_config(upper=dict(num_key_value_heads=3, num_attention_heads=24, hidden_size=192))
    with pytest.raises(ValueError, match="upper_config.num_key_value_heads=3 is not divisible by "
                                         "tensor_model_parallel_size=2"):
        validate_tensor_parallel(config, 2)


def test_parallel_layout_validate_refuses_what_the_config_cannot_take():
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by tensor_model_parallel_size=3"):
        ParallelLayout(tp=3).validate(tiny_split_config())
    with pytest.raises(ValueError, match="do not split evenly over 3 pipeline stages"):
        ParallelLayout(pp=3).validate(tiny_split_config())


def test_stage_layouts_refuses_a_bad_virtual_size():
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size must be None or a positive int, got -1"):
        stage_layouts(tiny_split_config(), pp=2, vpp=-1)


@pytest.mark.parametrize("pp_rank,chunk", [(2, 0), (-1, 0), (0, 2)])
def test_stage_layout_refuses_a_rank_or_chunk_outside_the_layout(pp_rank, chunk):
    with pytest.raises(ValueError, match=f"pp_rank={pp_rank}, chunk={chunk} outside pp=2, vpp=2"):
        stage_layout(tiny_split_config(), 2, 2, pp_rank, chunk)


# ---- checkpoints --------------------------------------------------------------------------------
def _config_dir(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    return tmp_path


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "nowhere", "is not a directory"),
    (lambda p: p, "has no config.json"),
    (lambda p: _config_dir(p, "{not json"), "config.json is not valid JSON"),
    (lambda p: _config_dir(p, "[1, 2]"), "config.json must hold a JSON object, got list"),
    (lambda p: _config_dir(p, json.dumps({"model_type": "llama"})),
     "has model_type='llama', expected 'custom_split_llama': make a split checkpoint with `splitllama assemble`"),
    (lambda p: _config_dir(p, json.dumps({"model_type": "gpt2"})), "has model_type='gpt2', expected"),
])
def test_read_split_config_says_what_is_wrong(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        read_split_config(make(tmp_path))


def test_load_checkpoint_refuses_a_model_that_is_not_a_production_model(tmp_path):
    with pytest.raises(ValueError, match="expected a splitllama production model or list of chunks, got Linear"):
        load_checkpoint(torch.nn.Linear(2, 2), tmp_path)


def test_iter_stage_tensors_refuses_an_unknown_source():
    with pytest.raises(ValueError, match="source must be 'param', 'grad' or 'main_grad', got 'weights'"):
        next(iter_stage_tensors([], "weights"))
