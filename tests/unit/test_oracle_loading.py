"""The oracle as a Hugging Face model: exact split checkpoint names, Auto classes, weight
init per sub-config, and strict loading (missing / unexpected / mis-shaped tensors are
errors naming the tensor, never random weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from oracle import CustomSplitLLamaForCausalLM, CustomSplitLLamaModel
from splitllama import weight_names
from splitllama.verify.tiny import tiny_split_config
from tests.cases import EDGE_MASKS, random_input_ids
from tests.unit.hf_llama import random_oracle


@pytest.mark.parametrize("mlp", [False, True])
def test_module_tree_is_the_split_checkpoint(mlp):
    config = tiny_split_config(mlp=mlp)
    shapes = {name: tuple(p.shape) for name, p in CustomSplitLLamaForCausalLM(config).state_dict().items()}
    assert shapes == weight_names.split_checkpoint_shapes(config, "lm")
    trunk = {name: tuple(p.shape) for name, p in CustomSplitLLamaModel(config).state_dict().items()}
    expected = {name.removeprefix("model."): shape
                for name, shape in weight_names.split_checkpoint_shapes(config, "lm").items()
                if name != weight_names.LM_HEAD}
    assert trunk == expected


def test_init_std_follows_the_sub_configs():
    config = tiny_split_config()
    config.lower.initializer_range, config.upper.initializer_range = 0.05, 0.2
    model = CustomSplitLLamaForCausalLM(config)
    params = dict(model.named_parameters())
    # Thousands of draws each: the sample std is within 10% of the target.
    for name in ("model.embed_tokens.weight", "model.layers_first.0.mlp.up_proj.weight"):
        assert abs(params[name].std().item() / 0.05 - 1) < 0.1, name
    for name in ("model.adapter.weight", "model.layers_last.1.self_attn.q_proj.weight", "lm_head.weight"):
        assert abs(params[name].std().item() / 0.2 - 1) < 0.1, name
    for name in ("model.layers_first.0.input_layernorm.weight", "model.norm.weight"):
        assert torch.equal(params[name], torch.ones_like(params[name])), name


def test_norm_eps_per_stack():
    config = tiny_split_config(rms_norm_eps=1e-3)
    config.lower.rms_norm_eps, config.upper.rms_norm_eps = 1e-4, 1e-6
    model = CustomSplitLLamaForCausalLM(config)
    assert model.model.layers_first[0].input_layernorm.eps == 1e-4
    assert model.model.layers_last[0].post_attention_layernorm.eps == 1e-6
    assert model.model.norm.eps == 1e-3


@pytest.fixture()
def saved(tmp_path):
    model = random_oracle(tiny_split_config(), seed=31)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_save_writes_exactly_the_split_names_and_auto_loads(saved):
    path, model = saved
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    assert shapes == weight_names.split_checkpoint_shapes(model.config, "lm")
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")  # the saved model's
    assert type(loaded) is CustomSplitLLamaForCausalLM and loaded.dtype == torch.float64
    mask = EDGE_MASKS["left_right_inside"]
    ids = random_input_ids(mask, 256, 32)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    trunk = AutoModel.from_pretrained(path)  # the trunk drops the head of a full checkpoint
    assert type(trunk) is CustomSplitLLamaModel


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_an_error(saved):
    path, _ = saved
    name = "model.layers_last.1.mlp.down_proj.weight"
    _rewrite(path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensors \['{name}'\]"):
        CustomSplitLLamaForCausalLM.from_pretrained(path)


def test_unexpected_tensor_is_an_error(saved):
    path, _ = saved
    name = "model.layers_first.7.mlp.up_proj.weight"
    _rewrite(path, lambda t: t.update({name: torch.zeros(3)}))
    with pytest.raises(ValueError, match=rf"unexpected tensors \['{name}'\]"):
        CustomSplitLLamaForCausalLM.from_pretrained(path)


def test_mis_shaped_tensor_is_an_error(saved):
    path, _ = saved
    name = "model.adapter.weight"
    _rewrite(path, lambda t: t.update({name: torch.zeros(128, 32, dtype=torch.float64)}))
    with pytest.raises(ValueError, match=rf"mis-shaped tensors \['{name} \(checkpoint \(128, 32\), model \(128, 64\)\)'\]"):
        CustomSplitLLamaForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match=name):  # asking to ignore it changes nothing
        CustomSplitLLamaForCausalLM.from_pretrained(path, ignore_mismatched_sizes=True)


def test_loading_info_still_available(saved):
    path, _ = saved
    model, info = CustomSplitLLamaForCausalLM.from_pretrained(path, output_loading_info=True)
    assert isinstance(model, CustomSplitLLamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_forward_argument_errors(saved):
    _, model = saved
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\); expected \(2, 4\)"):
        model(ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"unsupported arguments \['cu_seq_lens_q'\]"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 4]))


def test_inputs_embeds_equal_input_ids(saved):
    _, model = saved
    mask = EDGE_MASKS["odd_token_count"]
    ids = random_input_ids(mask, 256, 33)
    with torch.no_grad():
        by_ids = model(ids, attention_mask=mask).logits
        by_embeds = model(inputs_embeds=model.model.embed_tokens(ids), attention_mask=mask).logits
    assert torch.equal(by_ids, by_embeds)
