"""splitllama bench without a GPU: the useful-FLOP count reproduces the hand-computed
figures of docs/verification.md, and the workload, pairing, profiler sorting and summary behave."""

from __future__ import annotations

import pytest
import torch

from splitllama.bench import (
    bench_config, kernel_kind, make_batch, rl_lengths, speedup_pairs, summary, useful_flops,
)


def test_flops_per_token_match_the_published_figures():
    config = bench_config("mixed", 1, 1)
    one_token = useful_flops(config, [1])  # s_bar = 1
    lower = 1.309e9 + 24576
    upper = 5.134e9 + 49152
    adapter, head = 0.201e9, 6.30e9
    # the hand-computed figures are rounded to 3-4 digits
    assert one_token == pytest.approx(lower + upper + adapter + head, rel=2e-3)


def test_attention_term_grows_with_document_length():
    config = bench_config("8b", 1, 1)
    short, long = useful_flops(config, [100] * 40), useful_flops(config, [4000])
    # same 4000 tokens; s_bar = 100 vs 4000 changes only the attention term
    assert long - short == pytest.approx(2 * 24576 * (4000 - 100) * 4000, rel=1e-9)


def test_rl_batch_reports_its_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = rl_lengths(8192, gen)
    assert sum(lengths) >= 8192 and all(16 <= n <= 4096 for n in lengths)
    batch = make_batch(lengths, 1000, gen, "cpu")
    assert batch.attention_mask.sum() == sum(lengths)
    assert 0 < batch.padding_fraction < 1


def test_speedups_pair_runs_on_the_same_documents():
    rows = [{"name": n, "ms": ms, "part": "packing", "padding_fraction": 0.5}
            for n, ms in (("p0/packed", 1.0), ("p0/padded", 1.1), ("rl/packed[8 docs]", 1.0),
                          ("rl/padded[4 docs]", 2.0), ("rl/packed[4 docs]", 0.6),
                          ("rl/oracle[2 docs]", 9.0), ("rl/packed[2 docs]", 3.0))]
    rows.insert(3, {"name": "rl/padded[8 docs]", "error": "out of memory", "part": "packing"})
    assert [(a["name"], b["name"]) for a, b in speedup_pairs(rows)] == [
        ("p0/packed", "p0/padded"), ("rl/packed[4 docs]", "rl/padded[4 docs]"),
        ("rl/packed[2 docs]", "rl/oracle[2 docs]")]


def test_profiler_kernels_are_sorted_into_kinds():
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert kernel_kind("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN") == "matmul"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "matmul"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == "other"


def test_summary_reports_sp_against_its_own_tp_run():
    def row(name, ms, act, tp, sp):
        return {"name": name, "ms": ms, "tokens_per_s": 1.0, "useful_tflops": 1.0, "fraction_of_ceiling": 0.5,
                "peak_memory_gib": 9.0, "activation_memory_gib": act, "padding_fraction": 0.5,
                "part": "tp", "family": "8b", "tp": tp, "sp": sp}

    text = summary([row("tp/8b/tp1_pp1", 4.0, 8.0, 1, False), row("tp/8b/tp4_pp1", 1.2, 4.0, 4, False),
                    row("tp/8b/tp4_sp_pp1", 1.2, 3.0, 4, True)], ceiling=700.0)
    assert "SP on/off at TP=4, 8b: time 1.00 (target <= 1.02), activation memory 0.75" in text
