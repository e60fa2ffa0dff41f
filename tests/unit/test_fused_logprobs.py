"""The fused head without any process group (``tp_group=None``: the weight is the whole
vocabulary), as the single-GPU benchmark runs it, against autograd through log_softmax.
The TP cases and the comparison with the materialising path live in
tests/integration/test_fused_logprobs.py (they need megatron's TP group)."""

from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from splitllama.logprobs import fused_log_probs_entropy

# float64, summation order only differs: ~1e-15 relative
REL = 1e-10


@given(tokens=st.integers(0, 11), vocab=st.integers(1, 40), chunk_tokens=st.integers(1, 8),
       vocab_block=st.integers(1, 50), seed=st.integers(0, 2**31 - 1), entropy=st.booleans(),
       recompute_logits=st.booleans())
def test_matches_log_softmax_without_process_group(tokens, vocab, chunk_tokens, vocab_block, seed, entropy,
                                                   recompute_logits):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    g_lp, g_ent = torch.randn(2, tokens, generator=gen, dtype=torch.float64)

    lp, ent = fused_log_probs_entropy(hidden, weight, labels, entropy=entropy, chunk_tokens=chunk_tokens,
                                      vocab_block=vocab_block, tp_group=None, recompute_logits=recompute_logits)
    assert (ent is None) == (not entropy)
    ((lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0)).backward()
    got = [lp, ent, hidden.grad, weight.grad]
    hidden.grad = weight.grad = None

    log_p = torch.log_softmax(hidden @ weight.T, -1)
    ref_lp, ref_ent = log_p.gather(1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    ((ref_lp * g_lp).sum() + ((ref_ent * g_ent).sum() if entropy else 0)).backward()
    want = [ref_lp, ref_ent if entropy else None, hidden.grad, weight.grad]
    for name, a, b in zip(("log_probs", "entropy", "grad_hidden", "grad_weight"), got, want):
        if b is None:
            continue
        if a is None:  # no token reached the op's backward path through this input
            a = torch.zeros_like(b)
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        if b.numel():
            assert float((a - b).abs().max()) <= REL * max(1.0, float(b.abs().max())), name


def test_grad_weight_into_adds_in_place():
    """The weight's gradient ADDED to a caller's buffer (float64 here; float32 for a bf16
    weight, as megatron's main_grad), none returned; the hidden gradient is unchanged."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 20, (9,), generator=gen)
    g_lp, g_ent = torch.randn(2, 9, generator=gen, dtype=torch.float64)

    def backward(**kwargs):
        lp, ent = fused_log_probs_entropy(hidden, weight, labels, chunk_tokens=4, vocab_block=7, tp_group=None,
                                          **kwargs)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()

    backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    start = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    buffer = start.clone()
    backward(grad_weight_into=buffer)
    assert weight.grad is None
    torch.testing.assert_close(buffer, start + want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, want_h, rtol=1e-12, atol=1e-12)

    bf16_weight = weight.detach().to(torch.bfloat16).requires_grad_(True)
    buffer32 = torch.zeros(20, 6)
    lp, ent = fused_log_probs_entropy(hidden.detach().to(torch.bfloat16), bf16_weight, labels, chunk_tokens=4,
                                      vocab_block=7, tp_group=None, grad_weight_into=buffer32)
    ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()
    assert bf16_weight.grad is None
    # bf16 inputs and a bf16 gradient of the logits: ~2^-8 of the gradient's scale
    assert float((buffer32.double() - want_w).abs().max()) <= 2e-2 * float(want_w.abs().max())
    try:
        fused_log_probs_entropy(hidden, weight, labels, tp_group=None, grad_weight_into=torch.zeros(20, 5))
    except ValueError as error:
        assert "grad_weight_into" in str(error)
    else:
        raise AssertionError("a buffer of the wrong shape was accepted")


@given(tokens=st.integers(1, 9), vocab=st.integers(1, 30), pad=st.integers(1, 9), vocab_block=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1))
def test_padded_rows_are_left_out(tokens, vocab, pad, vocab_block, seed):
    """A weight with ``pad`` padding rows after the real ``vocab`` (the padded vocabulary):
    results equal the unpadded op's exactly up to summation order, whatever the padding
    rows hold, and the padding rows get a zero gradient."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    real = torch.randn(vocab, 6, generator=gen, dtype=torch.float64)
    # padding rows with large values: any leak into the softmax would dominate it
    padded = torch.cat([real, 50 * torch.randn(pad, 6, generator=gen, dtype=torch.float64)]).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    g_lp, g_ent = torch.randn(2, tokens, generator=gen, dtype=torch.float64)

    lp, ent = fused_log_probs_entropy(hidden, padded, labels, vocab_block=vocab_block, tp_group=None,
                                      vocab_size=vocab)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    got = [lp, ent, hidden.grad, padded.grad[:vocab]]
    assert torch.equal(padded.grad[vocab:], torch.zeros(pad, 6, dtype=torch.float64))
    hidden.grad = None
    weight = real.clone().requires_grad_(True)
    ref_lp, ref_ent = fused_log_probs_entropy(hidden, weight, labels, vocab_block=vocab_block, tp_group=None)
    ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    for name, a, b in zip(("log_probs", "entropy", "grad_hidden", "grad_weight"), got,
                          [ref_lp, ref_ent, hidden.grad, weight.grad], strict=True):
        assert float((a - b).abs().max()) <= REL * max(1.0, float(b.abs().max())), name


def test_vocab_size_must_leave_real_rows():
    hidden, weight = torch.randn(2, 3), torch.randn(4, 3)
    for bad in (0, 5):
        try:
            fused_log_probs_entropy(hidden, weight, torch.zeros(2, dtype=torch.long), tp_group=None, vocab_size=bad)
        except ValueError as error:
            assert "vocab_size" in str(error)
        else:
            raise AssertionError(f"vocab_size={bad} was accepted for 4 rows")


def test_forward_only_keeps_nothing(monkeypatch):
    """``recompute_logits=False`` keeps each tile's probabilities for a backward; when none
    can follow (no_grad, or no input needing a gradient) nothing is kept, whatever the
    flag: a forward-only pass (an RL trainer's old or reference log-probs) would otherwise
    hold ``T x V`` values for nothing. The log-probs and entropy are the same either way."""
    from splitllama import logprobs

    kept_tiles = []
    keeping = logprobs._tile_stats_kept
    monkeypatch.setattr(logprobs, "_tile_stats_kept", lambda *args: kept_tiles.append(1) or keeping(*args))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 20, (10,), generator=gen)

    def run(hidden, weight):
        return fused_log_probs_entropy(hidden, weight, labels, chunk_tokens=4, vocab_block=7, tp_group=None,
                                       recompute_logits=False)

    with torch.no_grad():
        no_grad = run(hidden, weight.clone().requires_grad_(True))
    without_grad_inputs = run(hidden, weight)
    assert kept_tiles == []
    with_grad = run(hidden, weight.clone().requires_grad_(True))
    assert len(kept_tiles) == 3 * 3  # 3 token chunks x 3 vocabulary blocks, all kept for backward
    for got in (no_grad, without_grad_inputs):
        assert all(torch.equal(a, b.detach()) for a, b in zip(got, with_grad, strict=True))
