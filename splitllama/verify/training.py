"""One training step through megatron's machinery vs the oracle taking the same step.

Production is driven as a megatron-core trainer drives it: the registry's pipeline-stage
classes (at every layout, one chunk per virtual stage), each chunk wrapped in megatron's
``DistributedDataParallel`` (gradients accumulate in float32 ``main_grad`` buffers over
the micro-batches), megatron's schedule with ``finalize_model_grads`` (the TP all-reduce
of sequence-parallel gradients, the pipeline's), then megatron's Adam from
``get_megatron_optimizer`` (distributed optimizer on or off) with gradient clipping.
The oracle runs the same micro-batches and loss (``runner.run_oracle``), clips by the
total norm and takes a ``torch.optim.AdamW`` step with megatron's parameter groups
(no weight decay for 1-D parameters).

Compared: every parameter's finalised gradient (``main_grad``), the total gradient norm
megatron reports, every parameter's update (after - before: a step is small next to the
weights, so comparing the weights themselves would hide it) and the outputs of the next
forward on the same micro-batches. Adam's first step is ``lr * g / (|g| + eps)``; with
``eps`` of the order of the clipped gradients the update depends on their size, not only
their sign, so a gradient that is off by any factor moves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from splitllama import weight_names as wn
from splitllama.checkpoint.split import load_checkpoint
from splitllama.config import CustomSplitLlamaConfig
from splitllama.cpu_support import cuda_means_cpu
from splitllama.distributed import setup_parallel
from splitllama.layout import ParallelLayout
from splitllama.grads import wrap_ddp
from splitllama.verify.batches import Microbatch
from splitllama.verify.rules import TOLERANCE, Report, Row, _row, bf16_allowed_error, compare
from splitllama.verify.runner import (
    agree,
    _oracle_observe,
    build_production,
    gather_full_state,
    load_oracle,
    run_oracle,
    run_pipelined,
)


@dataclass(frozen=True)
class AdamStep:
    """The step both sides take. Adam's first update is ``lr * g / (|g| + eps)``.
    ``eps`` sits above the clipped gradients of the tiny test model (total norm clipped to
    ``clip_grad`` = 1 over ~1e5 weights: ~3e-3 per weight, up to ~0.3 in the value head),
    so most updates grow with ``g`` instead of being ``lr * sign(g)`` (a gradient off by
    a factor moves them), and a gradient error ``d`` moves an update by at most
    ``lr * d / eps``: bf16 gradients err by ~2^-8 of their tensor's scale (~1e-3), which
    at eps = 1e-3 made small gradients' updates pure rounding noise (seen: 1 of 8 seeds
    failed the bf16 rule on the value head's 128 updates). ``lr``: steps far above the
    float32 rounding of the weights they are added to."""

    lr: float = 1e-1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-2
    clip_grad: float = 1.0


def _megatron_optimizer(model: list[DistributedDataParallel], step: AdamStep, dtype: torch.dtype,
                        distributed_optimizer: bool):
    config = OptimizerConfig(
        optimizer="adam", lr=step.lr, min_lr=step.lr, weight_decay=step.weight_decay,
        adam_beta1=step.betas[0], adam_beta2=step.betas[1], adam_eps=step.eps, clip_grad=step.clip_grad,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=distributed_optimizer,
    )
    with cuda_means_cpu():
        optimizer = get_megatron_optimizer(config, model)
    # As a trainer sets them: the scheduler writes each group's lr and weight decay (megatron's
    # groups give 1-D weights, the norms, a weight-decay multiplier of 0); constant here.
    OptimizerParamScheduler(optimizer, init_lr=step.lr, max_lr=step.lr, min_lr=step.lr, lr_warmup_steps=0,
                            lr_decay_steps=1, lr_decay_style="constant", start_wd=step.weight_decay,
                            end_wd=step.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
    return optimizer


def _production_step(chunks, microbatches: list[Microbatch], step: AdamStep, dtype: torch.dtype,
                     distributed_optimizer: bool):
    """(finalised gradients by name, the total norm megatron clipped by, outputs of the
    next forward per micro-batch on every rank)."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=distributed_optimizer)
    model = wrap_ddp(chunks, ddp_config)
    for chunk in chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
    optimizer = _megatron_optimizer(model, step, dtype, distributed_optimizer)
    for wrapped in model:
        wrapped.zero_grad_buffer()
    optimizer.zero_grad()
    run_pipelined(model, microbatches)
    grads = gather_full_state(chunks, "main_grad")
    with cuda_means_cpu():
        updated, grad_norm, _ = optimizer.step()
    if not updated:
        raise RuntimeError("megatron's optimizer skipped the step (gradient overflow)")
    with torch.no_grad():
        observed = run_pipelined(model, microbatches, forward_only=True)
    return grads, float(grad_norm), observed


