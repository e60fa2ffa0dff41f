"""ModelOptions: refused at construction with the field named, frozen, recompute resolved
from a megatron config, and importable without torch (the CLI checks flags with it)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from splitllama.options import ModelOptions, model_options


@pytest.mark.parametrize("fields,message", [
    (dict(recompute="sometimes"), "recompute='sometimes' is not one of"),
    (dict(log_probs="exact"), "log_probs='exact' is not one of"),
    (dict(make_vocab_size_divisible_by=0), "make_vocab_size_divisible_by must be a positive int, got 0"),
    (dict(make_vocab_size_divisible_by=True), "make_vocab_size_divisible_by must be a positive int"),
])
def test_bad_options_are_refused_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelOptions(**fields)


def test_options_are_frozen_and_normalised():
    options = ModelOptions(recompute="none")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.recompute = "full"


def test_recompute_defaults_to_the_megatron_configs():
    assert ModelOptions().resolve(SimpleNamespace(recompute_granularity="full")).recompute == "full"
    assert ModelOptions().resolve(SimpleNamespace()).recompute == "none"
    assert ModelOptions(recompute="selective").resolve(SimpleNamespace(recompute_granularity="full")).recompute \
        == "selective"


def test_model_options_takes_none_or_options_only():
    assert model_options(None) == ModelOptions()
    with pytest.raises(ValueError, match="options must be a splitllama.ModelOptions or None, got dict"):
        model_options({"recompute": "full"})


def test_importing_options_loads_no_torch():
    code = "import sys, splitllama.options; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
