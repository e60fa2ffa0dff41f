"""The batch: the model's one input, made once at the edge of every forward.

The caller hands ``[B, S]`` tensors (``input_ids``, ``attention_mask``, optional
``position_ids`` and ``labels``, and a ``temperature`` for log-probs), or an already packed
``[1, T]`` row with megatron's ``PackedSeqParams`` (verl's engine). ``prepare_batch``
validates them (types, dtypes, shapes, device, token id range, temperature: ValueErrors
naming the argument) and builds ONE ``Batch`` record: token ids and positions laid out as
the trunk runs on them, the attention plan (``attention.plan_packed`` / ``plan_padded``:
backend, document boundaries or mask, made once), and what the head is asked for
(``HeadRequest``: labels laid out like the trunk's tokens, temperature, entropy, whether
logits stay split over TP). The trunk takes the record
(``model.ParallelCustomSplitLLamaModel.forward(batch)``), the head takes the trunk's output
and the record's ``request`` (``heads.py``), and ``batch.restore`` brings the head's output
back to the caller's layout. Nothing here calls the model.

Kinds (subclasses of ``Batch``; they differ in layout and ``restore`` only):

``PaddedBatch``  padding kept: sequence rounded up to a multiple of TP under SP, an
                 explicit attention mask (``attention.plan_padded``);
``PackedBatch``  padding removed (unpad -> ``cu_seqlens`` -> varlen attention): one row of
                 ``T_pad`` tokens, the token count rounded up to a multiple of TP under SP;
``ThdBatch``     already packed ("thd": ``[1, T]`` tokens with the caller's ``cu_seqlens``
                 in megatron's ``PackedSeqParams``, as verl's engine hands it): no unpadding,
                 the given ``cu_seqlens`` validated instead, restored to ``[1, T, ...]``, or,
                 with labels, to ``TokenLogProbs`` (``.log_probs``, ``.entropy``: verl's
                 fused-kernel contract).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.core.packed_seq_params import PackedSeqParams

from splitllama.attention import AttentionPlan, PaddedAttention, plan_packed, plan_padded
from splitllama.parallel_sizes import round_up


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_input_shapes(input_ids, attention_mask, position_ids, labels=None) -> None:
    """Edge validation that needs no device sync: types, dtypes and shapes."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {_shape(input_ids)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    for name, value, dtypes in (
        ("attention_mask", attention_mask, (torch.bool, torch.int32, torch.int64, torch.uint8)),
        ("position_ids", position_ids, (torch.int32, torch.int64)),
        ("labels", labels, (torch.int32, torch.int64)),
    ):
        if value is None and name != "attention_mask":
            continue
        if not isinstance(value, torch.Tensor) or value.shape != input_ids.shape:
            raise ValueError(f"{name} must be a tensor of the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {_shape(value)}")
        if value.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
        if value.device != input_ids.device:
            raise ValueError(f"{name} is on {value.device} but input_ids on {input_ids.device}")


def _batch_stats(input_ids_BS, mask_BS, labels_BS) -> list[int]:
    """The batch's host-side numbers in ONE device sync: valid tokens, longest row,
    non-empty rows, and the range of token ids (and labels) at valid positions."""
    zero = input_ids_BS.new_zeros(1)
    lengths = mask_BS.sum(-1)
    stats = [lengths.sum(), torch.cat([lengths, zero]).max(), (lengths > 0).sum()]
    for ids in (input_ids_BS, labels_BS):
        if ids is not None:
            valid = torch.cat([torch.where(mask_BS, ids, 0).flatten(), zero])
            stats += [valid.min(), valid.max()]
    return [int(v) for v in torch.stack([s.to(torch.int64) for s in stats]).tolist()]


def _check_range(name: str, low: int, high: int, vocab: int) -> None:
    if low < 0 or high >= vocab:
        raise ValueError(f"{name} at valid positions must lie in [0, vocab_size={vocab}), got [{low}, {high}]")


