"""The oracle's config and forward follow Hugging Face conventions: standard top-level
fields and declared sub-configs, a cache built from the config, attn_implementation
reaching the stacks, resize_token_embeddings then save/load, forward flags defaulting to
the config, ``output_attentions``, and ``hidden_states`` with ``num_hidden_layers + 1``
entries (equal, state by state, to HF Llama's on the identity-adapter model)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache, StaticCache

from oracle import CustomSplitLLamaForCausalLM
from oracle.modeling import CACHE_FIELD
from splitllama.config import DERIVED_FIELDS, CustomSplitLlamaConfig
from splitllama.verify.tiny import tiny_split_config
from tests.cases import EDGE_MASKS, random_input_ids
from tests.unit.hf_llama import (
    assembled_oracle,
    hf_positions,
    random_llama,
    random_oracle,
    save_llama,
    stacked_llama,
    tiny_llama_config,
)
from tests.unit.test_oracle_vs_hf import widened_hf_precision

VOCAB = 256
MASK = EDGE_MASKS["left_right_inside"]


@pytest.fixture(scope="module")
def model():
    return random_oracle(tiny_split_config(mlp=True), seed=41)


def _ids(mask, seed=42):
    return random_input_ids(mask, VOCAB, seed)


# ---- item 2: standard config fields, sub-configs, caches from the config -----------------
def test_standard_fields_are_derived_from_the_stacks():
    config = tiny_split_config(num_lower=2, num_upper=3)
    assert config.hidden_size == config.h_hi == config.upper.hidden_size
    assert config.num_hidden_layers == 5
    for name in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                 "initializer_range"):
        assert getattr(config, name) == getattr(config.upper, name), name
    assert config.max_position_embeddings == min(config.lower.max_position_embeddings,
                                                 config.upper.max_position_embeddings)
    assert config.use_cache is True
    assert set(config.sub_configs) == {"lower_config", "upper_config"}
    # the names the production package and the loader read keep working
    assert (config.lower, config.upper, config.num_lower, config.num_upper) == \
        (config.lower_config, config.upper_config, config.num_layers_8, config.num_layers_70)


def test_derived_fields_are_saved_and_checked_on_load(tmp_path):
    config = tiny_split_config()
    config.save_pretrained(tmp_path)
    loaded = CustomSplitLlamaConfig.from_pretrained(tmp_path)
    saved = loaded.to_dict()
    assert {name: saved[name] for name in DERIVED_FIELDS} == {name: getattr(config, name) for name in DERIVED_FIELDS}
    with pytest.raises(ValueError, match=r"num_hidden_layers=7 disagrees .* num_layers_8 \+ num_layers_70"):
        CustomSplitLlamaConfig.from_dict({**saved, "num_hidden_layers": 7})
    with pytest.raises(ValueError, match="hidden_size=1 disagrees"):
        CustomSplitLlamaConfig.from_dict({**saved, "hidden_size": 1})


def test_cache_from_config_matches_forward_without_cache(model):
    ids = _ids(MASK)
    cache = DynamicCache(config=model.config)
    assert len(cache.layers) == model.config.num_hidden_layers
    with torch.no_grad():
        cached = model(ids, attention_mask=MASK, cache=cache, use_cache=True)
        plain = model(ids, attention_mask=MASK, use_cache=False)
    assert cache.get_seq_length() == MASK.shape[1]
    assert torch.equal(cached.logits, plain.logits)
    assert len(StaticCache(config=model.config, max_cache_len=16).layers) == model.config.num_hidden_layers


def test_the_cache_argument_is_named_as_transformers_names_it(model, identity_pair):
    """``cache`` and ``past_key_values`` both take the cache; where transformers has renamed
    it ``cache`` (5.24), ``past_key_values`` brings the deprecation warning its own Llama
    gives, and none where it is still the name (5.9, 5.17)."""
    ids, llama = _ids(MASK), identity_pair[1]

    def deprecation_warnings(net) -> list[str]:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = net(ids, attention_mask=MASK, past_key_values=DynamicCache(config=net.config), use_cache=True)
        assert getattr(out, CACHE_FIELD).get_seq_length() == MASK.shape[1]
        return [str(w.message) for w in caught if "`past_key_values` is deprecated" in str(w.message)]

    ours, theirs = deprecation_warnings(model), deprecation_warnings(llama)
    assert len(ours) == len(theirs) == (1 if CACHE_FIELD == "cache" else 0), (ours, theirs)
    with torch.no_grad():
        by_new_name = model(ids, attention_mask=MASK, cache=DynamicCache(config=model.config), use_cache=True)
        by_old_name = model(ids, attention_mask=MASK, past_key_values=DynamicCache(config=model.config),
                            use_cache=True)
    assert torch.equal(by_new_name.logits, by_old_name.logits)


def test_attn_implementation_reaches_the_sub_configs(model, tmp_path):
    # sdpa by default, as transformers chooses for a class that supports it
    fresh = CustomSplitLLamaForCausalLM(tiny_split_config())
    assert (fresh.config._attn_implementation, fresh.config.lower._attn_implementation,
            fresh.config.upper._attn_implementation) == ("sdpa", "sdpa", "sdpa")
    # eager, the reference, when asked for (random_oracle asks)
    assert model.config._attn_implementation == "eager"
    assert model.config.lower._attn_implementation == model.config.upper._attn_implementation == "eager"
    model.save_pretrained(tmp_path)
    sdpa = CustomSplitLLamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="sdpa")
    assert (sdpa.config._attn_implementation, sdpa.config.lower._attn_implementation,
            sdpa.config.upper._attn_implementation) == ("sdpa", "sdpa", "sdpa")
    with pytest.raises(ValueError, match="does not support Flash Attention 2"):  # transformers' own refusal
        CustomSplitLLamaForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


# ---- item 3: resize_token_embeddings, then save and load -----------------------------------
def test_resize_token_embeddings_then_save_and_load(tmp_path):
    resized = random_oracle(tiny_split_config(), seed=43)
    resized.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
    assert resized.config.vocab_size == resized.config.lower.vocab_size == resized.config.upper.vocab_size == VOCAB + 8
    resized.save_pretrained(tmp_path)
    loaded = CustomSplitLLamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager")
    assert loaded.lm_head.weight.shape == (VOCAB + 8, loaded.config.h_hi)
    assert loaded.model.embed_tokens.weight.shape == (VOCAB + 8, loaded.config.h_lo)
    ids = _ids(MASK) + 8  # tokens of the new rows too
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=MASK).logits, resized(ids, attention_mask=MASK).logits)


# ---- item 4: config defaults, attentions, hidden_states ------------------------------------
def test_forward_flags_default_to_the_config():
    config = tiny_split_config()
    config.use_cache, config.output_hidden_states, config.return_dict = False, True, False
    quiet = random_oracle(config, seed=44)
    ids = _ids(MASK)
    with torch.no_grad():
        out = quiet(ids, attention_mask=MASK)
        assert isinstance(out, tuple)
        logits, hidden_states = out  # no cache, hidden states on
        assert len(hidden_states) == config.num_hidden_layers + 1
        # explicit arguments win over the config
        explicit = quiet(ids, attention_mask=MASK, use_cache=True, output_hidden_states=False, return_dict=True)
    # the cache field's name differs between the supported transformers versions
    assert explicit.hidden_states is None and getattr(explicit, CACHE_FIELD).get_seq_length() == MASK.shape[1]
    assert torch.equal(explicit.logits, logits)


def test_output_attentions_eager(model):
    ids = _ids(MASK)
    with torch.no_grad():
        out = model(ids, attention_mask=MASK, output_attentions=True)
    config = model.config
    assert len(out.attentions) == config.num_hidden_layers
    heads = [config.lower.num_attention_heads] * config.num_lower + [config.upper.num_attention_heads] * config.num_upper
    for probs, h in zip(out.attentions, heads):
        assert probs.shape == (*MASK.shape[:1], h, MASK.shape[1], MASK.shape[1])
        # each valid query's probabilities: over valid keys up to itself, summing to 1
        causal = torch.ones(MASK.shape[1], MASK.shape[1], dtype=torch.bool).tril()
        allowed = (MASK[:, None, :] & causal)[:, None]
        assert torch.all(probs[~allowed.expand_as(probs)] == 0)
        sums = probs.sum(-1)[MASK[:, None, :].expand(-1, h, -1)]
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-12)


def test_output_attentions_fall_back_to_eager(model):
    """Under sdpa, asking for the attentions runs that call the eager way (the probabilities
    exist there only), as Hugging Face models do: the same output as the eager model's."""
    ids = _ids(MASK)
    with torch.no_grad():
        eager = model(ids, attention_mask=MASK, output_attentions=True)
        model.set_attn_implementation("sdpa")
        try:
            sdpa = model(ids, attention_mask=MASK, output_attentions=True)
        finally:
            model.set_attn_implementation("eager")
    assert torch.equal(sdpa.logits, eager.logits)
    assert all(torch.equal(s, e) for s, e in zip(sdpa.attentions, eager.attentions, strict=True))