def _oracle_step(oracle, microbatches: list[Microbatch], step: AdamStep, master_dtype: torch.dtype):
    """The oracle's step: summed loss, clip by the total norm, AdamW on ``master_dtype``
    copies of the weights (the weights themselves when already in it, as in float64;
    float32 masters for a bf16 oracle, as megatron keeps them), weights set from the
    masters. Returns (gradients by name, total norm, next outputs)."""
    _, grads = run_oracle(oracle, microbatches)
    grads = {name: grad.clone() for name, grad in grads.items()}  # clipping scales .grad in place
    named = list(oracle.named_parameters())
    masters = [p if p.dtype == master_dtype else p.detach().to(master_dtype) for _, p in named]
    for master, (_, p) in zip(masters, named, strict=True):
        master.grad = torch.zeros_like(master) if p.grad is None else p.grad.to(master_dtype)
    norm = float(torch.nn.utils.clip_grad_norm_(masters, step.clip_grad))
    # megatron's default parameter groups: no weight decay for biases and 1-D weights (norms)
    groups = [dict(params=[m for m in masters if m.dim() > 1], weight_decay=step.weight_decay),
              dict(params=[m for m in masters if m.dim() <= 1], weight_decay=0.0)]
    torch.optim.AdamW(groups, lr=step.lr, betas=step.betas, eps=step.eps).step()
    with torch.no_grad():
        for master, (_, p) in zip(masters, named, strict=True):
            if master is not p:
                p.copy_(master)
        device = next(oracle.parameters()).device
        observed = [_oracle_observe(oracle, mb.to(device)).detach().cpu() for mb in microbatches]
    return grads, norm, observed


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def run_training_step(checkpoint_dir: str, config: CustomSplitLlamaConfig, layout: ParallelLayout,
                      head: wn.Head, dtype: torch.dtype, device: str, microbatches: list[Microbatch],
                      distributed_optimizer: bool, step: AdamStep = AdamStep()) -> Report:
    """Production at ``layout`` and the oracle each take one step on ``microbatches``;
    the same report on every rank. ``dtype``: production's parameters (megatron's
    optimizers take float32 or 16-bit ones); the reference oracle is float64 on CPU,
    float32 on GPU, and bf16 production is judged by the bf16 rule against an oracle
    stepping in bf16 with float32 masters."""
    setup_parallel(layout, device)
    chunks = build_production(config, layout, head, dtype, device, stages=True)
    load_checkpoint(chunks, checkpoint_dir, progress=False)
    before = gather_full_state(chunks)
    moved = [mb.to(device) for mb in microbatches]
    prod_grads, prod_norm, prod_out = _production_step(chunks, moved, step, dtype, distributed_optimizer)
    prod_steps = {name: after - before[name] for name, after in gather_full_state(chunks).items()}

    ref_dtype = torch.float64 if device == "cpu" else torch.float32
    oracle = load_oracle(checkpoint_dir, head, ref_dtype, device)
    ref_before = _weights(oracle)
    ref_grads, ref_norm, ref_out = _oracle_step(oracle, microbatches, step, ref_dtype)
    ref_steps = {name: after - ref_before[name] for name, after in _weights(oracle).items()}
    low_grads = low_out = low_steps = low_norm = None
    if dtype == torch.bfloat16:
        low = load_oracle(checkpoint_dir, head, dtype, device)
        low_before = _weights(low)
        low_grads, low_norm, low_out = _oracle_step(low, microbatches, step, torch.float32)
        low_steps = {name: after.double() - low_before[name].double() for name, after in _weights(low).items()}

    # outputs of the NEXT forward, and the finalised gradients
    report = compare(prod_out, ref_out, prod_grads, ref_grads, microbatches, layout, head, dtype,
                     low_out, low_grads)
    for row in report.rows:
        row.name = row.name.replace("output[", "next output[", 1)
    step_scale = max((float(s.abs().max()) for s in ref_steps.values() if s.numel()), default=0.0)
    for name in ref_steps:
        if name not in prod_steps:
            report.rows.append(Row(f"step {name}: no such production weight", math.inf, math.inf, 0.0, False))
        elif low_steps is None:
            report.rows.append(_row(f"step {name}", prod_steps[name], ref_steps[name], dtype, None, step_scale))
        else:
            weight_scale = float((ref_before[name] + ref_steps[name]).abs().max())
            report.rows.append(_bf16_step_row(name, prod_steps[name], ref_steps[name], low_steps[name], weight_scale))
    report.rows.append(_norm_row(prod_norm, ref_norm, low_norm, dtype))
    agreed = agree(report.passed)
    if report.passed and not agreed:
        report.rows.append(Row("another rank failed", math.inf, math.inf, 0.0, False))
    return report


def _bf16_step_row(name: str, prod: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, weight_scale: float) -> Row:
    """The bf16 rule for one weight's update, its floor taken at the WEIGHT's scale: the
    updated weight is rounded to bf16, which moves the update by up to ``u |weight|``
    (the rule's floor is twice the rounding of the reference, and rounding the reference's
    new weight is what rounds its update). A floor at the update's own scale (often 1/100
    of the weight's) failed correct models on 1 of 8 checkpoint seeds (score.weight, 128
    numbers: a max over few rounding samples)."""
    ref = ref.double()
    err = float((prod.double() - ref).abs().max())
    scale = max(float(ref.abs().max()), 1e-300)
    bound = bf16_allowed_error(float((low.double() - ref).abs().max()), weight_scale) / scale
    finite = bool(torch.isfinite(prod).all())
    return Row(f"step {name}", err, err / scale, bound, finite and err / scale <= bound)


def _norm_row(prod: float, ref: float, low: float | None, dtype: torch.dtype) -> Row:
    """The total gradient norm megatron clipped by: every weight counted once (TP-replicated
    ones on one rank, each pipeline stage's own) is what makes it the oracle's."""
    err = abs(prod - ref)
    bound = (bf16_allowed_error(abs(low - ref), ref) if low is not None else TOLERANCE[dtype] * ref) / ref
    rel = err / ref
    return Row("total gradient norm", err, rel, bound, math.isfinite(prod) and rel <= bound)
