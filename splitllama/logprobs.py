"""Log-probabilities of given tokens and entropy from vocab-parallel logits.

Each TP rank holds logits for its ``V/tp`` slice of the vocabulary; the full vocabulary
is never gathered (an RL actor computes these for every token of every rollout). The
log-sum-exp subtracts the global max first, so logits of any magnitude are safe.
Computed in float32 at least (float64 for float64 logits), and differentiable.

Gradients assume the loss built from these outputs is the same on every TP rank (as an
RL loss is): the sum over ranks is an all-reduce forward, identity backward (megatron's
``reduce_from_tensor_model_parallel_region``).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from splitllama.layout import real_vocab_rows
from splitllama.parallel_sizes import ceil_div

logger = logging.getLogger(__name__)


def _global_max(local_max: torch.Tensor) -> torch.Tensor:
    # Only a shift for stability: log-sum-exp does not depend on it, so no gradient.
    local_max = local_max.detach().clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    return local_max


def valid_vocab_columns(width: int, vocab_size: int | None, device) -> torch.Tensor | None:
    """Which of this TP rank's ``width`` vocabulary columns are real (global index below
    ``vocab_size``): a ``[width]`` bool mask, or None when all are (no padding here)."""
    if vocab_size is None:
        return None
    real = len(real_vocab_rows(parallel_state.get_tensor_model_parallel_rank() * width, width, vocab_size))
    if real == width:
        return None
    return torch.arange(width, device=device) < real


def _logsumexp(logits_local: torch.Tensor, vocab_size: int | None = None):
    """(logits in compute dtype, global log-sum-exp over the real vocabulary, the logits
    with padded columns at -inf: their exp is exactly 0)."""
    logits = logits_local.to(torch.promote_types(logits_local.dtype, torch.float32))
    valid = valid_vocab_columns(logits.shape[-1], vocab_size, logits.device)
    real = logits if valid is None else torch.where(valid, logits, float("-inf"))
    shift = _global_max(real.max(dim=-1).values)
    sum_exp = reduce_from_tensor_model_parallel_region((real - shift[..., None]).exp().sum(dim=-1))
    return logits, sum_exp.log() + shift, real


def vocab_parallel_log_probs(logits_local: torch.Tensor, labels: torch.Tensor,
                             vocab_size: int | None = None) -> torch.Tensor:
    """``log softmax(logits)[label]`` for logits ``[..., V/tp]`` and labels ``[...]`` (global
    token ids) -> ``[...]``. ``vocab_size``: the real vocabulary when the columns are
    padded (``layout.padded_vocab_size``): columns at and above it are left out."""
    logits, logsumexp, _ = _logsumexp(logits_local, vocab_size)
    width = logits.shape[-1]
    local = labels - parallel_state.get_tensor_model_parallel_rank() * width
    mine = (local >= 0) & (local < width)
    picked = logits.gather(-1, local.clamp(0, width - 1)[..., None])[..., 0]
    # where, not a product: the clamped column may be a padded one, which a caller may
    # have masked with -inf (0 * -inf is NaN). Contiguous:
    # megatron's TP all-reduce reduces a contiguous copy and returns its input, so a strided
    # input (where keeps the gathered slice's strides) would come back unreduced.
    picked = torch.where(mine, picked, torch.zeros((), dtype=picked.dtype, device=picked.device)).contiguous()
    return reduce_from_tensor_model_parallel_region(picked) - logsumexp


class _VocabParallelEntropy(torch.autograd.Function):
    """Entropy with its analytic gradient, ``dH/dl_j = -p_j (l_j - sum_i p_i l_i)``.

    Composing it from differentiable pieces is wrong under TP: the log-sum-exp is
    replicated but every rank's slice of ``sum_i p_i l_i`` depends on it, so its gradient
    would need an all-reduce that an identity-backward reduction does not do."""

    @staticmethod
    def forward(ctx, logits_local: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
        logits, logsumexp, real = _logsumexp(logits_local, vocab_size)
        # exponent <= 0: no overflow; exactly 0 at padded columns, so neither the products
        # with the (finite) logits below nor the gradient involve them
        probs = (real - logsumexp[..., None]).exp()
        # Columns of probability 0 (padded ones, or -inf logits from a caller that masks
        # that way) contribute 0 to the mean logit and its gradient: 0 * -inf would be NaN.
        logits = torch.where(probs > 0, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        mean_logit = (probs * logits).sum(dim=-1)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(mean_logit, group=parallel_state.get_tensor_model_parallel_group())
        ctx.save_for_backward(probs, logits, mean_logit)
        ctx.input_dtype = logits_local.dtype
        return logsumexp - mean_logit

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor) -> torch.Tensor:
        probs, logits, mean_logit = ctx.saved_tensors
        grad = -probs * (logits - mean_logit[..., None]) * grad_entropy[..., None]
        return grad.to(ctx.input_dtype), None


def vocab_parallel_entropy(logits_local: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the whole vocabulary, ``[..., V/tp] -> [...]``;
    ``vocab_size`` as in ``vocab_parallel_log_probs``."""
    return _VocabParallelEntropy.apply(logits_local, vocab_size)