def default_position_ids(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0."""
    return (attention_mask_BS.long().cumsum(-1) - 1).clamp(min=0)


def check_temperature(temperature, labels) -> float | None:
    """The temperature log-probs and entropy are computed at (``softmax(logits / T)``), as
    a float; None means 1. It needs labels: logits are returned unscaled (a caller that
    samples from them divides them itself, as verl does)."""
    if temperature is None:
        return None
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be one number (a uniform temperature), got a tensor of "
                             f"shape {tuple(temperature.shape)}")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if labels is None:
        raise ValueError("temperature scales log-probs and entropy: pass labels with it (logits are "
                         "returned unscaled)")
    return float(temperature)


def gather_tokens(x_BS: torch.Tensor, indices_T: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, ...]`` -> ``[tokens, ...]`` at ``indices_T``."""
    return x_BS.reshape(-1, *x_BS.shape[2:]).index_select(0, indices_T)


def scatter_tokens(x_T: torch.Tensor, indices_T: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``[tokens, ...]`` -> ``[batch, seq, ...]`` with zeros at padded positions."""
    out = x_T.new_zeros(batch * seq, *x_T.shape[1:])
    out = out.index_put((indices_T,), x_T)
    return out.reshape(batch, seq, *x_T.shape[1:])


@dataclass(frozen=True)
class HeadRequest:
    """What the head is asked for (``heads.py``). ``labels_SB``: the label of each token laid
    out like the trunk's output ``[S, B]`` (full sequence under SP): log-probs of the labels
    and entropy, or, when None, logits (values for a value head). ``temperature``: log-probs
    and entropy of ``softmax(logits / temperature)`` (None: 1). ``entropy``: whether entropy
    is asked for. ``vocab_parallel``: logits stay split over TP (``[.., Vp/tp]``, the last
    pipeline stage's and verl's contract) instead of gathered and sliced to the vocabulary."""

    labels_SB: torch.Tensor | None = None
    temperature: float | None = None
    entropy: bool = True
    vocab_parallel: bool = False


# The head's own outputs, gathered: logits [S, B, V] or values [S, B].
OUTPUTS = HeadRequest()


@dataclass(kw_only=True)
class Batch:
    """What one forward runs on, made once by ``prepare_batch`` and handed down unchanged:
    ``input_ids`` / ``position_ids`` the tokens in the trunk's layout (``[B, S]`` padded,
    ``[1, T]`` packed; ``input_ids`` None on pipeline stages without the embedding),
    ``attention`` the batch's attention plan (every layer's ``core_attention`` gets it),
    ``request`` what the head computes."""

    input_ids: torch.Tensor | None
    position_ids: torch.Tensor
    attention: AttentionPlan
    request: HeadRequest = OUTPUTS

    def restore(self, out):
        """The head's output ``[S, B, ...]`` back in the caller's layout."""
        raise NotImplementedError


@dataclass
class TokenLogProbs:
    """Log-probabilities of the labels and the entropy, ``[1, T]`` float32 each (the entropy
    zeros when not asked for): what verl reads from a fused-kernel forward
    (``.log_probs``, ``.entropy``)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor


@dataclass(kw_only=True)
class PackedBatch(Batch):
    """A padded batch with its padding removed: one packed row of ``T_pad`` tokens
    (``input_ids`` / ``position_ids`` ``[1, T_pad]``; labels ``[T_pad, 1]``, megatron's
    ``[seq, batch]`` with batch 1). ``T_pad >= 1`` is the valid-token count rounded up to
    ``multiple`` (TP under SP); the extra tokens form a document of their own, so no real
    token attends to them. ``indices_T``: where the valid tokens sit in the ``[batch, seq]``
    input."""

    indices_T: torch.Tensor
    num_valid: int
    batch: int
    seq: int

    def restore(self, out_T1X: torch.Tensor) -> torch.Tensor:
        """``[T_pad, 1, ...]`` -> ``[batch, seq, ...]``, zeros at padded positions."""
        return scatter_tokens(out_T1X[: self.num_valid, 0], self.indices_T, self.batch, self.seq)


