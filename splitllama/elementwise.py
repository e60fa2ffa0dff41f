"""The layers' element-wise math, each piece one compiled kernel each way on GPU.

* ``rms_norm``     Llama's RMSNorm (used by ``layers.RMSNorm``);
* ``swiglu``       ``silu(gate) * up`` of fc1's output, and ``swiglu_back`` (``layers.SwiGLU``);
* ``rotate``       rotary embedding of q or k by per-token cos/sin (``attention.SplitCoreAttention``).

Eager, each of these is several memory-bound passes over ``[tokens, width]``; compiled,
one pass each way.

Shape policy (``compiled_per_batch``): activations are ``[S, B, ...]``; S and B change
with every batch, the trailing dims (hidden, ffn, heads, head_dim) are fixed per stack.
torch.compile's default would compile the first call's shape, and when a second stack's
call brings a new width, turn that dim dynamic for both stacks, and the kernels compiled
then are slower: megatron's fused SwiGLU, one compiled function shared by both stacks,
ran at about a third of the bandwidth it reached before the second width arrived
(BENCHMARKS.md, 2026-12-03). Here S and B are dynamic from the first call (a new batch
length compiles nothing) and the trailing dims are static (one kernel per stack width).

On CPU (``cpu_support.use_cpu``) torch.compile is told to run everything eagerly: the same
functions, uncompiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def compiled_per_batch(fn: Callable) -> Callable:
    """``torch.compile(fn)`` under the shape policy above. ``fn.__wrapped__`` stays the
    eager function (the benchmarks time both)."""
    compiled = torch.compile(fn)

    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():  # inside a caller's compiled region: traced with it
            return fn(*args)
        for t in args:
            if isinstance(t, torch.Tensor) and t.dim() >= 3:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
                torch._dynamo.mark_static(t, list(range(2, t.dim())))
        return compiled(*args)

    return call


@compiled_per_batch
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's rounding: normalise in >= float32, round to the input dtype, then scale."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@compiled_per_batch
def swiglu(fc1: torch.Tensor) -> torch.Tensor:
    """``[S, B, 2 ffn]`` (gate first) -> ``[S, B, ffn]``."""
    gate, up = fc1.chunk(2, -1)
    return F.silu(gate) * up


@compiled_per_batch
def swiglu_back(grad_out: torch.Tensor, fc1: torch.Tensor) -> torch.Tensor:
    """d/d gate = g * up * silu'(gate), silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a)));
    d/d up = g * silu(gate); concatenated like fc1's output."""
    gate, up = fc1.chunk(2, -1)
    sig = torch.sigmoid(gate)
    return torch.cat((grad_out * up * sig * (1 + gate * (1 - sig)), grad_out * gate * sig), -1)


@compiled_per_batch
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [S, B, heads, d]`` by ``cos``/``sin`` ``[S, B, 1, d]``
    (Llama's half-split pairing: dim i rotates with dim i + d/2). The math runs in the
    wider of the two dtypes (float32 for half-precision activations) and rounds once."""
    wide = x.to(torch.promote_types(x.dtype, cos.dtype))
    first, second = wide.chunk(2, -1)
    return (wide * cos + torch.cat((-second, first), -1) * sin).to(x.dtype)