# ---------------------------------------------------------------------------------------
# Fused head: log-probs and entropy straight from the final hidden states, in tiles.
# ---------------------------------------------------------------------------------------

# Tokens per chunk. A [4096, hidden] x [hidden, V/tp] GEMM is large enough to run the tensor
# cores at full rate (measured on H200 at V/tp = 128k: 4,096-8,192 tokens was the sweet
# spot; smaller chunks lose GEMM efficiency, larger ones only grow the tile memory).
DEFAULT_CHUNK_TOKENS = 4096
# Vocabulary rows per tile: the rank's shard is cut into equal blocks of at most this many
# rows, so one tile of float32 logits stays at 4096 x 16384 x 4 B = 256 MiB whatever V/tp
# is (128256 splits into 8 blocks of 16032 at TP=1, 4 per rank at TP=2, 2 at TP=4). With the
# tile's bf16 gradient (125 MiB) and a chunk's float32 hidden-gradient sum (128 MiB at
# H = 8192) that is the head's whole transient: measured 0.49 GiB, against 0.98 GiB with
# 32768-row blocks, in the same time (1.00x; 8192-row blocks: 0.31 GiB but 1.03x; H200,
# BENCHMARKS.md).
DEFAULT_VOCAB_BLOCK = 16384
MEGATRON_TP_GROUP = "megatron"

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a float32 result for 16-bit inputs (never rounded to 16 bits), in
    the inputs' dtype otherwise. On CUDA the GEMM writes float32 directly
    (``out_dtype``); CPU has no such kernel, so 16-bit tiles are upcast there (tests only)."""
    if a.dtype not in _LOW_PRECISION:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _addmm_wide_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place; ``acc`` may be float32 for 16-bit ``a``, ``b`` (then the
    product is never rounded to 16 bits)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif not a.is_cuda:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    else:
        try:  # a float32 GEMM epilogue adding into acc, no temporary
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except (RuntimeError, TypeError):  # a torch without that kernel: one [rows, H] temporary
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))


def _tile_stats(logits: torch.Tensor, label_col: torch.Tensor, entropy: bool) -> torch.Tensor:
    """Per-token statistics of one tile of logits ``[C, B]`` -> ``[4, C]``: the tile's max
    ``m``, ``s = sum exp(l - m)``, ``t = sum exp(l - m) (l - m)`` (0 without entropy) and the
    label's logit (0 where the label's column ``label_col`` is outside the tile)."""
    width = logits.shape[1]
    m = logits.amax(dim=1)
    shifted = logits - m[:, None]
    e = shifted.exp()
    s = e.sum(dim=1)
    t = (e * shifted).sum(dim=1) if entropy else torch.zeros_like(s)
    inside = (label_col >= 0) & (label_col < width)
    picked = logits.gather(1, label_col.clamp(0, width - 1)[:, None])[:, 0]
    return torch.stack([m, s, t, torch.where(inside, picked, torch.zeros_like(picked))])


def _merge_stats(stats: torch.Tensor) -> torch.Tensor:
    """Merge ``[k, 4, C]`` statistics of k disjoint vocabulary pieces into ``[4, C]`` about
    the common max: ``s`` and ``t`` of piece r are rescaled by ``exp(m_r - M)``, and
    ``t`` gains ``s_r (m_r - M)`` because its shift moves from ``m_r`` to ``M``."""
    m, s, t, label = stats.unbind(1)
    top = m.amax(dim=0)
    scale = (m - top).exp()
    return torch.stack([top, (scale * s).sum(0), (scale * (t + s * (m - top))).sum(0), label.sum(0)])


def _gather_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """``[4, T]`` of this rank -> ``[tp, 4, T]`` of every rank: ONE collective per call."""
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return stats[None]
    # concatenated along dim 0 (gloo accepts only that shape), then split per rank
    out = stats.new_empty((world * stats.shape[0], *stats.shape[1:]))
    dist.all_gather_into_tensor(out, stats.contiguous(), group=group)
    return out.view(world, *stats.shape)


def _is_label(label_col: torch.Tensor, width: int) -> torch.Tensor:
    """``[C, B]``: True at each token's label column (nowhere when it is outside the tile)."""
    return torch.arange(width, device=label_col.device)[None, :] == label_col[:, None]