def pack_batch(input_ids_BS, attention_mask_BS, position_ids_BS, labels_BS, *, multiple: int,
               vocab: int, dtype: torch.dtype, **asked) -> PackedBatch:
    mask_BS = attention_mask_BS.bool()
    batch, seq = input_ids_BS.shape
    num_valid, max_seqlen, docs, *ranges = _batch_stats(input_ids_BS, mask_BS, labels_BS)
    _check_range("input_ids", ranges[0], ranges[1], vocab)
    if labels_BS is not None:
        _check_range("labels", ranges[2], ranges[3], vocab)
    if position_ids_BS is None:
        position_ids_BS = default_position_ids(mask_BS)
    # Sizes known on the host, so neither selection syncs again.
    indices_T = torch.nonzero_static(mask_BS.flatten(), size=num_valid).flatten()
    lengths = mask_BS.sum(-1, dtype=torch.int32)
    # rows with no valid token are dropped: zero-length documents break some varlen kernels
    lengths = lengths[torch.nonzero_static(lengths, size=docs).flatten()]
    total = round_up(max(num_valid, 1), multiple)
    extra = total - num_valid
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    ids_T, pos_T = gather_tokens(input_ids_BS, indices_T), gather_tokens(position_ids_BS, indices_T)
    labels_T = None if labels_BS is None else gather_tokens(labels_BS, indices_T)
    if extra:
        ids_T, pos_T = F.pad(ids_T, (0, extra)), F.pad(pos_T, (0, extra))
        labels_T = None if labels_T is None else F.pad(labels_T, (0, extra))
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([total])])
        max_seqlen = max(max_seqlen, extra)
    attention = plan_packed(cu_seqlens, max_seqlen, total, dtype)
    request = HeadRequest(labels_SB=None if labels_T is None else labels_T[:, None], **asked)
    return PackedBatch(input_ids=ids_T[None], position_ids=pos_T[None], attention=attention, request=request,
                       indices_T=indices_T, num_valid=num_valid, batch=batch, seq=seq)


@dataclass(kw_only=True)
class PaddedBatch(Batch):
    """A padded batch (``input_ids`` / ``position_ids`` ``[B, S_pad]``), its sequence length
    rounded up to ``multiple`` (TP under SP); ``attention_mask_BS`` the caller's mask padded
    alike, ``seq`` the caller's sequence length."""

    attention_mask_BS: torch.Tensor
    seq: int

    def restore(self, out_SBX: torch.Tensor) -> torch.Tensor:
        """``[S_pad, B, ...]`` -> ``[B, S, ...]``, zeros at padded positions."""
        out = out_SBX[: self.seq].transpose(0, 1)
        mask = self.attention_mask_BS[:, : self.seq].reshape(*out.shape[:2], *([1] * (out.dim() - 2)))
        # where, not a product: exact zeros whatever the output holds there (a product with -inf is NaN)
        return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def pad_batch(input_ids_BS, attention_mask_BS, position_ids_BS, labels_BS, *, multiple: int,
              vocab: int, dtype: torch.dtype, **asked) -> PaddedBatch:
    mask_BS = attention_mask_BS.bool()
    _, _, _, *ranges = _batch_stats(input_ids_BS, mask_BS, labels_BS)
    _check_range("input_ids", ranges[0], ranges[1], vocab)
    if labels_BS is not None:
        _check_range("labels", ranges[2], ranges[3], vocab)
    seq = input_ids_BS.shape[1]
    if position_ids_BS is None:
        position_ids_BS = default_position_ids(mask_BS)
    pad = (0, round_up(seq, multiple) - seq)
    mask_BS = F.pad(mask_BS, pad)
    # Labels at padded positions may be anything (-100 is common); the head needs token ids
    # there too, and their outputs are zeroed by restore.
    labels_SB = None
    if labels_BS is not None:
        labels_SB = F.pad(torch.where(mask_BS[:, :seq], labels_BS, 0), pad).transpose(0, 1)
    return PaddedBatch(input_ids=F.pad(input_ids_BS, pad), position_ids=F.pad(position_ids_BS, pad),
                       attention=PaddedAttention(allowed_B1SS=plan_padded(mask_BS)),
                       request=HeadRequest(labels_SB=labels_SB, **asked), attention_mask_BS=mask_BS, seq=seq)


