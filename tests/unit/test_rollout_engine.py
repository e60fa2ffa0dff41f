"""The rollout engine side of ``splitllama.verify.rollout`` alone (no verl, one process):
the strict loader a weight stream goes through, generation with recorded log-probs, and
rollout files. The whole loop with verl's trainer is tests/integration/test_rollout.py."""

from __future__ import annotations

import pytest
import torch

from splitllama.verify import rollout
from splitllama.verify.tiny import tiny_split_config
from tests.unit.hf_llama import random_oracle


@pytest.fixture(scope="module")
def source():
    return random_oracle(tiny_split_config(), seed=21)


def _stream(model, rename=None, drop=None, twice=None, reshape=None):
    for name, param in model.named_parameters():
        if name == drop:
            continue
        tensor = param.detach()
        if name == reshape:
            tensor = tensor[:-1]
        yield (rename or {}).get(name, name), tensor
        if name == twice:
            yield name, tensor


def test_engine_model_is_the_stream(source):
    model = rollout.engine_model(source.config, _stream(source), torch.float64, "cpu")
    got = dict(model.named_parameters())
    assert all(torch.equal(got[n], p) for n, p in source.named_parameters())


LAYER = "model.layers_last.0.self_attn"


@pytest.mark.parametrize("bad,message", [
    (dict(rename={f"{LAYER}.q_proj.weight": f"{LAYER}.qkv_proj.weight"}),
     rf"^load_weights: '{LAYER}.qkv_proj.weight' is not a parameter of CustomSplitLLamaForCausalLM$"),
    (dict(reshape=f"{LAYER}.k_proj.weight"),
     rf"^load_weights: '{LAYER}.k_proj.weight' has shape \(15, 128\), the model's is \(16, 128\)$"),
    (dict(twice="lm_head.weight"), r"^load_weights: 'lm_head.weight' came twice$"),
    (dict(drop="model.norm.weight"), r"^load_weights: 1 parameter\(s\) never came: \['model.norm.weight'\]$"),
], ids=["unknown_name", "wrong_shape", "twice", "missing"])
def test_load_weights_is_strict(source, bad, message):
    with pytest.raises(ValueError, match=message):
        rollout.engine_model(source.config, _stream(source, **bad), torch.float64, "cpu")


def test_generated_log_probs_are_the_models(source):
    """Left-padded prompts through ``generate``'s KV cache: each recorded log-prob equals the
    model's one padded forward over prompt + response (float64, to ``FLOAT64_BOUND``) and
    what ``generate`` reported (float32, to ``REPORTED_BOUND``)."""
    prompts, mask = rollout.prompt_batch(source.config.vocab_size)
    assert int((mask == 0).sum()) > 0, "some prompts must be left-padded"
    out = rollout.generate(source, prompts, mask)
    assert out.responses.shape == (len(rollout.PROMPT_LENGTHS), rollout.NEW_TOKENS)
    assert out.log_probs.dtype == torch.float64
    reference = rollout.reference_log_probs(source, out)
    assert float((out.log_probs - reference).abs().max()) <= rollout.FLOAT64_BOUND
    assert float((out.log_probs - out.reported.double()).abs().max()) <= rollout.REPORTED_BOUND


def test_rollout_file_round_trip_and_refusals(source, tmp_path):
    prompts, mask = rollout.prompt_batch(source.config.vocab_size)
    out = rollout.generate(source, prompts, mask)
    path = str(tmp_path / "rollouts.safetensors")
    rollout.write_rollouts(out, path)
    back = rollout.read_rollouts(path)
    for field in ("prompts", "prompt_mask", "responses", "response_mask", "log_probs"):
        assert torch.equal(getattr(back, field), getattr(out, field)), field
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != "rollout_log_probs"}, path)
    with pytest.raises(ValueError, match=r"missing \['rollout_log_probs'\]"):
        rollout.read_rollouts(path)
    save_file({**tensors, "response_mask": tensors["response_mask"][:, :-1].contiguous()}, path)
    with pytest.raises(ValueError, match=r"response_mask has shape \(4, 3\), expected \(4, 4\)"):
        rollout.read_rollouts(path)
