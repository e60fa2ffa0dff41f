"""CustomSplitLlamaConfig: validation errors name their field; path-based configs are read
once and saved self-contained; presets carry the published Llama-3 dimensions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
from transformers import AutoConfig, LlamaConfig

from splitllama import config as config_module
from splitllama.config import (
    DERIVED_FIELDS,
    CustomSplitLlamaConfig,
    PRESETS,
    TINY_PRESETS,
    llama_preset,
)
from splitllama.verify.tiny import tiny_split_config


def _lower(**overrides) -> LlamaConfig:
    return llama_preset("tiny-llama3.1-8b", **overrides)


def _upper(**overrides) -> LlamaConfig:
    return llama_preset("tiny-llama3.1-70b", **overrides)


def _split(lower=None, upper=None, num_lower=2, num_upper=2, **kwargs) -> CustomSplitLlamaConfig:
    return CustomSplitLlamaConfig.from_llama_configs(
        lower or _lower(), upper or _upper(), num_lower, num_upper, **kwargs
    )


@pytest.mark.parametrize(
    ("num_lower", "num_upper", "field"),
    [(0, 2, "num_layers_8"), (5, 2, "num_layers_8"), (2, 0, "num_layers_70"), (2, 7, "num_layers_70")],
)
def test_layer_counts_out_of_range_name_the_field(num_lower, num_upper, field):
    with pytest.raises(ValueError, match=field) as err:
        _split(num_lower=num_lower, num_upper=num_upper)
    assert "allowed 1.." in str(err.value)


def test_layer_counts_at_the_limits_are_accepted():
    config = _split(num_lower=4, num_upper=6)
    assert (config.num_lower, config.num_upper, config.upper_layer_offset) == (4, 6, 0)
    assert _split(num_lower=1, num_upper=1).upper_layer_offset == 5


def test_layer_count_must_be_an_int():
    with pytest.raises(ValueError, match="num_layers_8 must be an int"):
        _split(num_lower=True)


def test_mismatched_vocab_names_vocab_size():
    with pytest.raises(ValueError, match=r"vocab_size=256 differs from upper_config.vocab_size=300"):
        _split(upper=_upper(vocab_size=300))


def test_missing_sub_config_names_it():
    with pytest.raises(ValueError, match="upper_config is missing.*path70b"):
        CustomSplitLlamaConfig(num_layers_8=1, num_layers_70=1, lower_config=_lower().to_dict())


def test_missing_path_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="path8b=.*does not hold a config.json"):
        CustomSplitLlamaConfig(num_layers_8=1, num_layers_70=1, path8b=str(tmp_path / "nowhere"),
                               upper_config=_upper().to_dict())


def test_rope_type_not_supported():
    lower = _lower(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match=r"lower_config.rope_parameters.rope_type='linear'.*allowed"):
        _split(lower=lower)


@pytest.mark.parametrize(("key", "value"), [("low_freq_factor", 2.0), ("high_freq_factor", 8.0),
                                            ("original_max_position_embeddings", 4096), ("factor", 4.0)])
def test_llama3_rope_settings_other_than_the_published_ones_are_accepted(key, value):
    rope = dict(PRESETS["llama3.1-70b"]["rope_parameters"], **{key: value})
    assert _split(upper=_upper(rope_parameters=rope)).upper.rope_parameters[key] == value


@pytest.mark.parametrize("key", ["factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings"])
def test_llama3_rope_without_a_setting_names_it(key):
    lower = _lower()
    lower.rope_parameters = {k: v for k, v in PRESETS["llama3.1-8b"]["rope_parameters"].items() if k != key}
    with pytest.raises(ValueError, match=f"lower_config.rope_parameters lacks \\['{key}'\\]"):
        _split(lower=lower)


def test_llama3_rope_frequency_factors_out_of_order_refused():
    upper = _upper()
    upper.rope_parameters = dict(PRESETS["llama3.1-70b"]["rope_parameters"], low_freq_factor=4.0,
                                 high_freq_factor=1.0)
    with pytest.raises(ValueError, match="upper_config.rope_parameters: need high_freq_factor > low_freq_factor"):
        _split(upper=upper)


def test_non_silu_activation_names_hidden_act():
    with pytest.raises(ValueError, match=r"lower_config.hidden_act='gelu'.*allowed: 'silu'"):
        _split(lower=_lower(hidden_act="gelu"))


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_biases_refused(flag):
    with pytest.raises(ValueError, match=f"upper_config.{flag}"):
        _split(upper=_upper(**{flag: True}))


def test_sub_config_of_another_model_type_refused():
    with pytest.raises(ValueError, match="lower_config must be a Llama config"):
        CustomSplitLlamaConfig(num_layers_8=1, num_layers_70=1,
                               lower_config={"model_type": "mistral"}, upper_config=_upper().to_dict())


def test_mlp_must_be_bool_and_embeddings_untied():
    with pytest.raises(ValueError, match="mlp must be true or false"):
        _split(mlp="yes")
    with pytest.raises(ValueError, match="tie_word_embeddings must be false"):
        _split(tie_word_embeddings=True)


def test_defaults_from_the_sub_configs():
    config = _split(upper=_upper(rms_norm_eps=1e-6))
    assert config.vocab_size == 256
    assert config.rms_norm_eps == 1e-6  # the final norm belongs to the upper model
    assert (config.h_lo, config.h_hi) == (64, 128)


def _write_seed_style(root: Path) -> Path:
    """A seed-format split config whose path8b / path70b are relative to its directory."""
    _lower().save_pretrained(root / "l8b")
    _upper().save_pretrained(root / "l70b")
    split = {"model_type": "custom_split_llama", "architectures": ["CustomSplitLLamaForCausalLM"],
             "vocab_size": 256, "rms_norm_eps": 1e-5, "num_layers_8": 2, "num_layers_70": 3,
             "mlp": True, "path8b": "../l8b", "path70b": "../l70b"}
    (root / "split").mkdir()
    (root / "split" / "config.json").write_text(json.dumps(split))
    return root / "split"


def test_path_config_reads_sub_configs_once_and_saves_self_contained(tmp_path):
    (tmp_path / "src").mkdir()
    split_dir = _write_seed_style(tmp_path / "src")
    with mock.patch.object(config_module, "_read_llama_config",
                           wraps=config_module._read_llama_config) as read:
        config = CustomSplitLlamaConfig.from_pretrained(split_dir)
        assert read.call_count == 2
        # Using the config (properties, copies) never touches the file system again.
        _ = (config.h_lo, config.h_hi, config.upper_layer_offset, config.to_dict())
        assert read.call_count == 2
    assert (config.num_lower, config.num_upper, config.mlp) == (2, 3, True)
    assert config.lower.hidden_size == 64 and config.upper.hidden_size == 128

    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["lower_config"]["hidden_size"] == 64
    assert saved["upper_config"]["num_hidden_layers"] == 6
    shutil.rmtree(tmp_path / "src")  # the saved config must not need the source directories
    again = CustomSplitLlamaConfig.from_pretrained(tmp_path / "saved")
    assert again.lower.to_dict() == config.lower.to_dict()
    assert again.upper.to_dict() == config.upper.to_dict()


def test_tiny_split_config_round_trip(tmp_path):
    config = tiny_split_config(mlp=True)
    config.save_pretrained(tmp_path)
    again = CustomSplitLlamaConfig.from_pretrained(tmp_path)
    assert again.mlp and again.upper_layer_offset == 4
    assert again.architectures == ["CustomSplitLLamaForCausalLM"]


ROUND_TRIPS = {
    "to_dict/from_dict": lambda c, _: CustomSplitLlamaConfig.from_dict(c.to_dict()),
    "constructor": lambda c, _: CustomSplitLlamaConfig(**c.to_dict()),
    "json": lambda c, _: CustomSplitLlamaConfig.from_dict(json.loads(c.to_json_string())),
    "diff dict": lambda c, _: CustomSplitLlamaConfig.from_dict(c.to_diff_dict()),
    "save/AutoConfig": lambda c, path: (c.save_pretrained(path), AutoConfig.from_pretrained(path))[1],
}


@pytest.mark.parametrize("trip", ROUND_TRIPS)
def test_round_trips_keep_the_config(trip, tmp_path):
    """The ways transformers' tools copy a config keep every field, the derived standard
    ones (hidden_size, num_hidden_layers, ...) included."""
    config = tiny_split_config(mlp=True)
    again = ROUND_TRIPS[trip](config, tmp_path)
    assert {k: getattr(again, k) for k in DERIVED_FIELDS} == {k: getattr(config, k) for k in DERIVED_FIELDS}
    expected, got = config.to_dict(), again.to_dict()
    expected.pop("_name_or_path"), got.pop("_name_or_path")  # where it was loaded from
    assert got == expected


def test_a_config_without_its_stacks_is_checked_when_a_model_needs_them(tmp_path):
    """transformers validates a config when it saves one, and its tools make configs from
    fields alone (its ConfigTester does): the split's own checks wait for a model."""
    shell = CustomSplitLlamaConfig(vocab_size=99, num_layers_8=1, num_layers_70=1, mlp=True)
    shell.save_pretrained(tmp_path)
    assert CustomSplitLlamaConfig.from_pretrained(tmp_path).to_dict() == shell.to_dict()
    with pytest.raises(ValueError, match="lower_config is missing: embed it or set path8b"):
        shell.check_split()  # what every model constructor calls first
    tiny_split_config().validate()  # transformers' checks and the split's, on a whole config


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("llama3-8b", (4096, 14336, 32, 32, 8, 128, 128256, 500000.0)),
        ("llama3-70b", (8192, 28672, 80, 64, 8, 128, 128256, 500000.0)),
        ("llama3.1-8b", (4096, 14336, 32, 32, 8, 128, 128256, 500000.0)),
        ("llama3.1-70b", (8192, 28672, 80, 64, 8, 128, 128256, 500000.0)),
    ],
)
def test_presets_have_published_dims(name, dims):
    config = llama_preset(name)
    got = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
           config.num_attention_heads, config.num_key_value_heads, config.head_dim,
           config.vocab_size, config.rope_parameters["rope_theta"])
    assert got == dims
    assert config.rms_norm_eps == 1e-5
    if name.startswith("llama3.1"):
        assert config.rope_parameters["rope_type"] == "llama3"
        assert config.rope_parameters["factor"] == 8.0
        assert config.max_position_embeddings == 131072
    else:
        assert config.rope_parameters["rope_type"] == "default"
        assert config.max_position_embeddings == 8192


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_tiny_presets_keep_the_real_ratios(name):
    tiny, real = llama_preset(name), llama_preset(TINY_PRESETS[name]["base"])
    assert tiny.num_attention_heads // tiny.num_key_value_heads == \
        real.num_attention_heads // real.num_key_value_heads
    assert tiny.intermediate_size / tiny.hidden_size == real.intermediate_size / real.hidden_size
    assert tiny.rope_parameters == real.rope_parameters


