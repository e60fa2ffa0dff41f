"""The bf16 rule's ReLU-tie handling (splitllama.adapter_ties) reads production's adapter
gates through hooks; here those gates, gathered over TP shards, SP and pipeline stages onto
every rank, are checked against the oracle's own, on every layout of the table. The tie
logic itself is unit-tested in tests/unit/test_adapter_ties.py."""

from __future__ import annotations

import pytest
import torch

from splitllama.verify.adapter_ties import AdapterTies
from splitllama.checkpoint.split import load_checkpoint
from splitllama.config import CustomSplitLlamaConfig
from splitllama.distributed import setup_parallel
from splitllama.verify.rules import BF16_UNIT_ROUNDOFF, bf16_allowed_error
from splitllama.verify.runner import build_production, load_oracle, run_oracle, run_production
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import layouts
from tests.integration.test_parity import edge_case_microbatches


@pytest.mark.parametrize("layout", layouts())
def test_production_gates_reach_every_rank_in_the_oracles_order(layout, checkpoint_factory):
    ckpt = checkpoint_factory("lm", True)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    microbatches = edge_case_microbatches("lm")  # incl. an all-padding batch and SP padding
    ties = AdapterTies([mb.attention_mask.bool() for mb in microbatches], bf16_allowed_error)
    setup_parallel(layout, DEVICE)
    chunks = build_production(config, layout, "lm", DTYPE, DEVICE)
    load_checkpoint(chunks, ckpt, progress=False)
    with ties.record_production(chunks, config.h_hi):
        run_production(chunks, microbatches, layout)
    oracle = load_oracle(ckpt, "lm", DTYPE, DEVICE)
    with ties.record_oracle_preactivations(oracle):
        run_oracle(oracle, microbatches)
    assert len(ties.production_gates) == len(microbatches)
    for mb, gates, pre in zip(microbatches, ties.production_gates, ties.low_preactivations, strict=True):
        assert gates.shape == pre.shape == (int(mb.attention_mask.sum()), config.h_hi), mb.name
        differ = gates != (pre > 0)
        if DTYPE == torch.bfloat16 and pre.numel():  # both round: units within a few roundings of 0 may differ
            differ &= pre.float().abs() > 8 * BF16_UNIT_ROUNDOFF * float(pre.float().abs().max())
        assert not differ.any(), f"{mb.name}: {int(differ.sum())} gates differ from the oracle's"
