"""The production model classes (names and constructors of the RL trainer's registry).

``ParallelCustomSplitLLamaModel``            trunk on padded ``[B, S]`` input
``ParallelCustomSplitLLamaModelRmPad``       trunk on packed tokens (padding removed)
``ParallelCustomSplitLLamaForCausalLM``      padded, TP(+SP): fp32 logits ``[B, S, V]``
``ParallelCustomSplitLLamaForCausalLMRmPad`` packed, TP(+SP): fp32 logits ``[B, S, V]``
``ParallelCustomSplitLLamaForValueRmPad``    packed critic: fp32 values ``[B, S]``

A trunk holds what its pipeline stage owns (``layout.StageLayout``); without pipeline
parallelism that is the whole model. The packed path removes padding itself
(unpad -> cu_seqlens -> varlen attention), pads the token count to a multiple of TP under
SP, and restores ``[batch, seq, ...]`` with zeros at padded positions.
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

from splitllama.attention import gather_tokens, scatter_tokens, unpad
from splitllama.config import CustomSplitLlamaConfig
from splitllama.heads import LMHead, ValueHead
from splitllama.layers import (
    Adapter,
    DecoderStack,
    RMSNorm,
    RotaryPositions,
    stack_config,
)
from splitllama.layout import StageLayout, stage_layouts, validate_tensor_parallel
from splitllama.logprobs import vocab_parallel_entropy, vocab_parallel_log_probs


# ---- inputs ------------------------------------------------------------------------------
def validate_inputs(config: CustomSplitLlamaConfig, input_ids, attention_mask, position_ids) -> None:
    """Edge validation of a forward call; a bad batch is refused, never half-computed."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {_shape(input_ids)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {_shape(attention_mask)}"
        )
    if position_ids is not None and (
        not isinstance(position_ids, torch.Tensor) or position_ids.shape != input_ids.shape
    ):
        raise ValueError(
            f"position_ids must be None or a tensor of the shape of input_ids "
            f"{tuple(input_ids.shape)}, got {_shape(position_ids)}"
        )
    valid_ids = input_ids[attention_mask.bool()]
    if valid_ids.numel() and (int(valid_ids.min()) < 0 or int(valid_ids.max()) >= config.vocab_size):
        raise ValueError(
            f"input_ids at valid positions must lie in [0, vocab_size={config.vocab_size}), got "
            f"[{int(valid_ids.min())}, {int(valid_ids.max())}]"
        )


