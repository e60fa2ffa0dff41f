"""The production model classes (names and constructors of the RL trainer's registry).

``ParallelCustomSplitLLamaModel``            trunk on padded ``[B, S]`` input
``ParallelCustomSplitLLamaModelRmPad``       trunk on packed tokens (padding removed)
``ParallelCustomSplitLLamaForCausalLM``      padded, TP(+SP): fp32 logits ``[B, S, V]``
``ParallelCustomSplitLLamaForCausalLMRmPad`` packed, TP(+SP): fp32 logits ``[B, S, V]``
``ParallelCustomSplitLLamaForValueRmPad``    packed critic: fp32 values ``[B, S]``

A trunk holds what its pipeline stage owns (``layout.StageLayout``); without pipeline
parallelism that is the whole model. Per forward, ONE ``batches.Batch`` record is built at
the edge (``prepare_batch``: inputs validated, padding removed or kept, the attention plan
made, what the head is asked for); the trunk runs on it, the head on the trunk's output and
the record's ``HeadRequest``, and ``batch.restore`` brings the result back to the caller's
layout. What the head computes is the head's (``heads.py``); the classes differ only in
the batch kind (``packed``), the head class (``head_class``) and, for the pipeline
classes, the stage they hold.
"""

from __future__ import annotations


import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.model_parallel_config import ModelParallelConfig

from splitllama.checkpoint import megatron_dist
from splitllama.checkpoint.assemble import fresh_value_head
from splitllama import weight_names as wn
from splitllama.batches import Batch, HeadRequest, prepare_batch
from splitllama.config import CustomSplitLlamaConfig
from splitllama.heads import LMHead, ValueHead
from splitllama.layers import Adapter, RMSNorm, RotaryPositions, decoder_stack
from splitllama.megatron_configs import schedule_config, stack_config
from splitllama.layout import ParallelLayout, StageLayout, padded_vocab_size, stage_layouts, validate_tensor_parallel
from splitllama.options import ModelOptions, model_options
from splitllama.checkpoint.sharding import mark_tensor_parallel, weight_specs


# ---- trunks ----------------------------------------------------------------------------
class ParallelCustomSplitLLamaModel(torch.nn.Module):
    """Trunk: embedding -> lower layers -> adapter -> upper layers -> final norm, or the
    part of it that ``stage`` (a ``layout.StageLayout``) holds. ``forward(batch)``: a padded
    ``batches.Batch`` (``[B, S]`` ids and positions, the padded attention mask) -> ``[S(/tp
    under SP), B, hidden]``."""

    def __init__(self, config: CustomSplitLlamaConfig, megatron_config: ModelParallelConfig,
                 stage: StageLayout, recompute: str = "none", padded_vocab_size: int | None = None):
        super().__init__()
        self.stage = stage
        self.sequence_parallel = megatron_config.sequence_parallel
        self.lower_config = stack_config(config.lower, megatron_config, config.num_lower, recompute)
        self.upper_config = stack_config(config.upper, megatron_config, config.num_upper, recompute)
        self.embed_tokens = self.lower = self.rotary_lower = None
        self.adapter = self.upper = self.rotary_upper = self.norm = None
        if stage.has_embedding:
            self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
                # padded rows are zero and never looked up (ids < vocab_size are validated)
                num_embeddings=padded_vocab_size or config.vocab_size, embedding_dim=config.h_lo,
                init_method=self.lower_config.init_method, config=self.lower_config,
                reduce_scatter_embeddings=self.sequence_parallel,
            )
        if len(stage.lower_layers):
            self.lower = decoder_stack(self.lower_config, len(stage.lower_layers))
            self.rotary_lower = RotaryPositions(config.lower, self.lower_config)
        if stage.has_adapter:
            self.adapter = Adapter(self.upper_config, config.h_lo, config.h_hi, config.mlp)
        if len(stage.upper_layers):
            # the model's last layer, when its backward follows its forward at once
            # (interleaved pipelines hold several micro-batches' activations there)
            interleaved = (megatron_config.virtual_pipeline_model_parallel_size or 1) > 1
            self.upper = decoder_stack(self.upper_config, len(stage.upper_layers),
                                       last_layer_kept=stage.has_head and not interleaved)
            self.rotary_upper = RotaryPositions(config.upper, self.upper_config)
        if stage.has_head:
            self.norm = RMSNorm(self.upper_config, config.h_hi, eps=config.rms_norm_eps)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """Pipeline stages after the first read their input from the previous stage."""
        self.input_tensor = input_tensor

    def forward(self, batch: Batch) -> torch.Tensor:
        if not isinstance(batch, Batch):
            raise ValueError(f"the trunk takes one splitllama Batch (the model's prepare_batch makes it: inputs "
                             f"validated, the attention plan made), got {type(batch).__name__}")
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(batch.input_ids)
            if not self.sequence_parallel:  # [B, S, h] -> [S, B, h]; SP already scattered
                hidden = hidden.transpose(0, 1).contiguous()
        else:
            if self.input_tensor is None:
                raise RuntimeError("pipeline stage without embedding got no input tensor: "
                                   "call set_input_tensor first")
            hidden = self.input_tensor
        dtype = self.lower_config.params_dtype
        # one plan per stack: the batch's attention plan with that stack's rotary cos/sin
        if self.lower is not None:
            lower_plan = batch.attention.with_rotary(*self.rotary_lower.cos_sin(batch.position_ids, dtype))
            hidden = self.lower(hidden, None, packed_seq_params=lower_plan)
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        if self.upper is not None:
            upper_plan = batch.attention.with_rotary(*self.rotary_upper.cos_sin(batch.position_ids, dtype))
            hidden = self.upper(hidden, None, packed_seq_params=upper_plan)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return hidden