def _grad_of_tile(p: torch.Tensor, log_p: torch.Tensor, is_label: torch.Tensor, ent: torch.Tensor,
                  g_lp: torch.Tensor, g_ent: torch.Tensor, entropy: bool) -> torch.Tensor:
    """``g_lp (1[j == label] - p_j) - g_ent p_j (log p_j + H)`` for one tile ``[C, B]``, in
    the compute dtype (``l_j - sum_i p_i l_i = log p_j + H``, so only the log-sum-exp and
    the entropy are kept from the forward). Zero where ``p_j`` is 0, whatever ``log p_j``
    is (-inf where a kept probability underflowed)."""
    coef = g_lp[:, None] + g_ent[:, None] * (log_p + ent[:, None]) if entropy else g_lp[:, None]
    grad = torch.where(p > 0, -p * coef, torch.zeros_like(p))
    return grad + torch.where(is_label, g_lp[:, None], torch.zeros_like(grad))


def _tile_grad(logits: torch.Tensor, label_col: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
               g_lp: torch.Tensor, g_ent: torch.Tensor, entropy: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Gradient of the loss with respect to one tile of recomputed logits ``[C, B]``, in
    ``out_dtype``."""
    log_p = logits - lse[:, None]
    return _grad_of_tile(log_p.exp(), log_p, _is_label(label_col, logits.shape[1]), ent, g_lp, g_ent,
                         entropy).to(out_dtype)


def _tile_stats_kept(logits: torch.Tensor, label_col: torch.Tensor, entropy: bool,
                     keep_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``_tile_stats`` and the tile's ``exp(l - m)`` in ``keep_dtype``, what backward reads
    instead of recomputing the logits: values in [0, 1], so a 16-bit copy keeps each
    probability to the relative precision its 16-bit gradient is rounded to anyway."""
    stats = _tile_stats(logits, label_col, entropy)
    return stats, (logits - stats[0][:, None]).exp().to(keep_dtype)


def _tile_grad_kept(kept: torch.Tensor, label_col: torch.Tensor, m: torch.Tensor, lse: torch.Tensor,
                    ent: torch.Tensor, g_lp: torch.Tensor, g_ent: torch.Tensor, entropy: bool,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """``_tile_grad`` from the tile's kept ``exp(l - m)`` ``[C, B]`` and its max ``m``. A
    token's most likely column is kept as exactly 1, so the label gradient ``g_lp (1 - p)``
    of a confident token (p near 1, hence the max) loses nothing to the 16-bit copy."""
    shift = (m - lse)[:, None]
    e = kept.to(lse.dtype)
    return _grad_of_tile(e * shift.exp(), e.log() + shift, _is_label(label_col, kept.shape[1]), ent, g_lp,
                         g_ent, entropy).to(out_dtype)


class _Elementwise:
    """The element-wise tile functions: one fused ``torch.compile``d kernel per function on
    CUDA for tiles large enough to matter (a static compile for full tiles, one with
    dynamic shapes for the last partial chunk or block, so a new token count does not
    recompile), plain eager code on CPU, for float64 tiles and for small ones.

    Float64 is the reference precision, where speed is not the point; small tiles (the
    tiny test models) cost more to compile than they take to run. Both would otherwise spend
    dynamo's 8 recompiles per function on shapes and constants (seen in a GPU test session,
    which then failed the bf16 tests). Should a process still exhaust them, the tiles run
    eagerly from then on, with one warning: a training step never fails on a compile."""

    MIN_COMPILED_ELEMENTS = 1 << 22  # e.g. 1,024 tokens x 4,096 vocabulary rows

    def __init__(self):
        self._compiled: dict[tuple[str, bool], object] = {}
        self._eager_only = False

    def _get(self, fn, dynamic: bool):
        key = (fn.__name__, dynamic)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=dynamic, fullgraph=True)
        return self._compiled[key]

    def __call__(self, fn, full_tile: bool, logits: torch.Tensor, *args):
        if (self._eager_only or not logits.is_cuda or logits.dtype == torch.float64
                or logits.numel() < self.MIN_COMPILED_ELEMENTS):
            return fn(logits, *args)
        try:
            return self._get(fn, dynamic=not full_tile)(logits, *args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            logger.warning("fused log-prob head: torch.compile's recompile limit reached; "
                           "the element-wise tile work runs eagerly from now on")
            self._eager_only = True
            return fn(logits, *args)


_ELEMENTWISE = _Elementwise()


def _blocks(width: int, block: int) -> list[tuple[int, int]]:
    """Equal contiguous blocks of at most ``block`` rows covering ``range(width)``."""
    count = max(1, ceil_div(width, block))
    size = ceil_div(width, count)
    return [(start, min(start + size, width)) for start in range(0, width, size)]


def _tiling(tokens: int, width: int, chunk_tokens: int, vocab_block: int):
    """The tiles forward and backward both walk: token chunks ``(a, b)``, vocabulary blocks
    ``(v0, v1)`` of the rank's ``width`` real rows, and whether a tile has the full (first)
    tile's shape, which decides its compiled variant (static or dynamic shapes)."""
    chunks = [(a, min(a + chunk_tokens, tokens)) for a in range(0, tokens, chunk_tokens)]
    blocks = _blocks(width, vocab_block)
    full_rows = chunks[0][1] - chunks[0][0] if chunks else 0
    full_cols = blocks[0][1] - blocks[0][0]

    def is_full(a: int, b: int, v0: int, v1: int) -> bool:
        return b - a == full_rows and v1 - v0 == full_cols

    return chunks, blocks, is_full


def _label_columns(labels: torch.Tensor, first_row: int) -> torch.Tensor:
    """Column of each label in a tile whose first vocabulary row is ``first_row`` (global
    index); outside ``[0, tile width)`` when the label is elsewhere."""
    return labels - first_row


def _added_to_main_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight's gradient to return once it was added into ``grad_weight_into``.

    Megatron's DistributedDataParallel gives each parameter a ``grad_added_to_main_grad``
    flag and a backward hook that adds ``.grad`` into ``main_grad`` unless the flag is set.
    Its own layers with gradient-accumulation fusion set the flag and return an
    uninitialised placeholder, which the hook discards: no double counting, and the hook
    runs on the thread of the other parameters' hooks (its overlapped bucket all-reduce
    relies on that). Without that flag (no DDP) nothing is returned."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)


class _FusedLogProbsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, entropy, chunk_tokens, vocab_block, group, vocab_start,
                grad_weight_into, width, recompute_logits):
        # ``width``: this rank's real rows, a prefix of the shard (padding is at the end)
        tokens = hidden.shape[0]
        compute = torch.promote_types(weight.dtype, torch.float32)
        chunks, blocks, is_full = _tiling(tokens, width, chunk_tokens, vocab_block)
        local = torch.empty(4, tokens, dtype=compute, device=hidden.device)
        # without recompute: each tile's exp(l - m) [C, B] and its max m [C], in walking order
        kept: list[torch.Tensor] = []
        for a, b in chunks:
            h = hidden[a:b]
            per_block = []
            for v0, v1 in blocks:
                logits = _mm_wide(h, weight[v0:v1].t())
                label_col = _label_columns(labels[a:b], vocab_start + v0)
                if recompute_logits:
                    stats = _ELEMENTWISE(_tile_stats, is_full(a, b, v0, v1), logits, label_col, entropy)
                else:
                    stats, probs = _ELEMENTWISE(_tile_stats_kept, is_full(a, b, v0, v1), logits, label_col,
                                                entropy, weight.dtype)
                    kept += [probs, stats[0].clone()]
                per_block.append(stats)
                del logits
            local[:, a:b] = _merge_stats(torch.stack(per_block))
        # every rank holds the same tokens, so all of them skip the exchange together
        gathered = _gather_stats(local, group) if tokens else local[None]
        top, sum_exp, shifted_mean, label_logit = _merge_stats(gathered)
        lse = top + sum_exp.log()
        log_probs = label_logit - lse
        ent = sum_exp.log() - shifted_mean / sum_exp if entropy else None
        ctx.save_for_backward(hidden, weight, labels, lse, ent if entropy else lse.new_empty(0), *kept)
        ctx.options = (entropy, chunk_tokens, vocab_block, vocab_start, width, recompute_logits)
        # kept out of save_for_backward: it is written in place, as megatron keeps main_grad
        ctx.grad_weight_into = grad_weight_into
        # the parameter object itself, for megatron DDP's flag (see backward)
        ctx.weight = weight if grad_weight_into is not None else None
        return log_probs, ent

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, labels, lse, ent, *kept = ctx.saved_tensors
        entropy, chunk_tokens, vocab_block, vocab_start, width, recompute_logits = ctx.options
        nones = (None,) * 9
        use_entropy = entropy and grad_entropy is not None
        if grad_log_probs is None and not use_entropy:
            return (None, None, *nones)
        g_lp = grad_log_probs if grad_log_probs is not None else torch.zeros_like(lse)
        g_ent = grad_entropy if use_entropy else g_lp
        ent = ent if use_entropy else lse
        chunks, blocks, is_full = _tiling(hidden.shape[0], width, chunk_tokens, vocab_block)
        kept_tiles = iter(zip(kept[0::2], kept[1::2]))
        # Padded rows (at and above ``width``) get a zero gradient (or none added).
        # The weight's gradient is accumulated in place over the chunks, into the caller's
        # buffer or into the one returned (in the weight's dtype: each chunk's GEMM sums in
        # float32 and rounds once), so no second weight-sized buffer exists at any time.
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        into = ctx.grad_weight_into
        grad_weight = into if into is not None else torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for a, b in chunks:
            h = hidden[a:b]
            acc = None
            for v0, v1 in blocks:
                w = weight[v0:v1]
                label_col = _label_columns(labels[a:b], vocab_start + v0)
                per_token = (g_lp[a:b], g_ent[a:b], use_entropy, weight.dtype)
                if recompute_logits:
                    grad = _ELEMENTWISE(_tile_grad, is_full(a, b, v0, v1), _mm_wide(h, w.t()), label_col,
                                        lse[a:b], ent[a:b], *per_token)
                else:
                    probs, m = next(kept_tiles)
                    grad = _ELEMENTWISE(_tile_grad_kept, is_full(a, b, v0, v1), probs, label_col, m,
                                        lse[a:b], ent[a:b], *per_token)
                if grad_hidden is not None:
                    # summed over the blocks in float32 by the GEMM's epilogue (no
                    # [chunk_tokens, H] partial product beside the sum)
                    if acc is None:
                        acc = _mm_wide(grad, w)
                    else:
                        _addmm_wide_(acc, grad, w)
                if grad_weight is not None:
                    _addmm_wide_(grad_weight[v0:v1], grad.t(), h)
                del grad
            if grad_hidden is not None:
                grad_hidden[a:b] = acc
        if into is not None:
            grad_weight = _added_to_main_grad(ctx.weight) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, *nones


