"""Model options: how a production model is built, beyond its architecture (the split
config) and its parallel layout (megatron's ``ModelParallelConfig``; where the pipeline
stages cut is ``layout.ParallelLayout``'s).

ONE frozen object, validated here when it is made, that every entry point takes as it is
(the model classes, the pipeline classes and ``pipeline.build_chunks``, the harness, the
benchmark, the command line). A new option is a field here and the code that reads it.
Standard library only, so the command line checks its flags without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from splitllama.parallel_sizes import is_positive_int

# Activation recompute (megatron's settings per choice: ``megatron_configs.RECOMPUTE``).
RECOMPUTE_CHOICES = ("none", "selective", "full")
# How the LM head computes log-probabilities and entropy (``heads.LMHead``).
LOG_PROBS_CHOICES = ("fused", "materialise")


@dataclass(frozen=True)
class ModelOptions:
    """``recompute``: ``none | selective | full`` activation recompute; None takes the
    ``recompute_granularity`` of a megatron ``TransformerConfig`` passed as the model's
    megatron config, else none (``resolve``). It covers the fused LM head too: with
    ``none`` the head keeps each logits tile's probabilities for backward (``T x V/tp``
    16-bit values: one head-sized GEMM less), otherwise it recomputes the logits there.

    ``log_probs``: ``fused | materialise``, how the LM head computes log-probabilities and
    entropy (``heads.LMHead``; default fused, the logits never materialised).

    ``make_vocab_size_divisible_by`` (megatron's name): the embedding and LM head get
    ``layout.padded_vocab_size`` rows, the vocabulary rounded up to a multiple of this times
    TP, so any vocabulary (e.g. 128,257 after adding special tokens) runs at any TP. Default
    1: padding only where TP does not divide the vocabulary (checkpoints, shapes and results
    of a divisible vocabulary stay exactly as without padding; megatron's default 128 aligns
    GEMM shapes for speed at the cost of up to ``128 tp - 1`` extra rows). Padded rows are
    zero, never looked up, excluded from logits, log-probs, entropy and gradients, and never
    loaded or saved: checkpoints hold exactly ``vocab_size`` rows.

    Where the pipeline stages cut is not an option: ``layout.ParallelLayout`` owns it."""

    recompute: str | None = None
    log_probs: str = "fused"
    make_vocab_size_divisible_by: int = 1

    def __post_init__(self) -> None:
        if self.recompute is not None and self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"recompute={self.recompute!r} is not one of {sorted(RECOMPUTE_CHOICES)}")
        if self.log_probs not in LOG_PROBS_CHOICES:
            raise ValueError(f"log_probs={self.log_probs!r} is not one of {list(LOG_PROBS_CHOICES)}")
        if not is_positive_int(self.make_vocab_size_divisible_by):
            raise ValueError(f"make_vocab_size_divisible_by must be a positive int, "
                             f"got {self.make_vocab_size_divisible_by!r}")

    def resolve(self, megatron_config: Any) -> ModelOptions:
        """These options with ``recompute`` decided: when None, the megatron config's
        ``recompute_granularity`` (a ``TransformerConfig``'s), else none."""
        if self.recompute is not None:
            return self
        granularity = getattr(megatron_config, "recompute_granularity", None) or "none"
        return dataclasses.replace(self, recompute=granularity)


def model_options(options: Any) -> ModelOptions:
    """``options`` as a model constructor takes it: None (the defaults) or a ``ModelOptions``."""
    if options is None:
        return ModelOptions()
    if not isinstance(options, ModelOptions):
        raise ValueError(f"options must be a splitllama.ModelOptions or None, got {type(options).__name__}")
    return options