@pytest.fixture(scope="module")
def identity_pair(tmp_path_factory):
    """(oracle with identity adapter, the HF Llama it must equal): N=2 lower, M=2 upper."""
    root = tmp_path_factory.mktemp("hf_states")
    lower = random_llama(tiny_llama_config(), seed=45)
    upper = random_llama(tiny_llama_config(), seed=46)
    save_llama(lower, root / "lower")
    save_llama(upper, root / "upper")
    oracle = assembled_oracle(root / "lower", root / "upper", 2, 2, root / "split")
    return oracle, stacked_llama(lower, upper, 2, 2)


def test_hidden_states_follow_hf_llama(identity_pair):
    """The convention: embeddings, each decoder layer's output, the last after the final
    norm; state by state equal to HF Llama's with its float32 norm and rope angles widened to
    float64 (relative 1e-10: summation order only, as in test_oracle_vs_hf)."""
    oracle, llama = identity_pair
    mask = EDGE_MASKS["no_padding"]
    ids = _ids(mask)
    with torch.no_grad(), widened_hf_precision():
        ours = oracle(ids, attention_mask=mask, output_hidden_states=True)
        theirs = llama(ids, attention_mask=mask.long(), position_ids=hf_positions(mask), output_hidden_states=True)
        trunk = oracle.model(ids, attention_mask=mask)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == oracle.config.num_hidden_layers + 1
    assert torch.equal(ours.hidden_states[-1], trunk.last_hidden_state)
    for k, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"state {k}: {m}")
