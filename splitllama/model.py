"""The production model classes (names and constructors of the RL trainer's registry).

``ParallelCustomSplitLLamaModel``            trunk on padded ``[B, S]`` input
``ParallelCustomSplitLLamaModelRmPad``       trunk on packed tokens (padding removed)
``ParallelCustomSplitLLamaForCausalLM``      padded, TP(+SP): fp32 logits ``[B, S, V]``
``ParallelCustomSplitLLamaForCausalLMRmPad`` packed, TP(+SP): fp32 logits ``[B, S, V]``
``ParallelCustomSplitLLamaForValueRmPad``    packed critic: fp32 values ``[B, S]``

A trunk holds what its pipeline stage owns (``layout.StageLayout``); without pipeline
parallelism that is the whole model. Per forward, ONE batch object is built (inputs
validated, padding removed or kept, the attention plan made) and handed to every layer:
the packed path removes padding itself (unpad -> cu_seqlens -> varlen attention), pads the
token count to a multiple of TP under SP, and restores ``[batch, seq, ...]`` with zeros at
padded positions. What the head computes is the head's (``heads.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from splitllama.attention import PackedAttention, gather_tokens, plan_packed, plan_padded, scatter_tokens
from splitllama.config import CustomSplitLlamaConfig
from splitllama.heads import LMHead, TokenScores, ValueHead, check_log_probs
from splitllama.layers import RECOMPUTE, Adapter, RMSNorm, RotaryPositions, decoder_stack, stack_config
from splitllama.layout import ParallelLayout, StageLayout, padded_vocab_size


# ---- inputs ------------------------------------------------------------------------------
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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class PackedBatch:
    """A padded batch with its padding removed: one packed row of ``T_pad`` tokens.

    ``T_pad >= 1`` is the valid-token count rounded up to ``multiple`` (TP under SP); the
    extra tokens form a document of their own, so no real token attends to them."""

    input_ids_1T: torch.Tensor
    position_ids_1T: torch.Tensor
    attention: PackedAttention
    labels_T1: torch.Tensor | None
    indices_T: torch.Tensor
    num_valid: int
    batch: int
    seq: int

    def hidden(self, trunk: ParallelCustomSplitLLamaModelRmPad) -> torch.Tensor:
        return trunk(self.input_ids_1T, self.position_ids_1T, self.attention)

    def restore(self, out_T1X: torch.Tensor) -> torch.Tensor:
        """``[T_pad, 1, ...]`` -> ``[batch, seq, ...]``, zeros at padded positions."""
        return scatter_tokens(out_T1X[: self.num_valid, 0], self.indices_T, self.batch, self.seq)


def pack_batch(input_ids_BS, attention_mask_BS, position_ids_BS, labels_BS, *, multiple: int,
               vocab: int, dtype: torch.dtype) -> PackedBatch:
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
    total = _round_up(max(num_valid, 1), multiple)
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
    return PackedBatch(ids_T[None], pos_T[None], attention, None if labels_T is None else labels_T[:, None],
                       indices_T, num_valid, batch, seq)


@dataclass
class PaddedBatch:
    """A padded batch, its sequence length rounded up to ``multiple`` (TP under SP)."""

    input_ids_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    allowed_B1SS: torch.Tensor
    labels_SB: torch.Tensor | None
    seq: int

    def hidden(self, trunk: ParallelCustomSplitLLamaModel) -> torch.Tensor:
        return trunk(self.input_ids_BS, self.position_ids_BS, self.allowed_B1SS)

    def restore(self, out_SBX: torch.Tensor) -> torch.Tensor:
        """``[S_pad, B, ...]`` -> ``[B, S, ...]``, zeros at padded positions."""
        out = out_SBX[: self.seq].transpose(0, 1)
        mask = self.attention_mask_BS[:, : self.seq].reshape(*out.shape[:2], *([1] * (out.dim() - 2)))
        # where, not a product: a product would turn a non-finite output into NaN at padding
        return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def pad_batch(input_ids_BS, attention_mask_BS, position_ids_BS, labels_BS, *, multiple: int,
              vocab: int, dtype: torch.dtype) -> PaddedBatch:
    mask_BS = attention_mask_BS.bool()
    _, _, _, *ranges = _batch_stats(input_ids_BS, mask_BS, labels_BS)
    _check_range("input_ids", ranges[0], ranges[1], vocab)
    if labels_BS is not None:
        _check_range("labels", ranges[2], ranges[3], vocab)
    seq = input_ids_BS.shape[1]
    if position_ids_BS is None:
        position_ids_BS = default_position_ids(mask_BS)
    pad = (0, _round_up(seq, multiple) - seq)
    mask_BS = F.pad(mask_BS, pad)
    # Labels at padded positions may be anything (-100 is common); the head needs token ids
    # there too, and their outputs are zeroed by restore.
    labels_SB = None
    if labels_BS is not None:
        labels_SB = F.pad(torch.where(mask_BS[:, :seq], labels_BS, 0), pad).transpose(0, 1)
    return PaddedBatch(F.pad(input_ids_BS, pad), F.pad(position_ids_BS, pad), mask_BS,
                       plan_padded(mask_BS), labels_SB, seq)


@dataclass
class ThdBatch:
    """An already packed batch in megatron's ``thd`` layout, as verl's Megatron engine
    hands it over: ``[1, T]`` token ids and ``PackedSeqParams`` whose (padded) ``cu_seqlens``
    cut the row into documents. Each document may end with padding tokens (verl pads every
    sequence to a multiple of TP) and may be empty (an empty row of the batch); positions
    restart at 0 in every document unless given. The row is returned as it came: the
    caller removes its padding."""

    input_ids_1T: torch.Tensor | None  # None on pipeline stages without the embedding
    position_ids_1T: torch.Tensor
    attention: PackedAttention

    def hidden(self, trunk: ParallelCustomSplitLLamaModelRmPad) -> torch.Tensor:
        return trunk(self.input_ids_1T, self.position_ids_1T, self.attention)

    def restore(self, out_T1X: torch.Tensor) -> torch.Tensor:
        """``[T, 1, V/tp]`` logits -> ``[1, T, V/tp]``; ``[T, 1]`` values -> ``[1, T, 1]``."""
        out = out_T1X.transpose(0, 1)
        return out if out.dim() == 3 else out[..., None]


def thd_batch(input_ids_1T, position_ids_1T, packed_seq_params: PackedSeqParams, *, embeds: bool,
              multiple: int, vocab: int, dtype: torch.dtype, device: torch.device) -> ThdBatch:
    """Validate a ``thd`` call and plan its attention. ``embeds``: this stage reads
    ``input_ids`` (other stages get the hidden states; verl then passes its unpacked ids,
    which are not looked at). ``multiple``: the token count SP needs (TP under SP, else 1)."""
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
    bounds = [int(b) for b in cu.tolist()]  # the one host sync of the plan
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
    return ThdBatch(input_ids_1T, position_ids_1T.to(device), plan_packed(cu_seqlens, max_seqlen, total, dtype))


# ---- trunks ----------------------------------------------------------------------------
class ParallelCustomSplitLLamaModel(torch.nn.Module):
    """Trunk: embedding -> lower layers -> adapter -> upper layers -> final norm, or the
    part of it that ``layout`` places on this pipeline stage. Input ``[B, S]`` ids and
    positions and ``attention.plan_padded``'s mask; output ``[S(/tp under SP), B, hidden]``."""

    def __init__(self, config: CustomSplitLlamaConfig, megatron_config: ModelParallelConfig,
                 layout: StageLayout, recompute: str = "none", padded_vocab_size: int | None = None):
        super().__init__()
        self.layout = layout
        self.sequence_parallel = megatron_config.sequence_parallel
        self.lower_config = stack_config(config.lower, megatron_config, config.num_lower, recompute)
        self.upper_config = stack_config(config.upper, megatron_config, config.num_upper, recompute)
        self.embed_tokens = self.lower = self.rotary_lower = None
        self.adapter = self.upper = self.rotary_upper = self.norm = None
        if layout.has_embedding:
            self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
                # padded rows are zero and never looked up (ids < vocab_size are validated)
                num_embeddings=padded_vocab_size or config.vocab_size, embedding_dim=config.h_lo,
                init_method=self.lower_config.init_method, config=self.lower_config,
                reduce_scatter_embeddings=self.sequence_parallel,
            )
        if len(layout.lower_layers):
            self.lower = decoder_stack(self.lower_config, len(layout.lower_layers))
            self.rotary_lower = RotaryPositions(config.lower, self.lower_config)
        if layout.has_adapter:
            self.adapter = Adapter(self.upper_config, config.h_lo, config.h_hi, config.mlp)
        if len(layout.upper_layers):
            self.upper = decoder_stack(self.upper_config, len(layout.upper_layers))
            self.rotary_upper = RotaryPositions(config.upper, self.upper_config)
        if layout.has_head:
            self.norm = RMSNorm(self.upper_config, config.h_hi, eps=config.rms_norm_eps)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """Pipeline stages after the first read their input from the previous stage."""
        self.input_tensor = input_tensor

    def forward(self, input_ids_BS, position_ids_BS, attention_mask=None,
                packed_seq_params: PackedAttention | None = None) -> torch.Tensor:
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(input_ids_BS)
            if not self.sequence_parallel:  # [B, S, h] -> [S, B, h]; SP already scattered
                hidden = hidden.transpose(0, 1).contiguous()
        else:
            if self.input_tensor is None:
                raise RuntimeError("pipeline stage without embedding got no input tensor: "
                                   "call set_input_tensor first")
            hidden = self.input_tensor
        dtype = self.lower_config.params_dtype
        if self.lower is not None:
            hidden = self.lower(hidden, attention_mask, rotary_pos_emb=self.rotary_lower(position_ids_BS, dtype),
                                packed_seq_params=packed_seq_params)
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        if self.upper is not None:
            hidden = self.upper(hidden, attention_mask, rotary_pos_emb=self.rotary_upper(position_ids_BS, dtype),
                                packed_seq_params=packed_seq_params)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return hidden


