"""Each packed attention kernel this machine has, called through the dispatch point
(``attention.plan_packed`` -> ``PackedAttention.attend``), against causal attention written
out per document: output and the gradients of q, k and v.

The documents are the product's edge cases: documents of one token (first, inside, last),
GQA with K/V in their groups (never repeated before the kernel), and the SP-padding tail
(the tokens that round the count up to a multiple of TP form a document of their own).
Empty documents never reach a kernel: the batch code drops them before planning.

On CUDA every varlen kernel that imports is checked in bf16 (flash-attn 4 at the head dims
the dispatch point gives it, ``attention.FLASH_ATTN_4_HEAD_DIMS``; flash-attn 2; torch's
varlen) under the bf16 rule (``verify.rules``: at most twice the error of the same
reference computed in bf16, plus two bf16 roundings of the scale) against the reference in
float32, at the 70B layer's heads and at the tiny test models'; on CPU the ``sdpa`` path
in float64 at 1e-9 relative (summation order only: ~1e-16). One process: the kernels see
no parallel state.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from splitllama import attention
from splitllama.verify.runner import agree
from splitllama.verify.rules import bf16_allowed_error
from tests.integration.conftest import DEVICE, world_size

# documents (in tokens) of the packed row, then the SP-padding tail; shorter on CPU, where
# float64 attention of 1,024 tokens alone takes seconds
DOCUMENTS = [1, 300, 1, 517, 1024, 7, 1] if DEVICE == "cuda" else [1, 30, 1, 57, 7, 1]
SP_TAIL = 3
# (query heads, K/V groups, head dim): the 70B layer's, then the tiny test models'
GPU_HEADS = [(64, 8, 128), (8, 2, 8)]
CPU_HEADS = [(8, 2, 8)]
CPU_REL = 1e-9


def kernels_here(head_dim: int) -> list[str]:
    """The varlen kernels that run here (CUDA, bf16) at ``head_dim``, or ``sdpa`` on CPU."""
    if DEVICE != "cuda":
        return ["sdpa"]
    names = []
    if attention.flash_attn_4_varlen() is not None and head_dim in attention.FLASH_ATTN_4_HEAD_DIMS:
        names.append("flash_attn_4")
    if attention.flash_attn_varlen_func is not None:
        names.append("flash_attn")
    if attention.varlen_attn is not None:
        names.append("torch_varlen")
    return names


def reference(q, k, v, bounds: list[int], scale: float):
    """Causal softmax attention per document, K/V repeated to the query heads, in the
    inputs' dtype: ``[T, heads, d]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, n, d]
        scores = (qs @ ks.transpose(1, 2)) * scale
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
        outs.append((scores.masked_fill(future, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def forward_backward(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype).reshape(out.shape))
    return [out.detach().reshape(grad_out.shape)] + [t.grad for t in leaves]


def backend_mismatches(backend: str, heads: int, groups: int, dim: int, seed: int = 0) -> list[str]:
    """The tensors (out, dq, dk, dv) on which ``backend`` breaks the rule, through the
    dispatch point with ``backend`` forced."""
    bounds = [0, *torch.tensor(DOCUMENTS + [SP_TAIL]).cumsum(0).tolist()]
    total, longest = bounds[-1], max(DOCUMENTS + [SP_TAIL])
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float64
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(total, heads, dim, generator=gen, device=DEVICE)
    k, v = (torch.randn(total, groups, dim, generator=gen, device=DEVICE) for _ in range(2))
    grad_out = torch.randn(total, heads, dim, generator=gen, device=DEVICE)
    scale = 1.0 / math.sqrt(dim)
    low = [t.to(dtype) for t in (q, k, v)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    previous = os.environ.get(attention.BACKEND_ENV)
    os.environ[attention.BACKEND_ENV] = backend
    try:
        plan = attention.plan_packed(cu, longest, total, dtype)
    finally:
        if previous is None:
            del os.environ[attention.BACKEND_ENV]
        else:
            os.environ[attention.BACKEND_ENV] = previous
    assert plan.backend == backend

    def through_plan(q_, k_, v_):  # [T, 1, heads, d] in, [T, 1, heads * d] out, as the layers call it
        return plan.attend(q_[:, None], k_[:, None], v_[:, None], scale)

    got = forward_backward(through_plan, low, grad_out)
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else torch.float64
    want = forward_backward(lambda *t: reference(*t, bounds, scale), [t.to(ref_dtype) for t in (q, k, v)], grad_out)
    if dtype == torch.bfloat16:
        low_ref = forward_backward(lambda *t: reference(*t, bounds, scale), low, grad_out)
    bad = []
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        g, w = got[i].to(ref_dtype), want[i]
        err, scale_ = float((g - w).abs().max()), float(w.abs().max())
        allowed = (bf16_allowed_error(float((low_ref[i].to(ref_dtype) - w).abs().max()), scale_)
                   if dtype == torch.bfloat16 else CPU_REL * scale_)
        if not (math.isfinite(err) and err <= allowed):
            bad.append(f"{backend} {heads}/{groups}x{dim} {name}: error {err:.3e} > allowed {allowed:.3e}")
    return bad


CASES = [(backend, *shape) for shape in (GPU_HEADS if DEVICE == "cuda" else CPU_HEADS)
         for backend in kernels_here(shape[2])]


def attention_backends_agree(layout=None) -> bool:
    """Every kernel here at every head shape (the planted-bug check; same on every rank)."""
    return agree(not any(backend_mismatches(*case) for case in CASES))


@pytest.mark.skipif(world_size() != 1, reason="one process: every rank would repeat the same work")
@pytest.mark.parametrize("backend,heads,groups,dim", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_kernel_matches_per_document_attention(backend, heads, groups, dim):
    assert not backend_mismatches(backend, heads, groups, dim)
