"""transformers' conventions on the three Hugging Face classes, tested directly.

transformers runs ``ModelTesterMixin`` / ``GenerationTesterMixin`` (tests/test_modeling_common.py,
tests/generation/test_utils.py) on its own models; those live in its repository's test tree,
which the wheel does not ship, so the conventions they check are tested here: the value
model's ``labels`` (mean squared error over the attention mask, transformers' regression
convention for one output) and output options as on the CausalLM; declared support flags
that match what the classes do (``_supports_sdpa``; ``_can_compile_fullgraph``, which
transformers' tests read as "supports the static cache"); unsupported attention
implementations refused in transformers' words; ``num_hidden_layers`` honoured or refused,
never replaced; no tensor-parallel plan naming modules no class has."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, StaticCache

from oracle import CustomSplitLLamaForCausalLM, CustomSplitLLamaForTokenClassification, CustomSplitLLamaModel
from oracle.modeling import value_regression_loss
from splitllama.config import CustomSplitLlamaConfig
from splitllama.verify.tiny import tiny_split_config
from tests.cases import EDGE_MASKS, random_input_ids
from tests.unit.hf_llama import random_oracle

VOCAB = 256
MASK = EDGE_MASKS["left_right_inside"]  # padding on the left, the right and inside rows
CLASSES = (CustomSplitLLamaModel, CustomSplitLLamaForCausalLM, CustomSplitLLamaForTokenClassification)


def _value_config(**kwargs) -> CustomSplitLlamaConfig:
    config = tiny_split_config(**kwargs)
    config.num_labels = 1
    return config


@pytest.fixture(scope="module")
def value_model():
    torch.manual_seed(3)
    # eager: config.output_attentions=True is transformers' setting for eager attention only
    return CustomSplitLLamaForTokenClassification._from_config(_value_config(mlp=True),
                                                               attn_implementation="eager").double()


# ---- the value model: labels and output options -------------------------------------------
def test_value_labels_give_the_mean_squared_error_over_the_mask(value_model):
    ids = random_input_ids(MASK, VOCAB, 4)
    labels = torch.randn(MASK.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = value_model(ids, attention_mask=MASK, labels=labels)
    valid = MASK.bool()
    expected = ((out.logits[..., 0] - labels)[valid] ** 2).sum() / valid.sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-14, atol=0)
    # targets at padding are not scored: anything there leaves the loss as it is
    scrambled = torch.where(valid, labels, torch.full_like(labels, 1e6))
    assert torch.equal(value_model(ids, attention_mask=MASK, labels=scrambled).loss, out.loss)
    out.loss.backward()
    assert value_model.score.weight.grad is not None and value_model.score.weight.grad.abs().sum() > 0
    value_model.zero_grad(set_to_none=True)


def test_value_loss_without_a_mask_and_of_integer_labels():
    values = torch.tensor([[[1.0], [2.0]], [[3.0], [5.0]]])
    labels = torch.tensor([[1, 0], [0, 5]])  # transformers' tests pass integer labels
    assert value_regression_loss(values, labels, None) == torch.tensor((0 + 4 + 9 + 0) / 4)
    with pytest.raises(ValueError, match=r"labels have shape \(2,\); expected \(2, 2\)"):
        value_regression_loss(values, labels[0], None)


def test_value_output_options_as_on_the_causal_lm(value_model):
    ids = random_input_ids(MASK, VOCAB, 6)
    labels = torch.zeros(MASK.shape)
    with torch.no_grad():
        out = value_model(ids, attention_mask=MASK, labels=labels, output_attentions=True,
                          output_hidden_states=True)
        trunk = value_model.model(ids, attention_mask=MASK, output_attentions=True, output_hidden_states=True,
                                  use_cache=False)
        as_tuple = value_model(ids, attention_mask=MASK, labels=labels, output_attentions=True,
                               output_hidden_states=True, return_dict=False)
    layers = value_model.config.num_hidden_layers
    assert len(out.attentions) == layers and len(out.hidden_states) == layers + 1
    for ours, trunks in zip(out.attentions + out.hidden_states, trunk.attentions + trunk.hidden_states, strict=True):
        assert torch.equal(ours, trunks)
    # transformers' tuple order: loss, logits, hidden_states, attentions
    assert len(as_tuple) == 4 and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    assert len(as_tuple[2]) == layers + 1 and len(as_tuple[3]) == layers
    # the config's defaults, as on the CausalLM
    value_model.config.output_attentions = True
    try:
        with torch.no_grad():
            assert len(value_model(ids, attention_mask=MASK).attentions) == layers
    finally:
        value_model.config.output_attentions = False


# ---- declared support matches what the classes do ---------------------------------------
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_forward_compiles_as_one_graph_with_a_static_cache(implementation):
    """``_can_compile_fullgraph = True`` is what transformers' tests read as static-cache
    support: the CausalLM's prefill and decode steps with a ``StaticCache``, and the value
    model's forward, are captured whole (fullgraph; the 'eager' backend keeps this a
    capture test on CPU, without a C++ compiler) and give the uncompiled numbers."""
    assert all(cls._can_compile_fullgraph and cls._supports_sdpa for cls in CLASSES)
    torch.manual_seed(7)
    model = CustomSplitLLamaForCausalLM._from_config(tiny_split_config(), attn_implementation=implementation).eval()
    ids = random_input_ids(MASK, VOCAB, 8)
    batch, seq = ids.shape
    grown = torch.cat([MASK, torch.ones(batch, 1, dtype=MASK.dtype)], dim=1)
    results = []
    for forward in (torch.compile(model.forward, fullgraph=True, backend="eager"), model.forward):
        cache = StaticCache(config=model.config, max_cache_len=seq + 4)
        with torch.no_grad():
            prefill = forward(input_ids=ids, attention_mask=MASK, cache=cache, cache_position=torch.arange(seq),
                              use_cache=True).logits
            decode = forward(input_ids=ids[:, -1:], attention_mask=grown, cache=cache,
                             cache_position=torch.tensor([seq]), use_cache=True).logits
        results.append((prefill, decode))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    value = CustomSplitLLamaForTokenClassification(_value_config()).eval()
    with torch.no_grad():
        compiled = torch.compile(value.forward, fullgraph=True, backend="eager")(ids, attention_mask=MASK)
        assert torch.equal(compiled.logits, value(ids, attention_mask=MASK).logits)
    torch.compiler.reset()


@pytest.mark.parametrize("name", ["foo", "paged|eager"])
def test_unknown_attention_implementation_in_transformers_words(name):
    with pytest.raises(ValueError) as caught:
        CustomSplitLLamaForCausalLM._from_config(tiny_split_config(), attn_implementation=name)
    # transformers' sentence, listing the two this model has
    assert str(caught.value) == (f'Specified `attn_implementation="{name}"` is not supported. The only possible '
                                 'arguments are `attn_implementation="eager"`, `"attn_implementation=sdpa"`.')


@pytest.mark.parametrize("name,words", [("flash_attention_2", "does not support Flash Attention 2"),
                                        ("flex_attention", "does not support an attention implementation "
                                                           "through torch's flex_attention")])
def test_undeclared_backends_refused_by_transformers_itself(name, words):
    assert not CustomSplitLLamaForCausalLM._supports_flash_attn and not CustomSplitLLamaForCausalLM._supports_flex_attn
    with pytest.raises(ValueError, match=words):
        CustomSplitLLamaForCausalLM._from_config(tiny_split_config(), attn_implementation=name)


# ---- num_hidden_layers and the tensor-parallel plan ---------------------------------------
def test_num_hidden_layers_is_honoured_or_refused_never_replaced(tmp_path):
    config = tiny_split_config(num_lower=2, num_upper=2)
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path, num_hidden_layers=4).num_hidden_layers == 4
    with pytest.raises(ValueError, match=r"num_hidden_layers=3 cannot be set: it is derived from "
                                         r"num_layers_8 \+ num_layers_70 .* = 4"):
        AutoConfig.from_pretrained(tmp_path, num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_hidden_layers=3 disagrees with the architecture"):
        CustomSplitLlamaConfig(num_hidden_layers=3, lower_config=config.lower_config.to_dict(),
                               upper_config=config.upper_config.to_dict(), num_layers_8=2, num_layers_70=2)
    with pytest.raises(ValueError, match="cannot be set"):
        config.num_hidden_layers = 3
    config.num_hidden_layers = 4  # what the architecture gives: accepted, nothing changes
    assert config.num_hidden_layers == 4


def test_no_tensor_parallel_plan_names_modules_no_class_has():
    config = tiny_split_config()
    reloaded = CustomSplitLlamaConfig.from_dict(config.to_dict())
    for c in (config, reloaded):
        assert c.base_model_tp_plan is None and c.base_model_pp_plan is None
        assert c.lower_config.base_model_tp_plan is None and c.upper_config.base_model_tp_plan is None
    model = random_oracle(config, seed=9)
    assert not model._tp_plan and not model.supports_tp_plan
