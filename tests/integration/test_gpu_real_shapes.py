"""GPU only: parity at real Llama-3.1 layer shapes in bfloat16, NCCL, 1/2/4 GPUs.

One 8B-shaped lower layer, one 70B-shaped upper layer (from a deeper upper model, so the
index offset is exercised), a reduced vocabulary (32768: the embedding and head keep their
real widths; the full 128256 would only make the per-rank gradient copies larger).
Production in bf16 is compared with the oracle in float32 under the error-ratio rule:
its error must be at most twice that of the oracle run in bf16, plus two bf16 roundings
(2 x 2^-8) of the scale (splitllama.verify.rules).
Rows of exactly 4096 and of more than 4096 tokens are included.
"""

from __future__ import annotations

import pytest
import torch

from splitllama.config import CustomSplitLlamaConfig, llama_preset
from splitllama.verify.runner import run_parity
from tests.integration.conftest import DEVICE
from tests.integration.test_parity import assert_passed, microbatch
from tests.integration.layouts import layouts

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="real Llama-3 shapes run on GPUs only")

VOCAB = 32768


def real_shape_config() -> CustomSplitLlamaConfig:
    lower = llama_preset("llama3.1-8b", num_hidden_layers=2, vocab_size=VOCAB)
    upper = llama_preset("llama3.1-70b", num_hidden_layers=3, vocab_size=VOCAB)
    return CustomSplitLlamaConfig.from_llama_configs(lower, upper, 1, 1)


def real_microbatches(head: str):
    def rows(*lengths, seq=None):
        seq = seq or max(lengths)
        mask = torch.zeros(len(lengths), seq, dtype=torch.bool)
        for r, n in enumerate(lengths):
            mask[r, seq - n:] = True  # left padding, as rollouts are batched for generation
        return mask

    return [
        microbatch(rows(700, 300, 0, 1, 513), head, 1, "mixed", vocab=VOCAB),
        microbatch(rows(4096, 37), head, 2, "exactly_4096", vocab=VOCAB),
        microbatch(rows(4100), head, 3, "longer_than_4096", vocab=VOCAB),
        microbatch(rows(250, 120), head, 4, "caller_positions", positions=True, vocab=VOCAB),
    ]


@pytest.mark.parametrize("head", ["lm", "value"])
@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp", "tp4", "tp4_sp", "tp2_sp_pp2"))
def test_real_shapes_bf16(layout, head, checkpoint_factory):
    ckpt = checkpoint_factory(head, False, config=real_shape_config(), name="real", std=0.02,
                              dtype=torch.bfloat16)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    report = run_parity(ckpt, config, layout, head, torch.bfloat16, DEVICE, real_microbatches(head))
    assert_passed(report)
