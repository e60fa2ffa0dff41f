"""The fused head (``logprobs.fused_log_probs_entropy``) equals the materialising path
(``vocab_parallel_log_probs`` / ``vocab_parallel_entropy`` of ``hidden @ weight.T``) in
float64: log-probs, entropy, and the gradients of hidden and of the weight shard, for
arbitrary per-token upstream gradients.

Here rather than in tests/unit because the op's TP exchange and the reference both run on
megatron's TP group, which this directory's session fixture already initialises (plain
``pytest``: tp1; ``torchrun --nproc-per-node 2``: tp2 and tp2_sp, where the hidden states
are sequence-sharded and gathered as the column-parallel head does). Every rank draws the
same examples (the ``ci`` Hypothesis profile is derandomized), so they stay in step.
The GPU tests at the real head shape run on one GPU only.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from megatron.core import parallel_state

from splitllama.logprobs import (
    fused_log_probs_entropy,
    lm_head_input,
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
)
from splitllama.distributed import setup_parallel
from splitllama.verify.runner import agree
from tests.integration.conftest import DEVICE, world_size
from tests.integration.layouts import LAYOUTS, layouts

HIDDEN = 8
VOCAB = 64  # 32 rows per rank at TP=2
# float64 on both paths: they differ only in summation order (tiles, blocks, all-gather
# merge vs whole-row reductions), ~1e-15 relative; 1e-9 of the outputs' scale leaves room
# for logits of magnitude 1e4 while any real defect is O(1e-3) or larger.
REL = 1e-9


def example(tokens: int, seed: int, scale: float = 1.0, labels: torch.Tensor | None = None):
    """Full (unsharded) float64 hidden [T, H], weight [V, H], labels [T], upstream grads."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64) * scale
    if labels is None:
        labels = torch.randint(0, VOCAB, (tokens,), generator=gen)
    g_lp = torch.randn(tokens, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(tokens, generator=gen, dtype=torch.float64)
    return hidden, weight, labels, g_lp, g_ent


def _run(head, layout, hidden, weight, labels, g_lp, g_ent):
    """Shard as the layout does, run ``head(hidden_TH, weight_local) -> (lp, ent|None)``
    and backward of ``sum(g_lp lp + g_ent ent)``; returns (lp, ent, grad of this rank's
    hidden input, grad of its weight shard)."""
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    mine = hidden.chunk(tp, 0)[rank] if layout.sp else hidden
    mine = mine.clone().to(DEVICE).requires_grad_(True)
    w_local = weight.chunk(tp, 0)[rank].clone().to(DEVICE).requires_grad_(True)
    lp, ent = head(lm_head_input(mine, layout.sp), w_local, labels.to(DEVICE))
    loss = (lp * g_lp.to(DEVICE)).sum()
    if ent is not None and g_ent is not None:
        loss = loss + (ent * g_ent.to(DEVICE)).sum()
    loss.backward()
    grad_h = mine.grad if mine.grad is not None else torch.zeros_like(mine)
    return lp.detach(), None if ent is None else ent.detach(), grad_h, w_local.grad


def materialising(entropy: bool, vocab_size: int | None = None):
    def head(hidden_TH, weight_VH, labels):
        logits = hidden_TH @ weight_VH.T
        return (vocab_parallel_log_probs(logits, labels, vocab_size),
                vocab_parallel_entropy(logits, vocab_size) if entropy else None)
    return head


def fused(entropy: bool, **options):
    def head(hidden_TH, weight_VH, labels):
        return fused_log_probs_entropy(hidden_TH, weight_VH, labels, entropy=entropy, **options)
    return head


def log_softmax_reference(layout, hidden, weight, labels, g_lp, g_ent, entropy: bool):
    """Autograd through ``log_softmax`` of the whole logits (every rank computes all of
    them), sliced to what this rank holds: the ground truth where the materialising path's
    ``lse - sum p l`` loses digits (logits of magnitude 1e4: it cancels to ~1e-8)."""
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    log_p = torch.log_softmax(hidden @ weight.T, -1)
    lp, ent = log_p.gather(1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy and g_ent is not None else 0)
    loss.backward()
    grad_h = hidden.grad.chunk(tp, 0)[rank] if layout.sp else hidden.grad
    return [t.to(DEVICE) if t is not None else None
            for t in (lp.detach(), ent.detach() if entropy else None, grad_h, weight.grad.chunk(tp, 0)[rank])]


def mismatches(layout, hidden, weight, labels, g_lp, g_ent, *, entropy=True, reference="materialising",
               **options) -> list[str]:
    """Names of the outputs/gradients where fused and the reference disagree (empty: equal)."""
    got = _run(fused(entropy, **options), layout, hidden, weight, labels, g_lp, g_ent)
    if reference == "materialising":
        want = _run(materialising(entropy, options.get("vocab_size")), layout, hidden, weight, labels, g_lp, g_ent)
    else:
        want = log_softmax_reference(layout, hidden, weight, labels, g_lp, g_ent, entropy)
    bad = []
    for name, a, b in zip(("log_probs", "entropy", "grad_hidden", "grad_weight"), got, want):
        if (a is None) != (b is None):
            bad.append(f"{name}: one is None")
        elif a is not None:
            if a.shape != b.shape or a.dtype != b.dtype:
                bad.append(f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
                continue
            scale = float(b.abs().max()) if b.numel() else 1.0
            err = float((a - b).abs().max()) if b.numel() else 0.0
            if not torch.isfinite(a).all() or err > REL * max(scale, 1.0):
                bad.append(f"{name}: max abs error {err:.3g} at scale {scale:.3g}")
    return bad


def fused_head_agrees(layout) -> bool:
    """One fixed example through several token chunks and vocab blocks, logits recomputed in
    backward and kept from forward (the check the planted bugs of the fused head must
    fail), verdict shared by all ranks."""
    setup_parallel(layout, DEVICE)
    hidden, weight, labels, g_lp, g_ent = example(14, seed=3)
    bad = [problem for recompute in (True, False)
           for problem in mismatches(layout, hidden, weight, labels, g_lp, g_ent, chunk_tokens=4, vocab_block=12,
                                     recompute_logits=recompute)]
    return agree(not bad)


def _assert_equal(layout, *args, **options):
    bad = mismatches(layout, *args, **options)
    assert agree(not bad), f"fused head differs from the materialising path at {layout}: {bad}"


TP_LAYOUTS = layouts("tp1", "tp2", "tp2_sp")
# backward recomputes each tile's logits, or reads the probabilities forward kept
RECOMPUTE_LOGITS = pytest.mark.parametrize("recompute_logits", [True, False], ids=["recompute", "kept"])


@pytest.mark.parametrize("layout", TP_LAYOUTS)
@RECOMPUTE_LOGITS
@pytest.mark.parametrize("entropy", [True, False], ids=["entropy", "log_prob_only"])
@pytest.mark.parametrize("tokens,chunk_tokens,vocab_block", [
    (12, 4, 16),   # chunks and blocks divide T and V/tp
    (14, 5, 7),    # neither divides: a partial last chunk and uneven blocks
    (2, 4, 64),    # one chunk smaller than chunk_tokens, one block per rank
    (0, 4, 16),    # no tokens at all
])
def test_matches_materialising_path(layout, recompute_logits, entropy, tokens, chunk_tokens, vocab_block):
    setup_parallel(layout, DEVICE)
    _assert_equal(layout, *example(tokens, seed=tokens), entropy=entropy,
                  chunk_tokens=chunk_tokens, vocab_block=vocab_block, recompute_logits=recompute_logits)


@pytest.mark.parametrize("layout", layouts("tp1", "tp2"))
def test_single_token(layout):
    setup_parallel(layout, DEVICE)
    _assert_equal(layout, *example(1, seed=1), chunk_tokens=4, vocab_block=16)


@pytest.mark.parametrize("layout", TP_LAYOUTS)
def test_labels_at_vocabulary_shard_and_block_edges(layout):
    setup_parallel(layout, DEVICE)
    half = VOCAB // 2
    # both ends of the vocabulary, of each TP=2 shard, and of blocks of 10 rows
    edges = torch.tensor([0, VOCAB - 1, half - 1, half, 9, 10, half + 9, half + 10, 1, VOCAB - 2])
    _assert_equal(layout, *example(len(edges), seed=5, labels=edges), chunk_tokens=3, vocab_block=10)


@pytest.mark.parametrize("layout", TP_LAYOUTS)
@RECOMPUTE_LOGITS
def test_logits_of_magnitude_1e4(layout, recompute_logits):
    """exp(1e4) overflows even in float64: the fused head must shift by the global max. The
    materialising path is exact in log-probs and gradients here but its entropy cancels
    (``lse - sum p l``, ~1e-8 off), so this one is judged against log_softmax."""
    setup_parallel(layout, DEVICE)
    hidden, weight, labels, g_lp, g_ent = example(10, seed=7, scale=3000.0)
    assert float((hidden @ weight.T).abs().max()) > 1e4
    _assert_equal(layout, hidden, weight, labels, g_lp, g_ent, chunk_tokens=4, vocab_block=16,
                  reference="log_softmax", recompute_logits=recompute_logits)


@pytest.mark.parametrize("layout", TP_LAYOUTS)
def test_random_shapes_and_upstream_gradients(layout):
    setup_parallel(layout, DEVICE)
    tp = layout.tp

    @given(
        rows=st.integers(0, 9),
        chunk_tokens=st.integers(1, 12),
        vocab_block=st.integers(1, 40),
        seed=st.integers(0, 2**31 - 1),
        grad_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
        use=st.sampled_from(["both", "log_prob_only_used", "entropy_off"]),
        recompute_logits=st.booleans(),
    )
    def check(rows, chunk_tokens, vocab_block, seed, grad_scale, use, recompute_logits):
        tokens = rows * tp if layout.sp else rows + 1
        hidden, weight, labels, g_lp, g_ent = example(tokens, seed)
        g_lp, g_ent = g_lp * grad_scale, None if use == "log_prob_only_used" else g_ent * grad_scale
        _assert_equal(layout, hidden, weight, labels, g_lp, g_ent, entropy=use != "entropy_off",
                      chunk_tokens=chunk_tokens, vocab_block=vocab_block, recompute_logits=recompute_logits)

    check()


@pytest.mark.parametrize("layout", TP_LAYOUTS)
@RECOMPUTE_LOGITS
@pytest.mark.parametrize("pad", [1, 7, VOCAB // 2 - 1], ids=["pad1", "pad7", "last_rank_one_real_row"])
def test_padded_vocabulary(layout, recompute_logits, pad):
    """The last ``pad`` rows of the (TP-split) weight are vocabulary padding, holding large
    values: fused and materialising paths leave them out alike, log-probs and entropy equal
    log_softmax over the real rows, and the padding rows get a zero gradient."""
    setup_parallel(layout, DEVICE)
    vocab = VOCAB - pad
    hidden, weight, labels, g_lp, g_ent = example(12, seed=pad)  # 12: splits over SP ranks
    labels = labels % vocab
    labels[0] = vocab - 1
    weight[vocab:] *= 50
    options = dict(chunk_tokens=4, vocab_block=10, vocab_size=vocab, recompute_logits=recompute_logits)
    _assert_equal(layout, hidden, weight, labels, g_lp, g_ent, **options)
    lp, ent, _, grad_w = _run(fused(True, **options), layout, hidden, weight, labels, g_lp, g_ent)
    log_p = torch.log_softmax(hidden @ weight[:vocab].T, -1).to(DEVICE)
    want = [log_p.gather(1, labels.to(DEVICE)[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)]
    rank = parallel_state.get_tensor_model_parallel_rank()
    padding_rows = grad_w[max(0, vocab - rank * grad_w.shape[0]):]
    ok = (all(float((a - b).abs().max()) <= REL * max(1.0, float(b.abs().max())) for a, b in zip((lp, ent), want, strict=True))
          and bool((padding_rows == 0).all()))
    assert agree(ok), f"padded vocabulary leaks at {layout}, pad={pad}"


def test_rejects_bad_arguments():
    setup_parallel(LAYOUTS["tp1"] if world_size() == 1 else LAYOUTS["tp2"], DEVICE)
    hidden, weight, labels, _, _ = example(4, seed=0)
    width = weight.shape[0] // parallel_state.get_tensor_model_parallel_world_size()
    w = weight[:width]
    for kwargs, bad in [
        ({"labels_T": labels.clone().fill_(VOCAB)}, "labels_T"),
        ({"labels_T": labels.clone().fill_(-1)}, "labels_T"),
        ({"labels_T": labels[:3]}, "labels_T"),
        ({"labels_T": labels.double()}, "labels_T"),
        ({"weight_VH": w[:, :3]}, "weight_VH"),
        ({"weight_VH": w.float()}, "weight_VH"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"vocab_block": 0}, "vocab_block"),
        ({"tp_group": "world"}, "tp_group"),
        ({"recompute_logits": "no"}, "recompute_logits"),
    ]:
        args = {"hidden_TH": hidden, "weight_VH": w, "labels_T": labels, **kwargs}
        with pytest.raises(ValueError, match=bad):
            fused_log_probs_entropy(args.pop("hidden_TH"), args.pop("weight_VH"), args.pop("labels_T"), **args)


# --- GPU, real head shape (Llama-3 vocabulary, 70B hidden), bf16, one GPU -------------------

REAL_VOCAB, REAL_HIDDEN = 128256, 8192
gpu_only = pytest.mark.skipif(DEVICE != "cuda" or world_size() != 1, reason="needs CUDA, one process")


def _real_head(tokens: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(tokens, REAL_HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
    # logits of std ~1.8, as a trained head's are O(1-10)
    weight = (torch.randn(REAL_VOCAB, REAL_HIDDEN, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, REAL_VOCAB, (tokens,), generator=gen, device="cuda")
    return hidden, weight, labels


@pytest.mark.gpu
@gpu_only
def test_gpu_accuracy_against_float32_gemm():
    """<= 1e-3 max-abs in log-prob and entropy at 16k tokens (the materialising bf16 path,
    whose logits are rounded to bf16 before the float32 math, is ~1.5e-2 off)."""
    hidden, weight, labels = _real_head(16384)
    with torch.no_grad():
        lp, ent = fused_log_probs_entropy(hidden, weight, labels, tp_group=None)
        weight32 = weight.float()
        lp_err = ent_err = 0.0
        for a in range(0, hidden.shape[0], 2048):
            log_p = torch.log_softmax((hidden[a:a + 2048].float() @ weight32.T).double(), -1)
            ref_lp = log_p.gather(1, labels[a:a + 2048, None])[:, 0]
            ref_ent = -(log_p.exp() * log_p).sum(-1)
            lp_err = max(lp_err, float((lp[a:a + 2048].double() - ref_lp).abs().max()))
            ent_err = max(ent_err, float((ent[a:a + 2048].double() - ref_ent).abs().max()))
            del log_p
    assert lp.dtype == ent.dtype == torch.float32
    assert lp_err <= 1e-3 and ent_err <= 1e-3, (lp_err, ent_err)


@pytest.mark.gpu
@gpu_only
def test_gpu_memory_bounded_by_tiles():
    """At 64k tokens the materialising path would hold ~230 GiB of logits and their float32
    copies; the fused head's peak above its inputs, outputs and the two gradients it returns
    stays <= 0.5 GiB (one float32 logits tile of 250 MiB, its bf16 gradient of 125 MiB, a
    chunk's float32 hidden-grad sum of 128 MiB: 0.49 GiB measured on an H200)."""
    hidden, weight, labels = _real_head(65536)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    g_lp, g_ent = torch.randn(2, hidden.shape[0], device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lp, ent = fused_log_probs_entropy(hidden, weight, labels, tp_group=None)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    left = sum(t.numel() * t.element_size() for t in (lp, ent, hidden.grad, weight.grad))
    assert peak - left <= 2**29, f"{(peak - left) / 2**30:.2f} GiB above inputs, outputs and gradients"


@pytest.mark.gpu
@gpu_only
def test_gpu_kept_probabilities_match_recompute_at_real_shape():
    """Full tiles at the real head shape run the compiled tile kernels: gradients from the
    kept bf16 probabilities equal those from recomputed float32 logits to bf16 precision,
    and the log-probs and entropy are the same numbers (forward does not change). Each kept
    probability is off by at most 2^-9 (2e-3) relative, so the gradients' relative gap in
    norm stays below that (CPU, bf16, 512 tokens x 4,000 rows: 6.7e-4 hidden, 3.2e-4
    weight); 1e-2 leaves room, and a wrong probability (unscaled, misplaced) is O(1)."""
    hidden, weight, labels = _real_head(8192)
    g_lp, g_ent = torch.randn(2, hidden.shape[0], device="cuda")
    results = []
    for recompute in (True, False):
        h = hidden.clone().requires_grad_(True)
        into = torch.zeros(weight.shape, device="cuda")
        lp, ent = fused_log_probs_entropy(h, weight.requires_grad_(True), labels, tp_group=None,
                                          grad_weight_into=into, recompute_logits=recompute)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        results.append((lp.detach(), ent.detach(), h.grad.float(), into))
    (lp_r, ent_r, gh_r, gw_r), (lp_k, ent_k, gh_k, gw_k) = results
    assert torch.equal(lp_r, lp_k) and torch.equal(ent_r, ent_k)
    for name, kept, recomputed in (("hidden", gh_k, gh_r), ("weight", gw_k, gw_r)):
        gap = float((kept - recomputed).norm() / recomputed.norm())
        assert gap <= 1e-2, f"grad of {name}: relative gap {gap:.2e}"


@pytest.mark.gpu
@gpu_only
@RECOMPUTE_LOGITS
def test_gpu_float32_weight_gradient_buffer(recompute_logits):
    """bf16 weight, gradient added into a float32 buffer (the float32-epilogue GEMM, or its
    fallback) against float64 autograd through log_softmax of the same bf16 values."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, generator=gen, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(1000, 64, generator=gen, device="cuda") * 0.2).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (300,), generator=gen, device="cuda")
    g_lp, g_ent = torch.randn(2, 300, generator=gen, device="cuda")
    buffer = torch.ones(1000, 64, device="cuda")
    lp, ent = fused_log_probs_entropy(hidden, weight.requires_grad_(True), labels, chunk_tokens=128,
                                      vocab_block=300, tp_group=None, grad_weight_into=buffer,
                                      recompute_logits=recompute_logits)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    assert weight.grad is None
    w64 = weight.detach().double().requires_grad_(True)
    log_p = torch.log_softmax(hidden.double() @ w64.T, -1)
    ((log_p.gather(1, labels[:, None])[:, 0] * g_lp).sum() - ((log_p.exp() * log_p).sum(-1) * g_ent).sum()).backward()
    # the logits' gradient is rounded to bf16 before the GEMM: ~2^-8 of the gradient's scale
    # (a kept bf16 probability adds its own 2^-9 relative rounding before that)
    err = float((buffer.double() - 1 - w64.grad).abs().max())
    assert err <= 2e-2 * float(w64.grad.abs().max()), err


# ---- under megatron's DistributedDataParallel --------------------------------------------
DDP_MICROBATCHES = 4
# main_grad against the float64 sum of the micro-batches' own float32 gradients (the op
# alone, each into a fresh float32 buffer): they differ only by the float32 additions of
# 4 micro-batch sums, at most 4 * 2^-24 (2.4e-7) of the largest partial sum; 2e-6 of
# max|sum| leaves room for partial sums above the total. A bf16 round trip of each
# micro-batch's gradient errs by up to 2^-9 (2e-3) of it.
MAIN_GRAD_REL = 2e-6


def fused_head_main_grad_error(layout) -> float:
    """The model's bf16 LM head (``heads.LMHead``) wrapped in megatron's DDP (float32
    ``main_grad``), labelled micro-batches through the fused log-prob path:
    max |main_grad - reference| / max |reference| (max over ranks), the reference being
    the float64 sum of each micro-batch's float32 gradient from the op alone. Also
    checks that ``weight.grad`` stays empty (nothing for DDP's hook to add a second time)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from splitllama.verify.tiny import tiny_split_config
    from splitllama.megatron_configs import megatron_config
    from splitllama.batches import HeadRequest
    from splitllama.heads import LMHead
    from splitllama.megatron_configs import stack_config

    setup_parallel(layout, DEVICE)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    bf16 = torch.bfloat16
    config = stack_config(tiny_split_config().upper, megatron_config(layout, bf16, DEVICE), 1)
    head = LMHead(config, HIDDEN, VOCAB).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen).chunk(tp, 0)[rank].to(bf16))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), head)
    ddp.zero_grad_buffer()
    reference = torch.zeros(head.weight.shape, dtype=torch.float64, device=DEVICE)
    for k in range(DDP_MICROBATCHES):
        tokens = 6 + 2 * k  # even: divisible by TP under SP
        hidden = torch.randn(tokens, 1, HIDDEN, generator=gen).to(bf16)
        labels = torch.randint(0, VOCAB, (tokens, 1), generator=gen)
        probe = torch.randn(tokens, 1, 2, generator=gen).to(DEVICE)
        mine = (hidden.chunk(tp, 0)[rank] if layout.sp else hidden).to(DEVICE)
        out = ddp(mine.clone().requires_grad_(True), HeadRequest(labels_SB=labels.to(DEVICE)))
        (out * probe).sum().backward()
        own = torch.zeros(head.weight.shape, dtype=torch.float32, device=DEVICE)
        full = lm_head_input(mine.clone().requires_grad_(True), layout.sp).reshape(tokens, HIDDEN)
        lp, ent = fused_log_probs_entropy(full, head.weight.detach(), labels.reshape(tokens).to(DEVICE),
                                          grad_weight_into=own)
        (torch.stack([lp, ent], -1).view(tokens, 1, 2) * probe).sum().backward()
        reference += own.double()
    if head.weight.grad is not None:
        return float("inf")
    err = (head.weight.main_grad.double() - reference).abs().max() / reference.abs().max()
    err = err.reshape(1).to(torch.float64)
    if world_size() > 1:
        torch.distributed.all_reduce(err, op=torch.distributed.ReduceOp.MAX)
    return float(err)


def fused_head_main_grad_agrees(layout) -> bool:
    error = fused_head_main_grad_error(layout)
    return error <= MAIN_GRAD_REL  # already the max over ranks


@pytest.mark.parametrize("layout", TP_LAYOUTS)
def test_weight_gradient_accumulates_into_float32_main_grad(layout):
    """Under megatron DDP a bf16 head's weight gradient goes straight into the float32
    ``main_grad`` over several micro-batches, never rounded to bf16 on the way."""
    error = fused_head_main_grad_error(layout)
    assert error <= MAIN_GRAD_REL, f"main_grad off by {error:.3e} of its scale (allowed {MAIN_GRAD_REL:.0e})"


@pytest.mark.parametrize("layout", layouts("tp1", "tp2"))
def test_vocab_parallel_functions_take_minus_inf_columns(layout):
    """Vocab-parallel logits whose last columns a caller masked with -inf (the last TP
    rank's, as padded columns would be): log-probs, entropy and the logits' gradient equal
    those of the remaining columns, never NaN (0 * -inf in sum p * logit)."""
    setup_parallel(layout, DEVICE)
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    full[:, 9:] = float("-inf")
    labels = torch.randint(0, 9, (5,), generator=gen)
    g_lp, g_ent = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    local = full.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    lp, ent = vocab_parallel_log_probs(local, labels), vocab_parallel_entropy(local)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()

    real = full[:, :9].clone().requires_grad_(True)
    log_p = torch.log_softmax(real, -1)
    ref_lp, ref_ent = log_p.gather(1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    ref_grad = torch.cat([real.grad, torch.zeros(5, 3, dtype=torch.float64)], -1).chunk(tp, dim=-1)[rank]
    # float64, summation order only differs
    ok = all(bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= 1e-10 * max(1.0, float(b.abs().max()))
             for a, b in ((lp, ref_lp), (ent, ref_ent), (local.grad, ref_grad)))
    assert agree(ok)
