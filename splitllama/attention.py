"""THE attention dispatch point of the production model, and the packing helpers it needs.

Backends, in order of preference (``select_backend``):

1. ``flash_attn``   flash-attn's varlen kernel, when the package imports (CUDA, fp16/bf16);
2. ``torch_varlen`` ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; GQA
                    without repeating K/V);
3. ``flex``         FlexAttention with a document-causal block mask (CUDA, compiled);
4. ``sdpa``         plain ``scaled_dot_product_attention`` per document (any device and
                    dtype; the CPU path, float32 and float64).

``SPLITLLAMA_ATTENTION_BACKEND`` forces one by name. Nothing else in the package chooses
a backend: megatron's attention module calls ``SplitCoreAttention`` (the ``core_attention``
slot of the layer spec), which calls ``packed_attention`` or ``padded_attention`` here.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

try:  # flash-attn is optional: source-only, it cannot be installed on every machine.
    from flash_attn import flash_attn_varlen_func
    from flash_attn.bert_padding import pad_input as _fa_pad_input
    from flash_attn.bert_padding import unpad_input as _fa_unpad_input
except ImportError:
    flash_attn_varlen_func = None
    _fa_pad_input = _fa_unpad_input = None

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

BACKENDS = ("flash_attn", "torch_varlen", "flex", "sdpa")
BACKEND_ENV = "SPLITLLAMA_ATTENTION_BACKEND"
_HALF = (torch.float16, torch.bfloat16)


# ---- packing helpers ------------------------------------------------------------------
def unpad(mask_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Valid-token layout of a ``[batch, seq]`` mask.

    Returns ``indices_T`` (flat positions of valid tokens, row-major), ``cu_seqlens``
    (int32, ``[docs + 1]``, rows with no valid token dropped: zero-length documents break
    some varlen kernels) and ``max_seqlen``."""
    mask_BS = mask_BS.bool()
    if _fa_unpad_input is not None and mask_BS.is_cuda:
        ones = torch.ones(*mask_BS.shape, 1, device=mask_BS.device)
        _, indices_T, cu_seqlens, max_seqlen, *_ = _fa_unpad_input(ones, mask_BS)
        lengths = cu_seqlens.diff()
    else:
        indices_T = torch.nonzero(mask_BS.flatten(), as_tuple=False).flatten()
        lengths = mask_BS.sum(-1, dtype=torch.int32)
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
    lengths = lengths[lengths > 0]
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return indices_T, cu_seqlens, int(max_seqlen)


def gather_tokens(x_BS: torch.Tensor, indices_T: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, ...]`` -> ``[tokens, ...]`` at ``indices_T``."""
    return x_BS.reshape(-1, *x_BS.shape[2:]).index_select(0, indices_T)


def scatter_tokens(x_T: torch.Tensor, indices_T: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``[tokens, ...]`` -> ``[batch, seq, ...]`` with zeros at padded positions."""
    if _fa_pad_input is not None and x_T.is_cuda and x_T.dim() >= 2:
        return _fa_pad_input(x_T, indices_T, batch, seq)
    out = x_T.new_zeros(batch * seq, *x_T.shape[1:])
    out = out.index_put((indices_T,), x_T)
    return out.reshape(batch, seq, *x_T.shape[1:])


# ---- backend selection -------------------------------------------------------------------
def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = []
    if device.type == "cuda" and dtype in _HALF:
        if flash_attn_varlen_func is not None:
            names.append("flash_attn")
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


# ---- backends: q [T, heads, d], k/v [T, groups, d] -> [T, heads, d] ----------------------
def _flash_attn(q, k, v, cu_seqlens, max_seqlen, scale):
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True
    )


@functools.cache
def _varlen_kwargs() -> dict:
    # torch >= 2.13 asks for enable_gqa; 2.11 accepts GQA without the flag.
    params = inspect.signature(varlen_attn).parameters
    return {"enable_gqa": True} if "enable_gqa" in params else {}


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    return varlen_attn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        scale=scale, window_size=(-1, 0), **_varlen_kwargs(),
    )


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.flex_attention import create_block_mask

    tokens = q.shape[0]
    doc_T = torch.searchsorted(cu_seqlens[1:], torch.arange(tokens, device=q.device), right=True)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_T[q_idx] == doc_T[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, tokens, tokens, device=q.device)
    # flex wants [batch, heads, tokens, d]; GQA is native.
    out = _compiled_flex()(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=block_mask, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _sdpa(q, k, v, cu_seqlens, max_seqlen, scale):
    # K/V repeated per query group: the fused CPU kernel does not take GQA shapes.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale
        ).transpose(0, 1)
    # Tokens after the last document (SP padding) attend to nothing: zeros.
    out[bounds[-1]:] = 0
    return out


_BACKEND_FNS = {"flash_attn": _flash_attn, "torch_varlen": _torch_varlen, "flex": _flex, "sdpa": _sdpa}


def packed_attention(
    q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor,
    cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
) -> torch.Tensor:
    """Causal attention within each document of a packed sequence -> ``[T, heads, d]``.

    ``cu_seqlens`` must cover every token (padding tokens form a document of their own)."""
    backend = select_backend(q_THD.device, q_THD.dtype)
    return _BACKEND_FNS[backend](q_THD, k_TGD, v_TGD, cu_seqlens, max_seqlen, scale)


def padded_attention(
    q_SBHD: torch.Tensor, k_SBGD: torch.Tensor, v_SBGD: torch.Tensor,
    mask_BS: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Causal attention over padded rows ``[seq, batch, heads, d]``; a query attends to the
    valid keys of its own row at or before it. Queries with no such key get zeros."""
    groups = q_SBHD.shape[2] // k_SBGD.shape[2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q_SBHD, k_SBGD, v_SBGD))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    allowed_B1SS = causal[None, None] & mask_BS.bool()[:, None, None, :]
    has_key = allowed_B1SS.any(-1, keepdim=True)
    # Rows with no allowed key would softmax over nothing (NaN); let them see every key
    # and zero their output afterwards.
    allowed_B1SS = allowed_B1SS | ~has_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_B1SS, scale=scale)
    out = out * has_key
    return out.permute(2, 0, 1, 3)


class SplitCoreAttention(MegatronModule):
    """Megatron's ``core_attention`` slot: packed (varlen) or padded causal attention.

    Packed input arrives as ``q [T, 1, heads, d]``, ``k/v [T, 1, groups, d]`` with a
    ``PackedSeqParams(qkv_format="sbhd")``: the "sbhd" format (batch of one) makes megatron
    apply OUR per-token rotary embedding, so caller position_ids are honoured, instead of
    restarting positions per document as it does for "thd". Padded input arrives as
    ``[S, B, heads, d]`` with ``attention_mask`` = the ``[B, S]`` validity mask."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context_parallel_size > 1 is not supported by splitllama")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: PackedSeqParams | None = None):
        if packed_seq_params is not None:
            out = packed_attention(
                query.squeeze(1), key.squeeze(1), value.squeeze(1),
                packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q,
                self.softmax_scale,
            )
            return out.reshape(out.shape[0], 1, -1)
        out = padded_attention(query, key, value, attention_mask, self.softmax_scale)
        return out.reshape(out.shape[0], out.shape[1], -1)