@dataclass(kw_only=True)
class ThdBatch(Batch):
    """An already packed batch in megatron's ``thd`` layout, as verl's Megatron engine
    hands it over: ``[1, T]`` token ids and ``PackedSeqParams`` whose (padded) ``cu_seqlens``
    cut the row into documents. Each document may end with padding tokens (verl pads every
    sequence to a multiple of TP) and may be empty (an empty row of the batch); positions
    restart at 0 in every document unless given. The row is returned as it came: the
    caller removes its padding. Labels (``[1, T]``, the next token of each position, as verl
    rolls them) ask for log-probs and entropy instead of logits."""

    def restore(self, out_T1X: torch.Tensor) -> torch.Tensor | TokenLogProbs:
        """``[T, 1, Vp/tp]`` logits -> ``[1, T, Vp/tp]``; ``[T, 1]`` values -> ``[1, T, 1]``;
        ``[T, 1, 2]`` scores (labels given) -> ``TokenLogProbs`` of ``[1, T]`` each."""
        out = out_T1X.transpose(0, 1)
        if self.request.labels_SB is not None:
            return TokenLogProbs(log_probs=out[..., 0], entropy=out[..., 1])
        return out if out.dim() == 3 else out[..., None]


def thd_batch(input_ids_1T, position_ids_1T, labels_1T, packed_seq_params: PackedSeqParams, *, embeds: bool,
              multiple: int, vocab: int, dtype: torch.dtype, device: torch.device, **asked) -> ThdBatch:
    """Validate a ``thd`` call and plan its attention. ``embeds``: this stage reads
    ``input_ids`` (other stages get the hidden states; verl then passes its unpacked ids,
    which are not looked at). ``multiple``: the token count SP needs (TP under SP, else 1).
    ``labels_1T``: the label of every token of the row, or None."""
    if not isinstance(packed_seq_params, PackedSeqParams) or packed_seq_params.qkv_format != "thd":
        raise ValueError("packed_seq_params must be a megatron PackedSeqParams with qkv_format='thd', got "
                         f"{getattr(packed_seq_params, 'qkv_format', type(packed_seq_params).__name__)!r}")
    cu = packed_seq_params.cu_seqlens_q_padded
    cu = packed_seq_params.cu_seqlens_q if cu is None else cu
    kv = packed_seq_params.cu_seqlens_kv_padded
    kv = packed_seq_params.cu_seqlens_kv if kv is None else kv
    if cu is None or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"packed_seq_params.cu_seqlens_q(_padded) must be a 1-d tensor [docs + 1], got {_shape(cu)}")
    if kv is not None and not torch.equal(kv.to(cu.device), cu):
        raise ValueError("packed_seq_params: cu_seqlens_kv must equal cu_seqlens_q (self-attention)")
    bounds = [int(b) for b in cu.tolist()]  # host sync: the plan needs the bounds (ids range: one more)
    total = bounds[-1]
    if bounds[0] != 0 or any(b > a for b, a in zip(bounds, bounds[1:])):
        raise ValueError(f"packed_seq_params.cu_seqlens_q must start at 0 and never decrease, got {bounds}")
    if total < 1:
        raise ValueError("packed_seq_params holds no token: cu_seqlens_q ends at 0")
    if total % multiple:
        raise ValueError(f"sequence parallelism needs the packed token count {total} to be a multiple of "
                         f"tensor_model_parallel_size={multiple}: pad each sequence to it (verl does)")
    if embeds:
        if not isinstance(input_ids_1T, torch.Tensor) or tuple(input_ids_1T.shape) != (1, total):
            raise ValueError(f"input_ids must be [1, {total}] (the packed row cu_seqlens_q describes), "
                             f"got {_shape(input_ids_1T)}")
        if input_ids_1T.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be int32 or int64, got {input_ids_1T.dtype}")
        if input_ids_1T.device != device:
            raise ValueError(f"input_ids is on {input_ids_1T.device} but the model on {device}")
        low, high = (int(v) for v in torch.stack([input_ids_1T.min(), input_ids_1T.max()]).tolist())
        _check_range("input_ids", low, high, vocab)
    else:
        input_ids_1T = None
    if labels_1T is not None:
        if not isinstance(labels_1T, torch.Tensor) or tuple(labels_1T.shape) != (1, total):
            raise ValueError(f"labels must be None or [1, {total}] (a label per token of the packed row), "
                             f"got {_shape(labels_1T)}")
        if labels_1T.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be int32 or int64, got {labels_1T.dtype}")
        labels_1T = labels_1T.to(device)
        low, high = (int(v) for v in torch.stack([labels_1T.min(), labels_1T.max()]).tolist())
        _check_range("labels", low, high, vocab)
    # zero-length documents (empty rows) are dropped: they break some varlen kernels
    kept = [bounds[0]] + [b for a, b in zip(bounds, bounds[1:]) if b > a]
    cu_seqlens = torch.tensor(kept, dtype=torch.int32, device=device)
    lengths = cu_seqlens.diff()
    if position_ids_1T is None:
        starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=total)
        position_ids_1T = (torch.arange(total, device=device) - starts)[None]
    elif not isinstance(position_ids_1T, torch.Tensor) or tuple(position_ids_1T.shape) != (1, total):
        raise ValueError(f"position_ids must be None or [1, {total}], got {_shape(position_ids_1T)}")
    max_seqlen = max(b - a for a, b in zip(kept, kept[1:]))
    return ThdBatch(input_ids=input_ids_1T, position_ids=position_ids_1T.to(device),
                    attention=plan_packed(cu_seqlens, max_seqlen, total, dtype),
                    request=HeadRequest(labels_SB=None if labels_1T is None else labels_1T.transpose(0, 1), **asked))


