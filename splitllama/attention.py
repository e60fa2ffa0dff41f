"""THE attention dispatch point of the production model.

Backends (``select_backend``), in order of preference on CUDA:

1. ``flash_attn_4`` flash-attn 4 (package ``flash-attn-4``, ``flash_attn.cute``'s varlen
                    kernel: CuTe DSL, compiled at first use for each shape family); the
                    default on Hopper (SM90) when importable, for the head dims it was
                    checked at (``FLASH_ATTN_4_HEAD_DIMS``; a layer with another head dim
                    runs the next default instead); fp16/bf16, GQA without repeating K/V.
                    On an H200 it made the 2 + 8-layer RL actor step 1.01x faster on RL
                    documents (median 512 tokens) and 1.24x on 32k-token documents
                    (BENCHMARKS.md);
2. ``torch_varlen`` ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; GQA
                    without repeating K/V); the default on other CUDA devices;
3. ``flex``         FlexAttention with a document-causal block mask (CUDA, compiled);
4. ``sdpa``         plain ``scaled_dot_product_attention`` per document (any device and
                    dtype; the CPU path, float32 and float64).

``flash_attn`` (flash-attn 2's varlen kernel) is used only when forced: no machine this
project tests on can install flash-attn 2 (source-only), so it is never chosen by default
until its path has been run against the oracle (README: how to check it on your machine).
``flash_attn_4`` may also be forced on a CUDA device other than SM90 where it imports (for
the head dims of ``FLASH_ATTN_4_HEAD_DIMS`` only).
``SPLITLLAMA_ATTENTION_BACKEND`` forces one by name.

The choice, the document boundaries and the FlexAttention block mask are made ONCE per
batch (``plan_packed``; ``plan_padded``'s mask for padded batches), the rotary cos/sin once
per batch and stack, and handed to every layer as an ``AttentionPlan``: megatron passes
it as ``packed_seq_params``, unchanged, to its ``core_attention`` slot, which is
``SplitCoreAttention`` here. Nothing else in the package chooses a backend or applies the
rotary embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from splitllama import elementwise

try:  # flash-attn is optional: source-only, it cannot be installed on every machine.
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

BACKENDS = ("flash_attn_4", "flash_attn", "torch_varlen", "flex", "sdpa")
BACKEND_ENV = "SPLITLLAMA_ATTENTION_BACKEND"
_HALF = (torch.float16, torch.bfloat16)


# ---- backend selection -------------------------------------------------------------------
@functools.cache
def flash_attn_4_varlen():
    """flash-attn 4's varlen function, or None where the package does not import. Imported
    on first use, not with this module: it loads the CuTe DSL's compiler (seconds), which
    CPU runs and other backends never need."""
    try:
        from flash_attn.cute import flash_attn_varlen_func as fa4_varlen
    except ImportError:
        return None
    return fa4_varlen


# The compute capability flash-attn 4 is chosen by default on: Hopper, where its forward and
# backward were measured against the oracle and against torch's varlen kernel.
FLASH_ATTN_4_DEFAULT_CAPABILITY = (9, 0)
# Head dims at which flash-attn 4 (4.0.0b36, SM90) was measured equal to per-document
# attention in forward AND backward under the bf16 rule: the Llama-3 models' 128. At 8 (the
# tiny test models') its forward was right but dq, dk and dv were off by about their own
# scale (relative error ~1.0); other head dims were not measured.
FLASH_ATTN_4_HEAD_DIMS = (128,)


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends chosen by default on ``(device, dtype)``, in order of preference."""
    names = []
    if device.type == "cuda" and dtype in _HALF:
        if _cuda_capability(device) == FLASH_ATTN_4_DEFAULT_CAPABILITY and flash_attn_4_varlen() is not None:
            names.append("flash_attn_4")
        if varlen_attn is not None:
            names.append("torch_varlen")
    if device.type == "cuda":
        names.append("flex")
    names.append("sdpa")
    return names


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend used for ``(device, dtype)``: the env override, else the first available."""
    forced = os.environ.get(BACKEND_ENV)
    names = available_backends(device, dtype)
    if device.type == "cuda" and dtype in _HALF:
        # only when forced
        if "flash_attn_4" not in names and flash_attn_4_varlen() is not None:
            names.append("flash_attn_4")
        if flash_attn_varlen_func is not None:
            names.append("flash_attn")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not one of {BACKENDS}")
        if forced not in names:
            raise ValueError(
                f"{BACKEND_ENV}={forced!r} is not available for device={device.type}, "
                f"dtype={dtype}; available: {names}"
            )
        return forced
    return names[0]


@dataclass
class AttentionPlan(PackedSeqParams):
    """What every layer's attention needs of this batch, made once per batch (the rotary
    part once per stack: ``with_rotary``). Megatron hands it unchanged to its
    ``core_attention`` slot as ``packed_seq_params``; with ``qkv_format="sbhd"`` it leaves
    q/k/v as ``[S, B, heads, d]``. Megatron is given no rotary embedding:
    ``SplitCoreAttention`` rotates q and k by ``rotary_cos``/``rotary_sin``
    (``[S, B, 1, d]``, the layer's stack's angles at the batch's positions) with one compiled
    kernel (``elementwise.rotate``) instead of megatron's eager passes, which also formed
    cos/sin again in every layer."""

    qkv_format: str = "sbhd"
    rotary_cos: torch.Tensor | None = None
    rotary_sin: torch.Tensor | None = None

    def with_rotary(self, cos: torch.Tensor, sin: torch.Tensor) -> AttentionPlan:
        return dataclasses.replace(self, rotary_cos=cos, rotary_sin=sin)

    def attend(self, q_SBHD: torch.Tensor, k_SBGD: torch.Tensor, v_SBGD: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Rotated q ``[S, B, heads, d]``, k/v ``[S, B, groups, d]`` -> ``[S, B, heads * d]``."""
        raise NotImplementedError


@dataclass
class PackedAttention(AttentionPlan):
    """A packed batch (``[T, 1, ...]``): the backend, the document boundaries
    (``cu_seqlens_*``, and on the host for ``sdpa``) and the FlexAttention block mask
    (``flex``)."""

    backend: str = "sdpa"
    bounds: list[int] = field(default_factory=list)
    block_mask: Any = None
    # where flash-attn 4 was chosen by default: the backend of layers whose head dim is not
    # in FLASH_ATTN_4_HEAD_DIMS (None where it was forced: such a layer is refused)
    fallback: str | None = None

    def backend_at(self, head_dim: int) -> str:
        """The backend the layers of ``head_dim`` run: flash-attn 4 only at the head dims it
        was checked at."""
        if self.backend == "flash_attn_4" and head_dim not in FLASH_ATTN_4_HEAD_DIMS:
            if self.fallback is None:
                raise ValueError(f"{BACKEND_ENV}=flash_attn_4: flash-attn 4 was checked at head dims "
                                 f"{FLASH_ATTN_4_HEAD_DIMS} only, not {head_dim} (at 8 its backward is "
                                 "wrong); choose another backend")
            return self.fallback
        return self.backend

    def attend(self, q_SBHD, k_SBGD, v_SBGD, scale):
        backend = self.backend_at(q_SBHD.shape[-1])
        out = _BACKEND_FNS[backend](q_SBHD.squeeze(1), k_SBGD.squeeze(1), v_SBGD.squeeze(1), self, scale)
        return out.reshape(out.shape[0], 1, -1)


@dataclass
class PaddedAttention(AttentionPlan):
    """A padded batch: ``plan_padded``'s ``[B, 1, S, S]`` mask."""

    allowed_B1SS: torch.Tensor | None = None

    def attend(self, q_SBHD, k_SBGD, v_SBGD, scale):
        out = padded_attention(q_SBHD, k_SBGD, v_SBGD, self.allowed_B1SS, scale)
        return out.reshape(out.shape[0], out.shape[1], -1)


def select_backends(device: torch.device, dtype: torch.dtype) -> tuple[str, str | None]:
    """(backend, fallback) of a packed batch's plan: ``select_backend``'s choice and, where
    flash-attn 4 was chosen by default, the backend of layers at head dims it was not
    checked at (``PackedAttention.backend_at``)."""
    backend = select_backend(device, dtype)
    fallback = None
    if backend == "flash_attn_4" and not os.environ.get(BACKEND_ENV):
        fallback = available_backends(device, dtype)[1]
    return backend, fallback


def plan_packed(cu_seqlens: torch.Tensor, max_seqlen: int, tokens: int, dtype: torch.dtype) -> PackedAttention:
    """The packed batch's attention plan. ``cu_seqlens`` covers all ``tokens`` (SP
    padding tokens form a document of their own)."""
    device = cu_seqlens.device
    backend, fallback = select_backends(device, dtype)
    used = (backend, fallback)
    block_mask = _flex_block_mask(cu_seqlens, tokens, device) if "flex" in used else None
    # the per-document loop needs the boundaries on the host: the CPU path, no device sync
    bounds = cu_seqlens.tolist() if "sdpa" in used else []
    return PackedAttention(
        cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
        backend=backend, bounds=bounds, block_mask=block_mask, fallback=fallback,
    )


def plan_padded(mask_BS: torch.Tensor) -> torch.Tensor:
    """The padded batch's attention mask ``[B, 1, S, S]`` (True = may attend): a query
    attends to the valid keys of its own row at or before it. A query with no such key
    (a padded position before the row's first token) is given every key instead, so its
    softmax stays finite; its output sits at a padded position and never reaches a valid
    token, whose queries attend to valid keys only."""
    seq = mask_BS.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask_BS.device).tril()
    allowed_B1SS = causal[None, None] & mask_BS.bool()[:, None, None, :]
    return allowed_B1SS | ~allowed_B1SS.any(-1, keepdim=True)