def test_unknown_preset_lists_the_allowed_names():
    with pytest.raises(ValueError, match="unknown preset 'llama2'.*allowed.*llama3-8b"):
        llama_preset("llama2")


def _rope_warnings(monkeypatch, filtered: bool) -> int:
    """How many rope warnings transformers logs while three split configs with a Llama-3.1
    rope and max_position_embeddings <= original_max_position_embeddings are built, each
    twice (from the stacks, then from its dict)."""
    import logging

    from splitllama.config import ROPE_LOGGER, _OncePerProcess

    logger = logging.getLogger(ROPE_LOGGER)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    with monkeypatch.context() as patch:
        if filtered:  # a fresh process's filter: nothing seen yet
            for once in [f for f in logger.filters if isinstance(f, _OncePerProcess)]:
                patch.setattr(once, "seen", set())
        else:  # the control: transformers' own behaviour
            patch.setattr(logger, "filters", [])
        logger.addHandler(handler)
        try:
            for _ in range(3):
                lower = llama_preset("tiny-llama3.1-8b", max_position_embeddings=4096)
                upper = llama_preset("tiny-llama3.1-70b", max_position_embeddings=4096)
                config = CustomSplitLlamaConfig.from_llama_configs(lower, upper, 2, 2)
                CustomSplitLlamaConfig.from_dict(config.to_dict())
        finally:
            logger.removeHandler(handler)
    return sum("original_max_position_embeddings field must be less than" in r.getMessage() for r in records)


def test_rope_warning_at_most_once_per_process(monkeypatch):
    assert _rope_warnings(monkeypatch, filtered=False) > 1  # the scenario does repeat it
    assert _rope_warnings(monkeypatch, filtered=True) == 1
