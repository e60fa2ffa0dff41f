"""The value (critic) model shares the CausalLM trunk; its head starts fresh only on request."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForTokenClassification

from oracle import CustomSplitLLamaForCausalLM, CustomSplitLLamaForTokenClassification
from splitllama import weight_names
from splitllama.verify.tiny import tiny_split_config
from tests.cases import EDGE_MASKS, random_input_ids
from tests.unit.hf_llama import random_oracle

VOCAB = 256


@pytest.fixture(scope="module", params=["linear", "mlp"])
def causal_dir(request, tmp_path_factory):
    """A saved random CausalLM (float64)."""
    path = tmp_path_factory.mktemp(f"causal_{request.param}")
    random_oracle(tiny_split_config(mlp=request.param == "mlp"), seed=21).save_pretrained(path)
    return path


def _inputs(name="left_right_inside"):
    mask = EDGE_MASKS[name]
    return random_input_ids(mask, VOCAB, 22), mask


def test_value_trunk_equals_causal_trunk(causal_dir):
    causal = CustomSplitLLamaForCausalLM.from_pretrained(causal_dir)
    value = CustomSplitLLamaForTokenClassification.from_pretrained(
        causal_dir, num_labels=1, fresh_value_head=True
    )
    ids, mask = _inputs()
    with torch.no_grad():
        lm = causal(ids, attention_mask=mask, output_hidden_states=True)
        critic = value(ids, attention_mask=mask, output_hidden_states=True)
    # Same weights, same code: the final hidden states are bitwise equal.
    assert torch.equal(critic.hidden_states[-1], lm.hidden_states[-1])
    assert len(critic.hidden_states) == len(lm.hidden_states)
    assert critic.logits.shape == (*mask.shape, 1)
    assert critic.logits.dtype == torch.float64
    expected = lm.hidden_states[-1] @ value.score.weight.T
    torch.testing.assert_close(critic.logits, expected, rtol=1e-12, atol=1e-12)


def test_fresh_value_head_is_initialised_with_the_upper_std(causal_dir):
    value = CustomSplitLLamaForTokenClassification.from_pretrained(
        causal_dir, num_labels=1, fresh_value_head=True
    )
    std = value.config.upper.initializer_range
    head = value.score.weight
    assert head.shape == (1, value.config.h_hi)
    # 128 normal draws: their std lies within 30% of the target with overwhelming odds.
    assert 0.7 * std < head.std().item() < 1.3 * std


def test_value_head_from_causal_checkpoint_needs_explicit_request(causal_dir):
    with pytest.raises(ValueError, match=r"missing tensors \['score.weight'\].*fresh_value_head=True") as err:
        CustomSplitLLamaForTokenClassification.from_pretrained(causal_dir, num_labels=1)
    assert "lm_head.weight" in str(err.value)


def test_fresh_value_head_only_for_the_value_model(causal_dir):
    with pytest.raises(ValueError, match="fresh_value_head=True is only for CustomSplitLLamaForTokenClassification"):
        CustomSplitLLamaForCausalLM.from_pretrained(causal_dir, fresh_value_head=True)


def test_value_model_needs_one_label():
    with pytest.raises(ValueError, match=r"num_labels=2.*allowed: num_labels=1"):
        CustomSplitLLamaForTokenClassification(tiny_split_config())


def test_value_checkpoint_round_trip(causal_dir, tmp_path):
    value = CustomSplitLLamaForTokenClassification.from_pretrained(
        causal_dir, num_labels=1, fresh_value_head=True
    )
    value.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    assert shapes == weight_names.split_checkpoint_shapes(value.config, "value")

    again = AutoModelForTokenClassification.from_pretrained(tmp_path)
    assert type(again) is CustomSplitLLamaForTokenClassification
    ids, mask = _inputs("odd_token_count")
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, value(ids, attention_mask=mask).logits)
    # A value checkpoint already has its head: asking for a fresh one is a mistake.
    with pytest.raises(ValueError, match="already holds score.weight"):
        CustomSplitLLamaForTokenClassification.from_pretrained(tmp_path, fresh_value_head=True)
    # ... and a CausalLM cannot be loaded from it (no lm_head).
    with pytest.raises(ValueError, match=r"missing tensors \['lm_head.weight'\]"):
        CustomSplitLLamaForCausalLM.from_pretrained(tmp_path)


def test_all_padding_values_are_finite(causal_dir):
    value = CustomSplitLLamaForTokenClassification.from_pretrained(
        causal_dir, num_labels=1, fresh_value_head=True
    )
    ids, mask = _inputs("all_padding_batch")
    with torch.no_grad():
        assert torch.isfinite(value(ids, attention_mask=mask).logits).all()