def _validate_labels(config, input_ids, attention_mask, labels, position_ids) -> None:
    validate_inputs(config, input_ids, attention_mask, position_ids)
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels must be a tensor of the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {_shape(labels)}")


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def default_position_ids(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0 (SPEC 1)."""
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
    packed: PackedSeqParams
    indices_T: torch.Tensor
    num_valid: int
    batch: int
    seq: int

    def restore(self, out_T1X: torch.Tensor) -> torch.Tensor:
        """``[T_pad, 1, ...]`` -> ``[batch, seq, ...]``, zeros at padded positions."""
        return scatter_tokens(out_T1X[: self.num_valid, 0], self.indices_T, self.batch, self.seq)


def pack_batch(input_ids_BS, attention_mask_BS, position_ids_BS, multiple: int) -> PackedBatch:
    batch, seq = input_ids_BS.shape
    if position_ids_BS is None:
        position_ids_BS = default_position_ids(attention_mask_BS)
    indices_T, cu_seqlens, max_seqlen = unpad(attention_mask_BS)
    num_valid = indices_T.numel()
    total = _round_up(max(num_valid, 1), multiple)
    extra = total - num_valid
    ids_T = gather_tokens(input_ids_BS, indices_T)
    pos_T = gather_tokens(position_ids_BS, indices_T)
    if extra:
        ids_T = F.pad(ids_T, (0, extra))
        pos_T = F.pad(pos_T, (0, extra))
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([total])])
        max_seqlen = max(max_seqlen, extra)
    packed = PackedSeqParams(
        qkv_format="sbhd",  # see attention.SplitCoreAttention: per-token rotary
        cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
    )
    return PackedBatch(ids_T[None], pos_T[None], packed, indices_T, num_valid, batch, seq)


@dataclass
class PaddedBatch:
    """A padded batch, its sequence length rounded up to ``multiple`` (TP under SP)."""

    input_ids_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    seq: int

    def restore(self, out_SBX: torch.Tensor) -> torch.Tensor:
        """``[S_pad, B, ...]`` -> ``[B, S, ...]``, zeros at padded positions."""
        out = out_SBX[: self.seq].transpose(0, 1)
        mask = self.attention_mask_BS[:, : self.seq].reshape(*out.shape[:2], *([1] * (out.dim() - 2)))
        return out * mask.to(out.dtype)


def pad_batch(input_ids_BS, attention_mask_BS, position_ids_BS, multiple: int) -> PaddedBatch:
    seq = input_ids_BS.shape[1]
    if position_ids_BS is None:
        position_ids_BS = default_position_ids(attention_mask_BS)
    extra = _round_up(seq, multiple) - seq
    pad = (0, extra)
    return PaddedBatch(
        F.pad(input_ids_BS, pad), F.pad(position_ids_BS, pad),
        F.pad(attention_mask_BS.bool(), pad), seq,
    )


# ---- trunks ----------------------------------------------------------------------------
def full_layout(config: CustomSplitLlamaConfig) -> StageLayout:
    return stage_layouts(config, pp=1, vpp=1, layers_per_stage=[config.num_lower + config.num_upper])[0]


class ParallelCustomSplitLLamaModel(torch.nn.Module):
    """Trunk: embedding -> lower layers -> adapter -> upper layers -> final norm, or the
    part of it that ``layout`` places on this pipeline stage. Input ``[B, S]`` ids and
    positions; output ``[S(/tp under SP), B, hidden]``."""

    def __init__(self, config: CustomSplitLlamaConfig, megatron_config: ModelParallelConfig,
                 layout: StageLayout | None = None):
        super().__init__()
        config.validate()
        validate_tensor_parallel(config, megatron_config.tensor_model_parallel_size)
        self.layout = layout = layout or full_layout(config)
        self.sequence_parallel = megatron_config.sequence_parallel
        self.lower_config = stack_config(config.lower, megatron_config, config.num_lower)
        self.upper_config = stack_config(config.upper, megatron_config, config.num_upper)
        self.embed_tokens = self.lower = self.rotary_lower = None
        self.adapter = self.upper = self.rotary_upper = self.norm = None
        if layout.has_embedding:
            self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
                num_embeddings=config.vocab_size, embedding_dim=config.h_lo,
                init_method=self.lower_config.init_method, config=self.lower_config,
                reduce_scatter_embeddings=self.sequence_parallel,
            )
        if len(layout.lower_layers):
            self.lower = DecoderStack(self.lower_config, layout.lower_layers)
            self.rotary_lower = RotaryPositions(config.lower, self.lower_config)
        if layout.has_adapter:
            self.adapter = Adapter(self.upper_config, config.h_lo, config.h_hi, config.mlp)
        if len(layout.upper_layers):
            self.upper = DecoderStack(self.upper_config, layout.upper_layers)
            self.rotary_upper = RotaryPositions(config.upper, self.upper_config)
        if layout.has_head:
            self.norm = RMSNorm(self.upper_config, config.h_hi, eps=config.rms_norm_eps)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """Pipeline stages after the first read their input from the previous stage."""
        self.input_tensor = input_tensor

    def forward(self, input_ids_BS, position_ids_BS, attention_mask_BS=None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
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
            rotary = self.rotary_lower(position_ids_BS, dtype)
            hidden = self.lower(hidden, rotary, attention_mask_BS, packed_seq_params)
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        if self.upper is not None:
            rotary = self.rotary_upper(position_ids_BS, dtype)
            hidden = self.upper(hidden, rotary, attention_mask_BS, packed_seq_params)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return hidden


class ParallelCustomSplitLLamaModelRmPad(ParallelCustomSplitLLamaModel):
    """Trunk on packed tokens: ``input_ids_1T``/``position_ids_1T`` of shape ``[1, T]``
    (a batch of one) and ``cu_seqlens`` in ``packed_seq_params``; output ``[T(/tp), 1, h]``."""

    def forward(self, input_ids_1T, position_ids_1T, packed_seq_params: PackedSeqParams) -> torch.Tensor:
        return super().forward(input_ids_1T, position_ids_1T, None, packed_seq_params)


# ---- models with heads ---------------------------------------------------------------------
def schedule_config(trunk: ParallelCustomSplitLLamaModel, megatron_config: ModelParallelConfig) -> TransformerConfig:
    """The config megatron's pipeline schedules read as ``model.config``.

    Stages exchange tensors of different widths (h_lo before the adapter, h_hi after)
    and lengths (packed batches), so p2p must send shapes first: variable_seq_lengths.
    Set after construction, because TransformerConfig validation would otherwise ask for
    an all-to-all MoE dispatcher this dense model does not have."""
    config = dataclasses.replace(trunk.upper_config)
    config.pipeline_model_parallel_size = megatron_config.pipeline_model_parallel_size
    config.virtual_pipeline_model_parallel_size = megatron_config.virtual_pipeline_model_parallel_size
    config.variable_seq_lengths = True
    config.pipeline_dtype = megatron_config.pipeline_dtype or megatron_config.params_dtype
    return config


class ParallelCustomSplitLLamaForCausalLM(torch.nn.Module):
    """Padded TP(+SP) causal LM: ``forward(input_ids, attention_mask, position_ids=None)``
    -> fp32 logits ``[B, S, V]`` (zeros at padded positions)."""

    trunk_class = ParallelCustomSplitLLamaModel

    def __init__(self, config: CustomSplitLlamaConfig, megatron_config: ModelParallelConfig):
        super().__init__()
        if megatron_config.pipeline_model_parallel_size != 1:
            raise ValueError(
                f"{type(self).__name__} runs without pipeline parallelism; got "
                f"pipeline_model_parallel_size={megatron_config.pipeline_model_parallel_size}: "
                "use the *RmPadPP classes (ModelRegistry.load_model_cls)"
            )
        self._build(config, megatron_config, layout=None)

    def _build(self, config, megatron_config, layout: StageLayout | None) -> None:
        self.hf_config = config
        self.megatron_config = megatron_config
        self.model = self.trunk_class(config, megatron_config, layout)
        self.layout = self.model.layout
        self.head_config = self.model.upper_config
        self.config = schedule_config(self.model, megatron_config)
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask
        self.tp_multiple = (
            megatron_config.tensor_model_parallel_size if megatron_config.sequence_parallel else 1
        )
        if self.layout.has_head:
            self._init_head(config)

    def _init_head(self, config: CustomSplitLlamaConfig) -> None:
        self.lm_head = LMHead(self.head_config, config.h_hi, config.vocab_size)

    def _forward_head(self, hidden_SBH: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_SBH)

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        validate_inputs(self.hf_config, input_ids, attention_mask, position_ids)
        batch = pad_batch(input_ids, attention_mask, position_ids, self.tp_multiple)
        hidden = self.model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_BS)
        return batch.restore(self._forward_head(hidden))

    def log_probs_and_entropy(self, input_ids, attention_mask, labels, position_ids=None,
                              entropy: bool = True):
        """Log-probabilities of ``labels`` (``[B, S]`` token ids, one per position, already
        shifted by the caller) and the entropy of the next-token distribution (None when
        ``entropy=False``), ``[B, S]`` float32 with zeros at padding. The vocabulary stays
        split over TP: this is what an RL actor needs, without the ``[B, S, V]`` logits."""
        _validate_labels(self.hf_config, input_ids, attention_mask, labels, position_ids)
        batch = pad_batch(input_ids, attention_mask, position_ids, self.tp_multiple)
        hidden = self.model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_BS)
        labels_SB = F.pad(labels, (0, batch.input_ids_BS.shape[1] - labels.shape[1])).transpose(0, 1)
        return self._token_scores(hidden, labels_SB, batch, entropy)

    def _token_scores(self, hidden, labels, batch, entropy: bool):
        logits = self.lm_head.vocab_parallel_logits(hidden)
        log_probs = batch.restore(vocab_parallel_log_probs(logits, labels))
        return log_probs, batch.restore(vocab_parallel_entropy(logits)) if entropy else None


class ParallelCustomSplitLLamaForCausalLMRmPad(ParallelCustomSplitLLamaForCausalLM):
    """Packed TP(+SP) causal LM: same call and result as the padded class, computed on
    the valid tokens only."""

    trunk_class = ParallelCustomSplitLLamaModelRmPad

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        validate_inputs(self.hf_config, input_ids, attention_mask, position_ids)
        batch = pack_batch(input_ids, attention_mask, position_ids, self.tp_multiple)
        hidden = self.model(batch.input_ids_1T, batch.position_ids_1T, batch.packed)
        if not self.layout.has_head:  # pipeline stage: [T_pad(/tp), 1, h] for the next one
            return hidden
        return batch.restore(self._forward_head(hidden))

    def log_probs_and_entropy(self, input_ids, attention_mask, labels, position_ids=None,
                              entropy: bool = True):
        _validate_labels(self.hf_config, input_ids, attention_mask, labels, position_ids)
        batch = pack_batch(input_ids, attention_mask, position_ids, self.tp_multiple)
        hidden = self.model(batch.input_ids_1T, batch.position_ids_1T, batch.packed)
        labels_T = F.pad(gather_tokens(labels, batch.indices_T), (0, batch.input_ids_1T.shape[1] - batch.num_valid))
        return self._token_scores(hidden, labels_T[:, None], batch, entropy)


class ParallelCustomSplitLLamaForValueRmPad(ParallelCustomSplitLLamaForCausalLMRmPad):
    """Packed critic: fp32 values ``[B, S]``. Only the head differs from the causal LM."""

    def _init_head(self, config: CustomSplitLlamaConfig) -> None:
        self.value_head = ValueHead(self.head_config, config.h_hi)

    def _forward_head(self, hidden_SBH: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden_SBH)
