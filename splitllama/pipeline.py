"""Pipeline-parallel classes (registry names) and the schedule runner.

``ParallelCustomSplitLLamaForCausalLMRmPadPP`` and ``ParallelCustomSplitLLamaForValueRmPadPP``
are built per (pipeline rank, virtual chunk) with
``Cls(config, megatron_config, pre_process, post_process, share_embeddings_and_output_weights=False)``:
``layout.stage_layouts`` (the one placement function) decides which lower layers, adapter,
upper layers and head the chunk owns, so consecutive stages may exchange ``h_lo``- or
``h_hi``-wide tensors; ``build_chunks`` hands each chunk its stage from a
``ParallelLayout`` (which owns the split: an even one unless ``layers_per_stage`` says
otherwise). Every stage gets the same call and builds the same batch record from it
(``batches.prepare_batch``: packed from the mask, or the caller's thd row and
``cu_seqlens``); stages other than the first read hidden states given by
``set_input_tensor``. Stages other than the last return hidden states
``[T_pad(/tp), 1, h]``; the last returns vocab-parallel fp32 logits ``[B, S, Vp/tp]``
(CausalLM; padded vocabulary columns hold a large finite negative, see ``heads.LMHead``) or
values ``[B, S]``, or, when called with ``labels``, ``[B, S, 2]`` log-probabilities and
entropy (CausalLM; ``batches.TokenLogProbs`` for a thd call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.pipeline_parallel import get_forward_backward_func

from splitllama.config import CustomSplitLlamaConfig
from splitllama.cpu_support import cpu_enabled, cpu_schedule_context
from splitllama.layout import ParallelLayout, StageLayout, stage_layout
from splitllama.model import (
    ParallelCustomSplitLLamaForCausalLMRmPad,
    ParallelCustomSplitLLamaForValueRmPad,
)
from splitllama.options import ModelOptions, model_options


class PipelineStageMixin:
    """Constructor and ``set_input_tensor`` of a pipeline stage (one virtual chunk): it
    takes the stage's layout (``stage``, as ``build_chunks`` passes it) or places an even
    split itself, then runs the model class's own constructor for it."""

    vocab_parallel_output = True
    # megatron's attribute, read by finalize_model_grads across pipeline stages: the
    # embedding (lower checkpoint) and the LM head (upper checkpoint) are never tied
    share_embeddings_and_output_weights = False

    def __init__(self, config: CustomSplitLlamaConfig, megatron_config: ModelParallelConfig,
                 pre_process: bool, post_process: bool,
                 share_embeddings_and_output_weights: bool = False, *, vp_stage: int | None = None,
                 options: ModelOptions | None = None, stage: StageLayout | None = None):
        if share_embeddings_and_output_weights:
            raise ValueError(
                "share_embeddings_and_output_weights must be False: the embedding comes from "
                "the lower checkpoint and the LM head from the upper one"
            )
        pp = megatron_config.pipeline_model_parallel_size
        vpp = megatron_config.virtual_pipeline_model_parallel_size
        if vp_stage is None:
            vp_stage = stage.chunk if stage is not None else (
                (parallel_state.get_virtual_pipeline_model_parallel_rank() or 0) if vpp else 0)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        if stage is None:
            stage = stage_layout(config, pp, vpp, pp_rank, vp_stage)
        elif (stage.pp_rank, stage.chunk) != (pp_rank, vp_stage):
            raise ValueError(f"stage is pipeline rank {stage.pp_rank}, chunk {stage.chunk}, but this process is "
                             f"pipeline rank {pp_rank}, chunk (vp_stage) {vp_stage}")
        if (pre_process, post_process) != (stage.has_embedding, stage.has_head):
            raise ValueError(
                f"pre_process={pre_process}, post_process={post_process} disagree with the stage "
                f"layout of pipeline rank {stage.pp_rank}, chunk {stage.chunk}: it "
                f"{'holds' if stage.has_embedding else 'does not hold'} the embedding and "
                f"{'holds' if stage.has_head else 'does not hold'} the head"
            )
        super().__init__(config, megatron_config, stage=stage, options=model_options(options))
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage if vpp else None

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedules pass a list holding one tensor (or None on stage 0)."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, f"one input tensor per stage, got {len(input_tensor)}"
            input_tensor = input_tensor[0]
        self.model.set_input_tensor(input_tensor)


class ParallelCustomSplitLLamaForCausalLMRmPadPP(PipelineStageMixin, ParallelCustomSplitLLamaForCausalLMRmPad):
    """Pipeline stage of the causal LM; the last stage returns vocab-parallel logits
    ``[B, S, V/tp]`` (or, given ``labels``, log-probabilities and entropy)."""


class ParallelCustomSplitLLamaForValueRmPadPP(PipelineStageMixin, ParallelCustomSplitLLamaForValueRmPad):
    """Pipeline stage of the value model; the last stage returns values ``[B, S]``."""


def build_chunks(cls: type, config: CustomSplitLlamaConfig, megatron_config: ModelParallelConfig,
                 options: ModelOptions | None = None, layout: ParallelLayout | None = None) -> list[torch.nn.Module]:
    """All model chunks of this pipeline rank (one per virtual stage), as megatron's
    interleaved schedule expects them, each built with ``options``. ``layout``: where the
    pipeline stages cut (its ``layers_per_stage``); its sizes must be megatron's. Default:
    megatron's sizes with an even split."""
    sizes = ParallelLayout.from_megatron(megatron_config)
    layout = layout or sizes
    if (layout.tp, layout.sp, layout.pp, layout.vpp) != (sizes.tp, sizes.sp, sizes.pp, sizes.vpp):
        raise ValueError(f"layout {layout} and the megatron config ({sizes}) disagree on the parallel sizes")
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    mine = [stage for stage in layout.validate(config) if stage.pp_rank == pp_rank]
    return [cls(config, megatron_config, stage.has_embedding, stage.has_head, vp_stage=stage.chunk, stage=stage,
                options=options) for stage in mine]


def run_pipeline(chunks: list[torch.nn.Module], microbatches: list, forward_step: Callable,
                 forward_only: bool = False) -> list:
    """Run megatron's schedule (1F1B, interleaved with VPP) over ``microbatches``.

    ``forward_step(batch, model) -> (output, loss_func)`` as megatron defines it, with the
    microbatch handed over directly. Returns what the last stage's loss_func reported."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if len(chunks) > 1 and len(microbatches) % pp:
        raise ValueError(
            f"the interleaved schedule (virtual pipeline chunks={len(chunks)}) needs a number "
            f"of micro-batches divisible by pipeline_model_parallel_size={pp}, got {len(microbatches)}"
        )
    if len(chunks) > 1 and cpu_enabled() and len(microbatches) < 2 * pp:
        # Seen on CPU (gloo): with every micro-batch in the warm-up phase (M == pp) the
        # interleaved schedule deadlocked; M >= 2 * pp ran and matched the oracle.
        raise ValueError(
            f"on CPU the interleaved schedule needs at least 2 * pipeline_model_parallel_size="
            f"{2 * pp} micro-batches, got {len(microbatches)}"
        )
    iterators: Iterable = [iter(microbatches) for _ in chunks]

    def step(data_iterator, model):
        return forward_step(next(data_iterator), model)

    with cpu_schedule_context():
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(microbatches),
            seq_length=1,  # unused: variable_seq_lengths exchanges shapes
            micro_batch_size=1,
            forward_only=forward_only,
        )