class ParallelCustomSplitLLamaModelRmPad(ParallelCustomSplitLLamaModel):
    """Trunk on packed tokens: ``input_ids_1T``/``position_ids_1T`` of shape ``[1, T]``
    (a batch of one) and the batch's ``attention.PackedAttention``; output ``[T(/tp), 1, h]``."""

    def forward(self, input_ids_1T, position_ids_1T, packed_seq_params: PackedAttention) -> torch.Tensor:
        return super().forward(input_ids_1T, position_ids_1T, None, packed_seq_params)


# ---- models with heads ---------------------------------------------------------------------
def schedule_config(upper_config: TransformerConfig, megatron_config: ModelParallelConfig) -> TransformerConfig:
    """The config megatron's pipeline schedules (and verl's engine: ``sequence_parallel``,
    ``fp8``) read as ``model.config``.

    Stages exchange tensors of different widths (h_lo before the adapter, h_hi after)
    and lengths (packed batches), so p2p must send shapes first: variable_seq_lengths.
    Set after construction, because TransformerConfig validation would otherwise ask for
    an all-to-all MoE dispatcher this dense model does not have."""
    config = dataclasses.replace(upper_config)
    config.pipeline_model_parallel_size = megatron_config.pipeline_model_parallel_size
    config.virtual_pipeline_model_parallel_size = megatron_config.virtual_pipeline_model_parallel_size
    config.microbatch_group_size_per_vp_stage = (megatron_config.microbatch_group_size_per_vp_stage
                                                 or megatron_config.pipeline_model_parallel_size)
    config.variable_seq_lengths = True
    config.pipeline_dtype = megatron_config.pipeline_dtype or megatron_config.params_dtype
    return config