def prepare_batch(input_ids, attention_mask, position_ids=None, labels=None, *, temperature=None,
                  entropy: bool = True, vocab_parallel: bool = False, packed: bool, multiple: int, vocab: int,
                  dtype: torch.dtype, device: torch.device, packed_seq_params=None,
                  embeds: bool = True) -> Batch:
    """The one way a batch is made: validate the inputs, then pack (``packed``) or pad, or,
    given ``packed_seq_params``, take the already packed row as it is (``thd_batch``).
    ``labels`` / ``temperature`` / ``entropy``: what the head is asked for (log-probs of
    the labels and entropy at that temperature; logits or values without labels);
    ``vocab_parallel``: logits stay split over TP (always for thd calls). ``multiple``: the
    token (packed) or sequence (padded) count is rounded up to it (TP under SP, else 1);
    ``vocab``: ids and labels must lie in ``[0, vocab)``; ``dtype``: the compute dtype of the
    attention plan; ``device``: where the model's weights are; ``embeds``: whether this
    pipeline stage reads the token ids (thd only)."""
    temperature = check_temperature(temperature, labels)
    asked = dict(temperature=temperature, entropy=bool(entropy), vocab_parallel=vocab_parallel)
    if packed_seq_params is not None:
        if attention_mask is not None:
            raise ValueError("with packed_seq_params, attention_mask must be None (documents are given by "
                             "packed_seq_params.cu_seqlens_q)")
        asked["vocab_parallel"] = True
        return thd_batch(input_ids, position_ids, labels, packed_seq_params, embeds=embeds, multiple=multiple,
                         vocab=vocab, dtype=dtype, device=device, **asked)
    if attention_mask is None:
        raise ValueError("attention_mask is required (a [batch, seq] mask) unless the batch is already "
                         "packed and described by packed_seq_params")
    check_input_shapes(input_ids, attention_mask, position_ids, labels)
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model on {device}: move the "
                         "inputs to the model's device")
    prepare = pack_batch if packed else pad_batch
    return prepare(input_ids, attention_mask, position_ids, labels, multiple=multiple, vocab=vocab, dtype=dtype,
                   **asked)
