"""Production vs oracle: build both from one split checkpoint, run the same micro-batches
and loss through both, and compare outputs and every parameter's gradient.

Production runs at a parallel layout (TP, SP, PP, VPP); its gradients are gathered back
to checkpoint names through ``sharding`` (the same declaration the loader uses) after the
SP all-reduce of ``grads``. Every rank builds the same report and the verdict is agreed
by all-reduce, so a failure fails every rank.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from splitllama import weight_names as wn
from splitllama.checkpoint.assemble import fresh_value_head
from splitllama.checkpoint.split import iter_stage_tensors, load_checkpoint, tp_all_gather
from splitllama.config import CustomSplitLlamaConfig
from splitllama.distributed import setup_parallel
from splitllama.megatron_configs import megatron_config
from splitllama.grads import allreduce_sequence_parallel_grads
from splitllama.layout import ParallelLayout, real_vocab_rows
from splitllama.model import (
    ParallelCustomSplitLLamaForCausalLM,
    ParallelCustomSplitLLamaForCausalLMRmPad,
    ParallelCustomSplitLLamaForValueRmPad,
)
from splitllama.options import ModelOptions, model_options
from splitllama.pipeline import (
    ParallelCustomSplitLLamaForCausalLMRmPadPP,
    ParallelCustomSplitLLamaForValueRmPadPP,
    build_chunks,
    run_pipeline,
)
from splitllama.verify.adapter_ties import AdapterTies
from splitllama.verify.batches import Microbatch, masked_probe
from splitllama.verify.rules import Report, Row, bf16_allowed_error, compare


def build_production(config: CustomSplitLlamaConfig, layout: ParallelLayout, head: wn.Head,
                     dtype: torch.dtype, device: str, options: ModelOptions | None = None,
                     padded: bool = False, stages: bool = False) -> list[torch.nn.Module]:
    """The production model chunks of this rank (one unless VPP), built with ``options``
    and placed by ``layout`` (its pipeline split). ``padded``: the padded class
    ``ParallelCustomSplitLLamaForCausalLM`` instead of the packed one (TP and SP, no
    pipeline, LM head). ``stages``: the registry's pipeline-stage classes even without
    pipeline parallelism (what a trainer builds and megatron's schedules drive,
    ``set_input_tensor`` included)."""
    mc = megatron_config(layout, dtype, device)
    options = model_options(options)
    if padded:
        if layout.pp != 1 or head != "lm":
            raise ValueError(f"the padded class is a CausalLM without pipeline stages, not {head} at {layout}")
        chunks = [ParallelCustomSplitLLamaForCausalLM(config, mc, options=options)]
    elif layout.pp == 1 and not stages:
        cls = ParallelCustomSplitLLamaForCausalLMRmPad if head == "lm" else ParallelCustomSplitLLamaForValueRmPad
        chunks = [cls(config, mc, options=options)]
    else:
        cls = ParallelCustomSplitLLamaForCausalLMRmPadPP if head == "lm" else ParallelCustomSplitLLamaForValueRmPadPP
        chunks = build_chunks(cls, config, mc, options, layout)
    return [chunk.to(device) for chunk in chunks]


def load_oracle(checkpoint_dir: str, head: wn.Head, dtype: torch.dtype, device: str,
                fresh_value_head_seed: int | None = None):
    """The oracle of ``head`` from a split checkpoint. ``fresh_value_head_seed``: a value
    model from a CausalLM checkpoint, with production's fresh head of that seed."""
    from oracle import CustomSplitLLamaForCausalLM, CustomSplitLLamaForTokenClassification

    # eager attention: the reference (sdpa, transformers' default, computes the same math)
    if head == "lm":
        oracle = CustomSplitLLamaForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype, attn_implementation="eager")
    else:
        fresh = fresh_value_head_seed is not None
        oracle = CustomSplitLLamaForTokenClassification.from_pretrained(checkpoint_dir, dtype=dtype, num_labels=1,
                                                                        fresh_value_head=fresh,
                                                                        attn_implementation="eager")
        if fresh:
            with torch.no_grad():
                oracle.score.weight.copy_(fresh_value_head(oracle.config, fresh_value_head_seed))
    # compared forwards are training-style: the config's default would fill a KV cache
    oracle.config.use_cache = False
    return oracle.to(device)


# ---- verdicts ----
def agree(passed: bool) -> bool:
    """All ranks pass, or all fail together (no rank hangs waiting for another)."""
    flag = torch.tensor([1 if passed else 0], dtype=torch.int64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ---- running ------------------------------------------------------------------------------------
def _oracle_observe(model, mb: Microbatch, trunk: bool = False) -> torch.Tensor:
    if trunk:  # the HF trunk's final hidden state (after the final norm), [B, S, h_hi]
        return model.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                           position_ids=mb.position_ids).last_hidden_state
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                position_ids=mb.position_ids).logits
    if out.shape[-1] == 1 and mb.probe.dim() == 2:  # value model: [B, S, 1] -> [B, S]
        return out[..., 0]
    if mb.labels is None:
        return out
    log_softmax = torch.log_softmax(out if mb.temperature is None else out / mb.temperature, dim=-1)
    # labels at padded positions may be anything (e.g. -100); they are not compared
    labels = torch.where(mb.attention_mask.bool(), mb.labels, 0)
    log_prob = log_softmax.gather(-1, labels[..., None])[..., 0]
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return torch.stack([log_prob, entropy], dim=-1)