def _recompute_of(megatron_config, recompute: str | None) -> str:
    """The recompute choice: the argument, else the caller's megatron TransformerConfig's."""
    if recompute is None:
        recompute = getattr(megatron_config, "recompute_granularity", None) or "none"
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not one of {sorted(RECOMPUTE)}")
    return recompute


class ParallelCustomSplitLLamaForCausalLM(torch.nn.Module):
    """Padded TP(+SP) causal LM: ``forward(input_ids, attention_mask, position_ids=None)``
    -> fp32 logits ``[B, S, V]`` (zeros at padded positions).

    Options: ``layers_per_stage`` (pipeline split, see ``layout.ParallelLayout``),
    ``recompute`` (``none | selective | full`` activation recompute; default: the
    ``recompute_granularity`` of a megatron ``TransformerConfig`` passed in, else none) and
    ``log_probs`` (``fused | materialise``: how the LM head computes log-probabilities and
    entropy, ``heads.LMHead``; default fused) and
    ``make_vocab_size_divisible_by`` (megatron's name): the embedding and LM head get
    ``padded_vocab_size`` rows, the vocabulary rounded up to a multiple of this times TP, so
    any vocabulary (e.g. 128,257 after adding special tokens) runs at any TP. Default 1:
    padding only where TP does not divide the vocabulary (checkpoints, shapes and results
    of a divisible vocabulary stay exactly as without padding; megatron's default 128 aligns
    GEMM shapes for speed at the cost of up to ``128 tp - 1`` extra rows). Padded rows are
    zero, never looked up, excluded from logits, log-probs, entropy and gradients, and never
    loaded or saved: checkpoints hold exactly ``vocab_size`` rows."""

    trunk_class = ParallelCustomSplitLLamaModel
    packed = False
    # The last pipeline stage hands vocab-parallel logits to vocab-parallel losses.
    vocab_parallel_output = False

    def __init__(self, config: CustomSplitLlamaConfig, megatron_config: ModelParallelConfig, *,
                 stage: StageLayout | None = None, layers_per_stage=None, recompute: str | None = None,
                 log_probs: str = "fused", make_vocab_size_divisible_by: int = 1):
        super().__init__()
        config.validate()
        self.hf_config = config
        self.megatron_config = megatron_config
        self.parallel_layout = ParallelLayout.from_megatron(megatron_config, layers_per_stage)
        stages = self.parallel_layout.validate(config)
        if stage is None:
            if self.parallel_layout.pp != 1:
                raise ValueError(
                    f"{type(self).__name__} runs without pipeline parallelism; got "
                    f"pipeline_model_parallel_size={self.parallel_layout.pp}: use the *RmPadPP "
                    "classes (ModelRegistry.load_model_cls)"
                )
            (stage,) = stages
        self.recompute = _recompute_of(megatron_config, recompute)
        self.log_probs = check_log_probs(log_probs)
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, self.parallel_layout.tp,
                                                   make_vocab_size_divisible_by)
        self.model = self.trunk_class(config, megatron_config, stage, self.recompute, self.padded_vocab_size)
        self.layout = stage
        self.head_config = self.model.upper_config
        self.config = schedule_config(self.model.upper_config, megatron_config)
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask
        # what megatron's and verl's forward steps read: does this chunk embed, does it end
        # in the head (the pipeline classes are built with them; here they follow the stage)
        self.pre_process, self.post_process = stage.has_embedding, stage.has_head
        self.tp_multiple = self.parallel_layout.tp if self.parallel_layout.sp else 1
        if stage.has_head:
            self._init_head(config)

    def _init_head(self, config: CustomSplitLlamaConfig) -> None:
        self.lm_head = LMHead(self.head_config, config.h_hi, config.vocab_size, self.padded_vocab_size,
                              self.log_probs)

    def _forward_head(self, hidden_SBH: torch.Tensor, scores: TokenScores | None = None,
                      vocab_parallel: bool | None = None) -> torch.Tensor:
        if vocab_parallel is None:
            vocab_parallel = self.vocab_parallel_output
        return self.lm_head(hidden_SBH, scores, vocab_parallel=vocab_parallel)

    def _batch(self, input_ids, attention_mask, position_ids, labels):
        check_input_shapes(input_ids, attention_mask, position_ids, labels)
        device = next(self.parameters()).device
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model on {device}: move the "
                             "inputs to the model's device")
        prepare = pack_batch if self.packed else pad_batch
        return prepare(input_ids, attention_mask, position_ids, labels, multiple=self.tp_multiple,
                       vocab=self.hf_config.vocab_size, dtype=self.head_config.params_dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, packed_seq_params=None,
                labels=None, entropy: bool = True):
        """Outputs ``[B, S, ...]`` (zeros at padding): logits, or values for a value model;
        with ``labels`` (``[B, S]`` token ids, already shifted by the caller), ``[B, S, 2]``
        = (log-probability of the label, entropy; zeros when ``entropy=False``). A pipeline
        stage without the head returns its hidden states for the next stage.

        Packed call (megatron's and verl's engine): ``forward(input_ids=[1, T],
        attention_mask=None, position_ids=None, packed_seq_params=PackedSeqParams(
        qkv_format="thd", ...))`` (``ThdBatch``) returns vocab-parallel logits ``[1, T, Vp/tp]``
        (padded vocabulary columns hold ``heads.PADDED_VOCAB_LOGIT``) or values ``[1, T, 1]``
        at every token of the packed row, its padding included."""
        if packed_seq_params is not None:
            return self._forward_thd(input_ids, attention_mask, position_ids, packed_seq_params, labels)
        if attention_mask is None:
            raise ValueError("attention_mask is required (a [batch, seq] mask) unless the batch is already "
                             "packed and described by packed_seq_params")
        batch = self._batch(input_ids, attention_mask, position_ids, labels)
        hidden = batch.hidden(self.model)
        if not self.layout.has_head:
            return hidden
        labels_SB = batch.labels_T1 if self.packed else batch.labels_SB
        scores = None if labels is None else TokenScores(labels_SB, entropy)
        return batch.restore(self._forward_head(hidden, scores))

    def _forward_thd(self, input_ids, attention_mask, position_ids, packed_seq_params, labels):
        if attention_mask is not None or labels is not None:
            raise ValueError("with packed_seq_params, attention_mask and labels must be None (documents are "
                             "given by packed_seq_params.cu_seqlens_q; log-probs come from the logits)")
        batch = thd_batch(input_ids, position_ids, packed_seq_params, embeds=self.layout.has_embedding,
                          multiple=self.tp_multiple, vocab=self.hf_config.vocab_size,
                          dtype=self.head_config.params_dtype, device=next(self.parameters()).device)
        hidden = batch.hidden(self.model)
        if not self.layout.has_head:
            return hidden
        return batch.restore(self._forward_head(hidden, vocab_parallel=True))

    def log_probs_and_entropy(self, input_ids, attention_mask, labels, position_ids=None,
                              entropy: bool = True):
        """Log-probabilities of ``labels`` (``[B, S]`` token ids, one per position, already
        shifted by the caller) and the entropy of the next-token distribution (None when
        ``entropy=False``), ``[B, S]`` float32 with zeros at padding. The vocabulary stays
        split over TP: this is what an RL actor needs, without the ``[B, S, V]`` logits."""
        if not self.layout.has_head:
            raise ValueError("log_probs_and_entropy runs on the pipeline stage that holds the head")
        if labels is None:
            raise ValueError("labels must be a [batch, seq] tensor of token ids, got None")
        out = self.forward(input_ids, attention_mask, position_ids, labels=labels, entropy=entropy)
        return out[..., 0], (out[..., 1] if entropy else None)


class ParallelCustomSplitLLamaForCausalLMRmPad(ParallelCustomSplitLLamaForCausalLM):
    """Packed TP(+SP) causal LM: same call and result as the padded class, computed on
    the valid tokens only."""

    trunk_class = ParallelCustomSplitLLamaModelRmPad
    packed = True


class ParallelCustomSplitLLamaForValueRmPad(ParallelCustomSplitLLamaForCausalLMRmPad):
    """Packed critic: fp32 values ``[B, S]``. Only the head differs from the causal LM."""

    def _init_head(self, config: CustomSplitLlamaConfig) -> None:
        self.value_head = ValueHead(self.head_config, config.h_hi)

    def _forward_head(self, hidden_SBH: torch.Tensor, scores: TokenScores | None = None,
                      vocab_parallel: bool | None = None) -> torch.Tensor:
        return self.value_head(hidden_SBH, scores)
