"""The ``splitllama check`` job: production at one layout vs the oracle, on a given split
checkpoint or on the built-in tiny model, inside an initialised process group. Returns the
report; the CLI prints it."""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist

from splitllama import weight_names as wn
from splitllama.attention import PackedAttention, select_backends
from splitllama.checkpoint.directory import BrokenCheckpointError, check_finite
from splitllama.config import CustomSplitLlamaConfig
from splitllama.verify.tiny import tiny_split_config
from splitllama.layout import ParallelLayout
from splitllama.options import ModelOptions, model_options
from splitllama.verify.batches import check_microbatches
from splitllama.verify.random_checkpoints import TEST_CHECKPOINT_INIT, random_split_checkpoint, written_by_rank0
from splitllama.verify.rules import BUILT_IN_MODEL, Report
from splitllama.verify.runner import run_parity


def attention_backends(config: CustomSplitLlamaConfig, device: str, dtype: torch.dtype) -> str:
    """The production model's attention backend on ``(device, dtype)``, as its batches' plans
    choose it: one name, or one per stack head dim where they differ (flash-attn 4 runs at
    the head dims it was checked at only)."""
    backend, fallback = select_backends(torch.device(device), dtype)
    plan = PackedAttention(backend=backend, fallback=fallback)
    per_dim = {dim: plan.backend_at(dim) for dim in sorted({config.lower.head_dim, config.upper.head_dim})}
    if len(set(per_dim.values())) == 1:
        return next(iter(per_dim.values()))
    return ", ".join(f"{name} (head dim {dim})" for dim, name in per_dim.items())


def run_check(checkpoint: str | None, layout: ParallelLayout, head: wn.Head, dtype: torch.dtype,
              device: str, *, seed: int = 0, mlp: bool = False,
              options: ModelOptions | None = None, fresh_value_head: bool = False) -> Report:
    """Collective over the world, which holds ``tp * pp`` ranks (the command line checks
    it before calling). Without ``checkpoint``, rank 0 writes
    the built-in tiny model (``mlp``: with the mlp adapter) to a temporary directory.
    ``options``: the production model's (its ``log_probs`` is the path the
    ``log_probs_entropy`` micro-batch checks). ``fresh_value_head`` (value head, CausalLM
    checkpoint): both models get the same freshly initialised value head, drawn from ``seed``.

    A given checkpoint is first read by rank 0 for NaN and Inf (``BrokenCheckpointError``
    on every rank): a broken checkpoint is not a difference between the two models.

    The report names what was checked: the checkpoint, head, adapter, layout, dtype, the
    production model's options and attention backend, and the seed."""
    given = checkpoint
    with tempfile.TemporaryDirectory(prefix="splitllama-check-") as local:
        if checkpoint is None:
            checkpoint = written_by_rank0(local, lambda path: random_split_checkpoint(
                tiny_split_config(mlp=mlp), path, head, seed=seed, **TEST_CHECKPOINT_INIT[dtype]))
        else:
            holder = [None]
            if dist.get_rank() == 0:
                try:
                    check_finite(checkpoint)
                except BrokenCheckpointError as err:
                    holder = [str(err)]
            dist.broadcast_object_list(holder, src=0)
            if holder[0] is not None:
                raise BrokenCheckpointError(holder[0])
        config = CustomSplitLlamaConfig.from_pretrained(checkpoint)
        batches = check_microbatches(config.vocab_size, head, seed, multiple_of=layout.pp if layout.vpp else 1)
        report = run_parity(checkpoint, config, layout, head, dtype, device, batches, options,
                            fresh_value_head_seed=seed if fresh_value_head else None)
        dist.barrier()  # rank 0's temporary checkpoint outlives every rank's reading
    options = model_options(options)
    report.checkpoint = given if given is not None else BUILT_IN_MODEL
    if fresh_value_head:
        report.head = f"{head} (fresh, seed {seed})"
    report.adapter = "mlp" if config.mlp else "linear"
    report.recompute = options.recompute or "none"
    report.log_probs = options.log_probs if head == "lm" else None
    report.attention = attention_backends(config, device, dtype)
    report.seed = seed
    return report