class ParallelCustomSplitLLamaModelRmPad(ParallelCustomSplitLLamaModel):
    """Trunk on packed tokens: a packed ``batches.Batch`` (``[1, T]`` ids and positions, a
    batch of one, and its ``attention.PackedAttention``) -> ``[T(/tp), 1, h]``. The same
    layers as the padded trunk: only the batch differs."""


# ---- models with heads ---------------------------------------------------------------------
class ParallelCustomSplitLLamaForCausalLM(torch.nn.Module):
    """Padded TP(+SP) causal LM: ``forward(input_ids, attention_mask, position_ids=None)``
    -> fp32 logits ``[B, S, V]`` (zeros at padded positions).

    ``options``: a ``ModelOptions`` (activation recompute, the LM head's log-prob path,
    vocabulary padding), validated when it was made; default ``ModelOptions()``. ``stage``:
    the pipeline stage this object holds (``layout.StageLayout``, from the one placement
    function ``layout.stage_layouts``; the pipeline classes pass it; default the whole model).

    Configs it carries: ``hf_config`` (the split architecture, what checkpoints hold),
    ``megatron_config`` (the caller's parallel settings), ``config`` (megatron's schedule
    config, under the name megatron's pipeline schedules read; ``schedule_config``); each
    stack's megatron config is its trunk's (``model.lower_config`` / ``model.upper_config``:
    the head follows the upper stack and uses its config)."""

    trunk_class = ParallelCustomSplitLLamaModel
    packed = False  # the batch kind: padding kept (batches.PaddedBatch) or removed (PackedBatch)
    head_class = LMHead  # its ``kind`` names the checkpoint's head tensor (``head_kind``)
    # The last pipeline stage hands vocab-parallel logits to vocab-parallel losses.
    vocab_parallel_output = False

    def __init__(self, config: CustomSplitLlamaConfig, megatron_config: ModelParallelConfig, *,
                 stage: StageLayout | None = None, options: ModelOptions | None = None):
        super().__init__()
        config.check_split()
        self.hf_config = config
        self.megatron_config = megatron_config
        self.options = model_options(options).resolve(megatron_config)
        # the parallel sizes; where the pipeline stages cut is the stage's (layout.stage_layouts)
        self.parallel_layout = ParallelLayout.from_megatron(megatron_config)
        validate_tensor_parallel(config, self.parallel_layout.tp)
        if stage is None:
            if self.parallel_layout.pp != 1:
                raise ValueError(
                    f"{type(self).__name__} runs without pipeline parallelism; got "
                    f"pipeline_model_parallel_size={self.parallel_layout.pp}: use the *RmPadPP "
                    "classes (pipeline.build_chunks builds a rank's chunks; verl: splitllama.bridge)"
                )
            (stage,) = stage_layouts(config)
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, self.parallel_layout.tp,
                                                   self.options.make_vocab_size_divisible_by)
        self.model = self.trunk_class(config, megatron_config, stage, self.options.recompute, self.padded_vocab_size)
        self.stage = stage
        self.config = schedule_config(self.model.upper_config, megatron_config)
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask
        # what megatron's and verl's forward steps read: does this chunk embed, does it end
        # in the head (the pipeline classes are built with them; here they follow the stage)
        self.pre_process, self.post_process = stage.has_embedding, stage.has_head
        self.tp_multiple = self.parallel_layout.tp if self.parallel_layout.sp else 1
        if stage.has_head:
            self._init_head(config)
        # megatron's layers mark their TP-split weights only when they initialise them;
        # its gradient norm (clipping) and distributed optimizer read the marks
        mark_tensor_parallel(self, weight_specs(config, stage, self.head_kind, self.padded_vocab_size))

    @property
    def head_kind(self) -> wn.Head:
        """The head kind whose checkpoint names this model (or chunk) uses: every stage of a
        value model is a value-model stage, whether or not it holds the head."""
        return self.head_class.kind

    def _init_head(self, config: CustomSplitLlamaConfig) -> None:
        # "none": nothing is recomputed, the fused head's logits included
        self.lm_head = LMHead(self.model.upper_config, config.h_hi, config.vocab_size, self.padded_vocab_size,
                              self.options.log_probs, recompute_logits=self.options.recompute != "none")

    def _forward_head(self, hidden_SBH: torch.Tensor, request: HeadRequest) -> torch.Tensor:
        return self.lm_head(hidden_SBH, request)

    def prepare_batch(self, input_ids, attention_mask, position_ids=None, labels=None, *, temperature=None,
                      entropy: bool = True, packed_seq_params=None) -> Batch:
        """The batch record this model runs on (``batches.prepare_batch``): inputs validated,
        padding removed (packed classes) or kept, or already packed (``packed_seq_params``),
        the attention plan made, what the head is asked for. ``model.model(batch)`` runs the
        trunk on it and ``batch.restore`` brings outputs back to the caller's layout."""
        return prepare_batch(input_ids, attention_mask, position_ids, labels, temperature=temperature,
                             entropy=entropy, vocab_parallel=self.vocab_parallel_output, packed=self.packed,
                             multiple=self.tp_multiple, vocab=self.hf_config.vocab_size,
                             dtype=self.model.upper_config.params_dtype, device=next(self.parameters()).device,
                             packed_seq_params=packed_seq_params, embeds=self.stage.has_embedding)

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, packed_seq_params=None,
                labels=None, temperature=None, entropy: bool = True):
        """Outputs ``[B, S, ...]`` (zeros at padding): logits, or values for a value model;
        with ``labels`` (``[B, S]`` token ids, already shifted by the caller), ``[B, S, 2]``
        = (log-probability of the label, entropy; zeros when ``entropy=False``) of
        ``softmax(logits / temperature)`` (``temperature`` None: 1). A pipeline stage
        without the head returns its hidden states for the next stage.

        Already packed call (megatron's and verl's engine): ``forward(input_ids=[1, T],
        attention_mask=None, position_ids=None, packed_seq_params=PackedSeqParams(
        qkv_format="thd", ...))`` (``batches.ThdBatch``) returns vocab-parallel logits
        ``[1, T, Vp/tp]`` (padded vocabulary columns hold ``heads.PADDED_VOCAB_LOGIT``) or
        values ``[1, T, 1]`` at every token of the packed row, its padding included; with
        ``labels=[1, T]`` and ``temperature`` (verl's ``use_fused_kernels``), a
        ``batches.TokenLogProbs`` whose ``log_probs`` and ``entropy`` are ``[1, T]``, from
        the fused head."""
        batch = self.prepare_batch(input_ids, attention_mask, position_ids, labels, temperature=temperature,
                                   entropy=entropy, packed_seq_params=packed_seq_params)
        hidden = self.model(batch)
        if not self.stage.has_head:
            return hidden
        return batch.restore(self._forward_head(hidden, batch.request))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron dist-checkpointing description of this chunk's weights: split-checkpoint
        names with global layer indices, each rank's block from ``checkpoint/sharding.py``
        (``megatron_dist.sharded_state_dict``), so a checkpoint saved at one TP x PP x VPP
        layout loads at another."""
        return megatron_dist.sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def log_probs_and_entropy(self, input_ids, attention_mask, labels, position_ids=None,
                              entropy: bool = True, temperature=None):
        """Log-probabilities of ``labels`` (``[B, S]`` token ids, one per position, already
        shifted by the caller) and the entropy of the next-token distribution (None when
        ``entropy=False``) of ``softmax(logits / temperature)`` (``temperature`` None: 1),
        ``[B, S]`` float32 with zeros at padding. The vocabulary stays split over TP: this
        is what an RL actor needs, without the ``[B, S, V]`` logits."""
        if not self.stage.has_head:
            raise ValueError("log_probs_and_entropy runs on the pipeline stage that holds the head")
        if labels is None:
            raise ValueError("labels must be a [batch, seq] tensor of token ids, got None")
        out = self.forward(input_ids, attention_mask, position_ids, labels=labels, entropy=entropy,
                           temperature=temperature)
        return out[..., 0], (out[..., 1] if entropy else None)


class ParallelCustomSplitLLamaForCausalLMRmPad(ParallelCustomSplitLLamaForCausalLM):
    """Packed TP(+SP) causal LM: same call and result as the padded class, computed on
    the valid tokens only."""

    trunk_class = ParallelCustomSplitLLamaModelRmPad
    packed = True


class ParallelCustomSplitLLamaForValueRmPad(ParallelCustomSplitLLamaForCausalLMRmPad):
    """Packed critic: fp32 values ``[B, S]``. Only the head differs from the causal LM."""

    head_class = ValueHead

    def _init_head(self, config: CustomSplitLlamaConfig) -> None:
        # megatron's name for the head (GPTModel.output_layer): verl starts a critic from an
        # actor's distributed checkpoint by dropping the keys that contain "output_layer"
        # (verl/utils/model.py load_mcore_dist_weights), so the value head keeps what it is
        # built with: the one seeded fresh head (the same on every TP rank, the same as a
        # critic loaded from an actor's split checkpoint gets)
        self.output_layer = ValueHead(self.model.upper_config, config.h_hi)
        with torch.no_grad():
            self.output_layer.weight.copy_(fresh_value_head(config, seed=0))

    def _forward_head(self, hidden_SBH: torch.Tensor, request: HeadRequest) -> torch.Tensor:
        return self.output_layer(hidden_SBH, request)