def run_oracle(model, microbatches: list[Microbatch],
               trunk: bool = False) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """What is observed per micro-batch, and gradients by checkpoint name."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    observed = []
    for mb in microbatches:
        mb = mb.to(device)
        out = _oracle_observe(model, mb, trunk)
        (out * masked_probe(mb, out)).sum().backward()
        observed.append(out.detach().cpu())
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
        for name, p in model.named_parameters()
    }
    return observed, grads


def _stage_loss(mb: Microbatch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, observed) from the last pipeline stage's output: vocab-parallel logits
    ``[B, S, Vp/tp]`` (padded columns ``heads.PADDED_VOCAB_LOGIT``, left out of both), values ``[B, S]``, or
    (log-prob, entropy) ``[B, S, 2]``."""
    probe = masked_probe(mb, output)
    if mb.labels is None and output.dim() == 3:  # this rank's slice of the (padded) vocabulary
        width, vocab = output.shape[-1], probe.shape[-1]
        real = real_vocab_rows(parallel_state.get_tensor_model_parallel_rank() * width, width, vocab)
        loss = (output[..., :len(real)] * probe[..., real.start:real.stop]).sum()
        return loss, torch.cat(tp_all_gather(output.detach()), dim=-1)[..., :vocab]
    return (output * probe).sum(), output


def trunk_hidden(model, mb: Microbatch) -> torch.Tensor:
    """The final hidden states ``[B, S, h_hi]`` (zeros at padding) of the trunk of a model
    without pipeline stages: its ``ParallelCustomSplitLLamaModel`` (padded) or
    ``...ModelRmPad`` (packed) run on the batch object the model itself builds. Under SP
    the trunk's sequence shards are gathered; every rank then holds the same loss, so the
    backward only takes each rank's own shard (``tensor_parallel_output_grad=False``)."""
    batch = model.prepare_batch(mb.input_ids, mb.attention_mask, mb.position_ids)
    hidden = model.model(batch)
    if model.parallel_layout.sp:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return batch.restore(hidden)


def run_production(chunks: list[torch.nn.Module], microbatches: list[Microbatch],
                   layout: ParallelLayout, trunk: bool = False) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """What is observed per micro-batch (on every rank) and gathered gradients by
    checkpoint name. ``trunk``: the trunk's final hidden states instead of the head's
    output (no pipeline stages)."""
    device = next(chunks[0].parameters()).device
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    moved = [mb.to(device) for mb in microbatches]
    if layout.pp == 1:
        (model,) = chunks
        observed = []
        for mb in moved:
            if trunk:
                out = trunk_hidden(model, mb)
            elif mb.labels is not None:
                out = torch.stack(model.log_probs_and_entropy(
                    mb.input_ids, mb.attention_mask, mb.labels, mb.position_ids, temperature=mb.temperature), dim=-1)
            else:
                out = model(mb.input_ids, mb.attention_mask, mb.position_ids)
            (out * masked_probe(mb, out)).sum().backward()
            observed.append(out.detach().cpu())
    elif trunk:
        raise ValueError(f"the trunk is compared without pipeline stages, not at {layout}")
    else:
        observed = run_pipelined(chunks, moved)
    allreduce_sequence_parallel_grads(chunks)
    return observed, gather_full_state(chunks, "grad")


def gather_full_state(chunks: list[torch.nn.Module], source: str = "param") -> dict[str, torch.Tensor]:
    """Every tensor of the model (this rank's ``chunks`` and the other pipeline ranks')
    under its checkpoint name, on EVERY rank (CPU copies): parameters or gradients
    (``source``: "param", "grad" or "main_grad"). For small models: the whole model is
    materialised per rank. Copies even on CPU, where ``.cpu()`` would alias the live
    tensors (an optimizer step or clipping would change them afterwards)."""
    mine = {name: t.detach().to("cpu", copy=True) for name, t in iter_stage_tensors(chunks, source)}
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return mine
    parts: list[dict] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, mine, group=parallel_state.get_pipeline_model_parallel_group())
    return {k: v for part in parts for k, v in part.items()}


