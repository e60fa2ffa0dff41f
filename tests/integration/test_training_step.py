"""One optimizer step through megatron's machinery equals the oracle's step, on every layout.

Production chunks are wrapped in megatron's ``DistributedDataParallel``, run by megatron's
schedule with ``finalize_model_grads`` over several micro-batches (padding edge cases;
for the LM, logits micro-batches and then labelled ones through the fused log-prob head,
whose weight gradient goes straight into ``main_grad``), and stepped by megatron's Adam
(``get_megatron_optimizer``, distributed optimizer on and off) with clipping. The oracle
takes the same AdamW step. Compared (``splitllama.verify.training``): finalised gradients,
the clipped-by norm, every weight's update and the next forward's outputs.

Precision: megatron's optimizers take float32 or 16-bit parameters (the distributed one
refuses float64, its clipping asserts float32 gradients), so on CPU production steps in
float32 against the float64 oracle (tolerance 1e-4 relative, ``rules.TOLERANCE``); in
bf16 (the GPU, or ``SPLITLLAMA_TEST_DTYPE=bfloat16``) the bf16 rule against an oracle
stepping in bf16 with float32 master weights.
"""

from __future__ import annotations

import pytest
import torch

from splitllama.config import CustomSplitLlamaConfig
from splitllama.verify.training import run_training_step
from tests.cases import EDGE_MASKS
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import layouts
from tests.integration.test_parity import assert_passed, microbatch

# float64 is the CPU default of the suite; megatron's optimizers stop at float32
TRAIN_DTYPE = torch.float32 if DTYPE == torch.float64 else DTYPE


def training_microbatches(head: str) -> list:
    """Six micro-batches of different shapes: padding left/right/inside, an empty row, an
    all-padding batch, an odd token count (SP padding), caller position ids; for the LM
    the last two carry labels (log-probs and entropy by the fused head, after the logits
    micro-batches: see ``heads.LMHead.vocab_parallel_logits``). Six: the interleaved
    schedule on CPU needs an even count of at least four."""
    names = ("left_right_inside", "empty_row", "all_padding_batch", "odd_token_count")
    batches = [microbatch(EDGE_MASKS[name], head, 10 + seed, name) for seed, name in enumerate(names)]
    if head == "lm":
        batches.append(microbatch(EDGE_MASKS["single_token_rows"], head, 20, "labels_single_tokens", labels=True))
        batches.append(microbatch(EDGE_MASKS["left_right_inside"], head, 21, "labels_caller_positions",
                                  positions=True, labels=True))
    else:
        batches.append(microbatch(EDGE_MASKS["single_token_rows"], head, 20, "single_token_rows"))
        batches.append(microbatch(EDGE_MASKS["left_right_inside"], head, 21, "caller_positions", positions=True))
    return batches


def training_step_passes(ckpt: str, layout, head: str, distributed_optimizer: bool):
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    return run_training_step(ckpt, config, layout, head, TRAIN_DTYPE, DEVICE, training_microbatches(head),
                             distributed_optimizer)


# The optimizer does not depend on the head: the LM runs both, the value model the
# distributed one only (what megatron trainers default to), to keep the gate short.
@pytest.mark.parametrize("head,distributed_optimizer", [("lm", False), ("lm", True), ("value", True)],
                         ids=["lm-adam", "lm-distributed_adam", "value-distributed_adam"])
@pytest.mark.parametrize("layout", layouts())
def test_training_step(layout, head, distributed_optimizer, checkpoint_factory):
    ckpt = checkpoint_factory(head, False)
    assert_passed(training_step_passes(ckpt, layout, head, distributed_optimizer))