def fused_log_probs_entropy(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor, *,
                            entropy: bool = True, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                            vocab_block: int = DEFAULT_VOCAB_BLOCK, tp_group=MEGATRON_TP_GROUP,
                            vocab_start: int | None = None, grad_weight_into: torch.Tensor | None = None,
                            vocab_size: int | None = None, check_labels: bool = True,
                            recompute_logits: bool = True,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each label and entropy of each token's next-token distribution, straight
    from the LM head's input, without the ``[T, V/tp]`` logits ever existing at once.

    ``hidden_TH`` ``[T, H]``: the final hidden states (after the norm), every token of the
    sequence on every TP rank. Its gradient is this rank's PARTIAL sum (over its vocabulary
    shard), so the caller reduces it as a column-parallel layer's input is reduced:
    ``lm_head_input`` does that (megatron's ``copy_to_tensor_model_parallel_region`` without
    SP: all-reduce in backward; ``gather_from_sequence_parallel_region`` under SP: all-gather
    forward, reduce-scatter backward).
    ``weight_VH`` ``[V/tp, H]``: this rank's rows of the head weight, global rows
    ``[vocab_start, vocab_start + V/tp)``; ``vocab_start`` defaults to ``rank * V/tp``.
    ``labels_T`` ``[T]``: global token ids in ``[0, vocab_size)``.
    ``vocab_size``: the real vocabulary when the weight's rows are padded
    (``layout.padded_vocab_size``; default ``tp * V/tp``, no padding): rows at and above it
    are left out of every statistic and get no gradient.
    ``tp_group``: the tensor-parallel group (default: megatron's), or None when the weight is
    the whole vocabulary (no collectives, no megatron state needed).
    ``check_labels``: refuse labels outside the vocabulary (one host sync); the model classes
    pass False, having checked them in their one sync per batch.
    ``grad_weight_into``: a buffer of the weight's shape, float32 or the weight's dtype (e.g.
    megatron's ``weight.main_grad``), to which backward ADDS the weight's gradient in place
    (float32 sums of 16-bit products); the op then returns no gradient for the weight, or,
    for a parameter wrapped by megatron's DistributedDataParallel, sets its
    ``grad_added_to_main_grad`` and returns a placeholder DDP's hook discards (as megatron's
    own layers do with gradient-accumulation fusion).

    Returns ``(log_probs [T], entropy [T] or None)`` in float32 (float64 for float64 inputs),
    replicated over TP. Upstream gradients may be anything per token; they must be the same
    on every TP rank (the loss is computed redundantly on each, as an RL loss is). Gradients
    flow to ``hidden_TH`` and ``weight_VH``.

    Work: tokens in chunks of ``chunk_tokens``, the shard in ``vocab_block``-row blocks; each
    tile's logits come out of the GEMM in float32 (16-bit inputs are never rounded to 16-bit
    logits), are reduced to 4 numbers per token (max, sum-exp, sum-exp-weighted logit, label
    logit), and are dropped. The per-token numbers of all ranks are exchanged by ONE
    all-gather per call. ``recompute_logits`` (default): backward recomputes every tile's
    logits, four head-sized GEMMs in all (forward, recompute, grad of hidden, grad of
    weight) against the materialising path's three, paid for by element-wise work that reads
    each float32 tile once per pass. ``recompute_logits=False``: when a backward can follow
    (grad enabled, an input needing a gradient), forward keeps each tile's ``exp(l - m)``
    (``m`` the tile's max; values in [0, 1]) in the weight's dtype and backward reads it
    instead: three GEMMs, for ``T x V/tp`` kept values (2 B each in bf16:
    4.6 GB at 17,854 tokens and V/tp = 128,256). Backward then computes each probability
    from its 16-bit copy: relative error 2^-9 in bf16, the rounding its 16-bit gradient gets
    anyway (measured on CPU, bf16 inputs, float32 weight gradient against float64: relative
    error of the norm 1.89e-3 kept vs 1.84e-3 recomputed).

    Memory: saved for backward are references to the inputs plus the log-sum-exp and entropy
    (``[T]`` each), and without ``recompute_logits`` the kept tiles. Forward holds one
    float32 logits tile (``chunk_tokens x vocab_block x 4 B``, 250 MiB at the defaults and
    V/tp = 128,256) and its statistics; backward holds the returned gradients (``[T, H]``
    like hidden, ``[V/tp, H]`` like the weight, the latter accumulated in place in the
    weight's dtype; with ``grad_weight_into`` none, or under megatron DDP an uninitialised
    weight-shaped placeholder that DDP's hook drops at once), one float32 logits tile, its
    gradient in the weight's dtype (125 MiB) and a float32 ``[chunk_tokens, H]`` sum of the
    chunk's hidden gradient (128 MiB at H = 8192), to which each block's GEMM adds in place:
    0.49 GiB above inputs, outputs and gradients (and the kept tiles) at the defaults,
    H = 8192 and V/tp = 128,256, whatever T is (measured on an H200).
    """
    if hidden_TH.dim() != 2 or weight_VH.dim() != 2 or hidden_TH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"hidden_TH {tuple(hidden_TH.shape)} and weight_VH {tuple(weight_VH.shape)}: "
                         "expected [T, H] and [V/tp, H] with the same H")
    if labels_T.shape != hidden_TH.shape[:1] or labels_T.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels_T: expected integer token ids of shape [{hidden_TH.shape[0]}], "
                         f"got {labels_T.dtype} {tuple(labels_T.shape)}")
    if hidden_TH.dtype != weight_VH.dtype:
        raise ValueError(f"hidden_TH is {hidden_TH.dtype} but weight_VH is {weight_VH.dtype}: expected one dtype")
    for name, value in (("chunk_tokens", chunk_tokens), ("vocab_block", vocab_block)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
    if not isinstance(recompute_logits, bool):
        raise ValueError(f"recompute_logits={recompute_logits!r}: expected True (recompute each tile's logits "
                         "in backward) or False (keep each tile's probabilities from forward)")
    if isinstance(tp_group, str):
        if tp_group != MEGATRON_TP_GROUP:
            raise ValueError(f"tp_group={tp_group!r}: expected {MEGATRON_TP_GROUP!r}, a process group or None")
        tp_group = parallel_state.get_tensor_model_parallel_group()
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    width = weight_VH.shape[0]
    if vocab_start is None:
        vocab_start = rank * width
    vocab = world * width if vocab_size is None else vocab_size
    valid = len(real_vocab_rows(vocab_start, width, vocab))
    if not 0 < vocab <= world * width or valid == 0:
        raise ValueError(f"vocab_size={vocab_size}: expected a vocabulary in [1, {world * width}] that leaves "
                         f"this rank (rows [{vocab_start}, {vocab_start + width})) at least one real row")
    if check_labels and labels_T.numel():
        low, high = torch.stack([labels_T.min(), labels_T.max()]).tolist()
        if low < 0 or high >= vocab:
            raise ValueError(f"labels_T: token ids must lie in [0, {vocab}), got [{low}, {high}]")
    if grad_weight_into is not None and (
            grad_weight_into.shape != weight_VH.shape or grad_weight_into.device != weight_VH.device
            or grad_weight_into.dtype not in (weight_VH.dtype, torch.promote_types(weight_VH.dtype, torch.float32))):
        raise ValueError(f"grad_weight_into: expected {tuple(weight_VH.shape)} on {weight_VH.device} in "
                         f"{weight_VH.dtype} or float32, got {grad_weight_into.dtype}{tuple(grad_weight_into.shape)} "
                         f"on {grad_weight_into.device}")
    labels = labels_T.to(torch.int64)
    # Keeping tiles only pays when a backward will read them: a forward-only call (no_grad,
    # e.g. an RL trainer's old or reference log-probs) would hold T x V/tp values for nothing.
    backward_follows = torch.is_grad_enabled() and (hidden_TH.requires_grad or weight_VH.requires_grad)
    log_probs, ent = _FusedLogProbsEntropy.apply(hidden_TH, weight_VH, labels, entropy, chunk_tokens,
                                                 vocab_block, tp_group, vocab_start, grad_weight_into, valid,
                                                 recompute_logits or not backward_follows)
    return log_probs, ent


def lm_head_input(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The fused head's ``hidden_TH`` from the final norm's output, as megatron's
    column-parallel head prepares its input: under SP gather the sequence shards (backward:
    reduce-scatter of the partial gradients), otherwise mark the replicated input
    (backward: all-reduce over TP)."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    return copy_to_tensor_model_parallel_region(hidden)