# ---- backends: q [T, heads, d], k/v [T, groups, d] -> [T, heads, d] ----------------------
def _flash_attn(q, k, v, plan: PackedAttention, scale):
    cu, longest = plan.cu_seqlens_q, plan.max_seqlen_q
    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=True)


def _flash_attn_4(q, k, v, plan: PackedAttention, scale):
    cu, longest = plan.cu_seqlens_q, plan.max_seqlen_q
    # GQA: k/v keep their groups, the kernel maps query heads onto them; returns (out, lse)
    out, _ = flash_attn_4_varlen()(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                   max_seqlen_k=longest, softmax_scale=scale, causal=True)
    return out


@functools.cache
def _varlen_kwargs() -> dict:
    # torch >= 2.13 asks for enable_gqa; 2.11 accepts GQA without the flag.
    params = inspect.signature(varlen_attn).parameters
    return {"enable_gqa": True} if "enable_gqa" in params else {}


def _torch_varlen(q, k, v, plan: PackedAttention, scale):
    cu, longest = plan.cu_seqlens_q, plan.max_seqlen_q
    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), **_varlen_kwargs())


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex_block_mask(cu_seqlens: torch.Tensor, tokens: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    doc_T = torch.searchsorted(cu_seqlens[1:], torch.arange(tokens, device=device), right=True)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_T[q_idx] == doc_T[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, None, None, tokens, tokens, device=device)


def _flex(q, k, v, plan: PackedAttention, scale):
    # flex wants [batch, heads, tokens, d]; GQA is native.
    out = _compiled_flex()(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=plan.block_mask, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _sdpa(q, k, v, plan: PackedAttention, scale):
    # K/V repeated per query group: the fused CPU kernel does not take GQA shapes.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = plan.bounds
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale
        ).transpose(0, 1)
    # Tokens after the last document (SP padding) attend to nothing: zeros.
    out[bounds[-1]:] = 0
    return out


_BACKEND_FNS = {"flash_attn_4": _flash_attn_4, "flash_attn": _flash_attn, "torch_varlen": _torch_varlen, "flex": _flex, "sdpa": _sdpa}


def padded_attention(q_SBHD: torch.Tensor, k_SBGD: torch.Tensor, v_SBGD: torch.Tensor,
                     allowed_B1SS: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over padded rows ``[seq, batch, heads, d]`` under ``plan_padded``'s mask."""
    groups = q_SBHD.shape[2] // k_SBGD.shape[2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q_SBHD, k_SBGD, v_SBGD))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_B1SS, scale=scale)
    return out.permute(2, 0, 1, 3)


class SplitCoreAttention(MegatronModule):
    """Megatron's ``core_attention`` slot: rotary embedding of q and k, then packed (varlen)
    or padded causal attention, as the batch's ``AttentionPlan`` says.

    Packed input arrives as ``q [T, 1, heads, d]``, ``k/v [T, 1, groups, d]`` (the "sbhd"
    format, a batch of one, rather than megatron's "thd", in which megatron would restart
    positions per document instead of honouring the caller's position ids); padded input
    as ``[S, B, heads, d]``. The plan comes as ``packed_seq_params`` in both cases."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context_parallel_size > 1 is not supported by splitllama")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: AttentionPlan | None = None):
        plan = packed_seq_params
        assert isinstance(plan, AttentionPlan) and plan.rotary_cos is not None, \
            "the trunk hands every layer its stack's AttentionPlan, rotary included"
        query = elementwise.rotate(query, plan.rotary_cos, plan.rotary_sin)
        key = elementwise.rotate(key, plan.rotary_cos, plan.rotary_sin)
        return plan.attend(query, key, value, self.softmax_scale)
