"""Fine-tuning and generation options of the oracle's HF classes: the loss from labels
(transformers' causal-LM loss, num_items_in_batch), a Trainer-style loop, SDPA and
gradient checkpointing changing no math (float64), PEFT-style frozen weights with
``enable_input_require_grads``, and static-cache generation equal to dynamic-cache."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from splitllama.verify.tiny import tiny_split_config
from tests.cases import EDGE_MASKS, random_input_ids
from tests.unit.hf_llama import random_oracle

VOCAB = 256
MASK = EDGE_MASKS["left_right_inside"]
# float64 on both sides, only the summation order may differ
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _batch(mask=MASK, seed=51):
    ids = random_input_ids(mask, VOCAB, seed)
    labels = ids.masked_fill(~mask, -100)  # what a padding-aware collator produces
    return ids, labels


# ---- item 1: loss from labels --------------------------------------------------------------
def test_loss_is_transformers_causal_lm_loss():
    model = random_oracle(tiny_split_config(), seed=52, dtype=torch.float32)
    ids, labels = _batch()
    out = model(ids, attention_mask=MASK, labels=labels)
    expected = ForCausalLMLoss(out.logits, labels, VOCAB)
    assert torch.equal(out.loss, expected)
    count = (labels[:, 1:] != -100).sum()
    summed = model(ids, attention_mask=MASK, labels=labels, num_items_in_batch=2 * count).loss
    assert torch.equal(summed, ForCausalLMLoss(out.logits, labels, VOCAB, num_items_in_batch=2 * count))
    torch.testing.assert_close(summed, out.loss / 2)


def test_float64_loss_stays_float64():
    model = random_oracle(tiny_split_config(), seed=52)
    ids, labels = _batch()
    out = model(ids, attention_mask=MASK, labels=labels)
    assert out.loss.dtype == torch.float64
    log_probs = torch.log_softmax(out.logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    counted = target != -100
    manual = -log_probs.gather(-1, target.clamp(min=0)[..., None])[..., 0][counted].mean()
    torch.testing.assert_close(out.loss, manual, **TIGHT)


def test_forward_refuses_unknown_keyword_arguments():
    model = random_oracle(tiny_split_config(), seed=52)
    ids, _ = _batch()
    with pytest.raises(ValueError, match=r"unsupported arguments \['max_length_q'\]"):
        model(ids, max_length_q=8)


def test_trainer_style_steps_reduce_the_loss():
    """What transformers' Trainer does per step, written out: labels in the batch,
    num_items_in_batch = the counted labels, loss.backward(), AdamW. (Trainer itself needs
    accelerate, which this repository does not install.)"""
    torch.manual_seed(53)
    model = random_oracle(tiny_split_config(), seed=53, dtype=torch.float32).train()
    ids, labels = _batch()
    batch = {"input_ids": ids, "attention_mask": MASK.long(), "labels": labels}
    num_items = (labels[:, 1:] != -100).sum()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# ---- item 5: sdpa and gradient checkpointing change no math ------------------------------
def _loss_and_grads(model, mask, **kwargs):
    model.zero_grad(set_to_none=True)
    ids, labels = _batch(mask)
    out = model(ids, attention_mask=mask, labels=labels, use_cache=False, **kwargs)
    # a probe of every logit (padding rows included) plus the loss: all gradients matter
    probe = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(54), dtype=out.logits.dtype)
    total = (out.logits * probe * mask[..., None]).sum()
    if torch.isfinite(out.loss):
        total = total + out.loss
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("mask_name", ["left_right_inside", "empty_row", "all_padding_batch", "single_token_rows"])
@pytest.mark.parametrize("mlp", [False, True])
def test_sdpa_equals_eager_float64(mask_name, mlp):
    model = random_oracle(tiny_split_config(mlp=mlp), seed=55).train()
    mask = EDGE_MASKS[mask_name]
    eager_logits, eager_grads = _loss_and_grads(model, mask)
    model.set_attn_implementation("sdpa")
    assert model.config.lower._attn_implementation == "sdpa"
    sdpa_logits, sdpa_grads = _loss_and_grads(model, mask)
    torch.testing.assert_close(sdpa_logits, eager_logits, **TIGHT)
    assert sdpa_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(sdpa_grads[name], eager_grads[name], **TIGHT, msg=lambda m, n=name: f"{n}: {m}")


def enable_checkpointing(model, **kwargs) -> None:
    """transformers' current API: ``activation_checkpointing_enable`` (5.24, where
    ``gradient_checkpointing_enable`` is its deprecated alias); 5.17 has only the latter."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
        assert model.is_gradient_checkpointing


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_equals_plain_backward(reentrant):
    model = random_oracle(tiny_split_config(mlp=True), seed=56).train()
    plain_logits, plain_grads = _loss_and_grads(model, MASK)
    enable_checkpointing(model, use_reentrant=reentrant)
    ckpt_logits, ckpt_grads = _loss_and_grads(model, MASK)
    assert torch.equal(ckpt_logits, plain_logits)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name in plain_grads:  # the recompute is the same computation: bitwise equal
        assert torch.equal(ckpt_grads[name], plain_grads[name]), name


def test_gradient_checkpointing_drops_the_cache_in_training():
    model = random_oracle(tiny_split_config(), seed=56).train()
    enable_checkpointing(model)
    ids, _ = _batch()
    out = model(ids, attention_mask=MASK, use_cache=True)
    assert out.cache is None if hasattr(out, "cache") else out.past_key_values is None


def test_peft_style_frozen_base_with_input_require_grads():
    """PEFT freezes the base weights, trains weights inside the layers, and calls
    ``enable_input_require_grads`` (a hook on the input embedding) so that a reentrant
    checkpoint, whose inputs would otherwise need no gradient, still propagates into the
    layers: the trained weights get exactly the gradients of the plain model."""
    reference = random_oracle(tiny_split_config(), seed=57).train()
    _, expected = _loss_and_grads(reference, MASK)
    trained = [n for n in expected if ".self_attn.q_proj." in n]

    model = random_oracle(tiny_split_config(), seed=57).train()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    model.enable_input_require_grads()
    enable_checkpointing(model, use_reentrant=True)
    _, grads = _loss_and_grads(model, MASK)
    assert sorted(grads) == sorted(trained)
    for name in trained:
        assert torch.equal(grads[name], expected[name]), name


# ---- item 5: static cache ------------------------------------------------------------------
GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
PROMPT_MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_static_cache_generation_equals_dynamic(attn):
    model = random_oracle(tiny_split_config(mlp=True), seed=58)
    model.set_attn_implementation(attn)
    ids = random_input_ids(PROMPT_MASK, VOCAB, 59)
    kwargs = dict(attention_mask=PROMPT_MASK.long(), output_scores=True, return_dict_in_generate=True, **GREEDY)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(a, b, **TIGHT)
    assert torch.equal(dynamic.sequences, model.generate(ids, use_cache=False, **kwargs).sequences)