def run_pipelined(chunks, microbatches: list[Microbatch], forward_only: bool = False) -> list[torch.Tensor]:
    """Megatron's schedule over the micro-batches (the loss of ``_stage_loss``); what the
    last stage observed, on every rank."""
    count = len(microbatches)

    def forward_step(mb, model):
        out = model(mb.input_ids, mb.attention_mask, mb.position_ids, labels=mb.labels, temperature=mb.temperature)

        def loss_func(output):
            loss, observed = _stage_loss(mb, output)
            # megatron divides each micro-batch loss by their count; the oracle sums.
            return loss * count, {"observed": observed.detach().cpu()}

        return out, loss_func

    reports = run_pipeline(chunks, microbatches, forward_step, forward_only=forward_only)
    holder = [[r["observed"] for r in reports] if parallel_state.is_pipeline_last_stage() else None]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(holder, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return holder[0]


def oracle_reference(checkpoint_dir: str, head: wn.Head, device: str, microbatches: list[Microbatch],
                     trunk: bool = False, fresh_value_head_seed: int | None = None
                     ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """What ``run_parity`` compares production with: the oracle's outputs per micro-batch
    and gradients by checkpoint name, in float64 on CPU (float32 on GPUs)."""
    oracle = load_oracle(checkpoint_dir, head, reference_dtype(device), device, fresh_value_head_seed)
    return run_oracle(oracle, microbatches, trunk)


def reference_dtype(device: str) -> torch.dtype:
    return torch.float64 if device == "cpu" else torch.float32


def run_parity(checkpoint_dir: str, config: CustomSplitLlamaConfig, layout: ParallelLayout,
               head: wn.Head, dtype: torch.dtype, device: str,
               microbatches: list[Microbatch], options: ModelOptions | None = None, padded: bool = False,
               trunk: bool = False, fresh_value_head_seed: int | None = None,
               reference: tuple[list[torch.Tensor], dict[str, torch.Tensor]] | None = None) -> Report:
    """Production at ``layout`` vs the oracle on ``microbatches``; the same report on every
    rank. ``options`` and ``padded`` choose the production model (``build_production``).
    ``trunk``: compare the trunk's
    final hidden states (``trunk_hidden``) with the oracle trunk's ``last_hidden_state``,
    probes ``[B, S, h_hi]``. ``fresh_value_head_seed``: value head, CausalLM checkpoint; both
    models start from the same fresh value head of that seed. ``reference``: what
    ``oracle_reference`` returned for these same arguments, when the caller already has it
    (it is then not computed again)."""
    if reference is not None and dtype == torch.bfloat16 and config.mlp:
        raise ValueError("reference must be None in bfloat16 with the mlp adapter: the oracle then runs at "
                         "production's ReLU branches, which only this run knows")
    setup_parallel(layout, device)
    chunks = build_production(config, layout, head, dtype, device, options, padded)
    fresh = fresh_value_head_seed is not None
    load_checkpoint(chunks, checkpoint_dir, progress=False, fresh_value_head=fresh,
                    seed=fresh_value_head_seed if fresh else 0)
    # bf16 with the mlp adapter: ReLU ties at 0 take production's branch (adapter_ties says why)
    ties = None
    if dtype == torch.bfloat16 and config.mlp:
        ties = AdapterTies([mb.attention_mask.bool() for mb in microbatches], bf16_allowed_error)
    with ties.record_production(chunks, config.h_hi) if ties else contextlib.nullcontext():
        prod_out, prod_grads = run_production(chunks, microbatches, layout, trunk)
    low_oracle = load_oracle(checkpoint_dir, head, dtype, device, fresh_value_head_seed) if dtype == torch.bfloat16 else None
    if ties:
        with ties.record_oracle_preactivations(low_oracle), torch.no_grad():
            for mb in microbatches:
                _oracle_observe(low_oracle, mb.to(device), trunk)
    if reference is None:
        oracle = load_oracle(checkpoint_dir, head, reference_dtype(device), device, fresh_value_head_seed)
        with ties.take_production_branch_at_ties(oracle, reference=True) if ties else contextlib.nullcontext():
            reference = run_oracle(oracle, microbatches, trunk)
    ref_out, ref_grads = reference
    low_out = low_grads = None
    if low_oracle is not None:
        with ties.take_production_branch_at_ties(low_oracle, reference=False) if ties else contextlib.nullcontext():
            low_out, low_grads = run_oracle(low_oracle, microbatches, trunk)
    report = compare(prod_out, ref_out, prod_grads, ref_grads, microbatches, layout, head, dtype,
                     low_out, low_grads)
    if ties:
        for k, (mb, (beyond, tied, flipped)) in enumerate(zip(microbatches, ties.verdicts, strict=False)):
            # abs_err and rel_err: a count, the units on the other side of 0 beyond the rule's
            # band; must be none
            report.rows.append(Row(f"adapter relu gates[{mb.name or k}] (units beyond the band; {flipped} of "
                                   f"{tied} ties on production's branch)", beyond, beyond, 0.0, beyond == 0))
    agreed = agree(report.passed)
    if report.passed and not agreed:
        report.rows.append(Row("another rank failed", math.inf, math.inf, 0.0, False))
    return report
