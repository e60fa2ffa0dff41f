"""splitllama bench without a GPU: the useful-FLOP count reproduces the hand-computed
figures of docs/verification.md, and the workload, pairing, profiler sorting and summary behave."""

from __future__ import annotations

import pytest
import torch

from splitllama.options import ModelOptions
from splitllama.bench import (
    MAX_TOKENS_LIMIT,
    PART_FUNCTIONS,
    PARTS,
    BenchSettings,
    kernel_kind,
    max_tokens_row,
    recompute_ladder,
)
from splitllama.bench_report import backend_pairs, head_pairs, speedup_pairs, summary
from splitllama.bench_workload import ENTROPY_COEF, actor_step, bench_config, make_batch, rl_lengths, useful_flops


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


def test_every_part_has_a_function():
    assert set(PARTS) - {"ceiling"} == set(PART_FUNCTIONS)


def _timed(name, part, ms, peak, log_probs, tokens=16384):
    return {"name": name, "ms": ms, "tokens_per_s": tokens / ms * 1e3, "useful_tflops": 1.0,
            "fraction_of_ceiling": 0.5, "peak_memory_gib": peak, "activation_memory_gib": peak / 2,
            "padding_fraction": 0.5, "real_tokens": tokens, "part": part, "log_probs": log_probs}


def test_summary_reports_fused_against_materialising_and_max_tokens():
    rows = [
        _timed("head/fused", "head", 90.0, 30.0, "fused"),
        _timed("head/materialise", "head", 100.0, 60.0, "materialise"),
        max_tokens_row("fused", _timed("max_tokens/fused[131072]", "max_tokens", 700.0, 120.0, "fused", 131100),
                       262144),
        max_tokens_row("materialise", None, 16384),
        max_tokens_row("fused", _timed("x", "max_tokens", 1.0, 1.0, "fused", MAX_TOKENS_LIMIT), None),
    ]
    assert [(f["name"], m["name"]) for f, m in head_pairs(rows)] == [("head/fused", "head/materialise")]
    text = summary(rows, ceiling=700.0)
    assert ("fused vs materialising step time at 16384 tokens (entropy on): 0.90x (target <= 0.95), "
            "peak memory 0.50x") in text
    assert "max tokens fused: 131100 real tokens, 700.0 ms, 120.0 GiB peak (out of memory at 262144)" in text
    assert "max tokens materialise: none fits (out of memory at 16384)" in text
    assert f"stopped at the {MAX_TOKENS_LIMIT}-token limit" in text
    assert text.count("max_tokens/") == 0  # not in the table: its rows have no table columns


def test_actor_step_backpropagates_log_probs_and_entropy():
    calls = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def log_probs_and_entropy(self, input_ids, attention_mask, labels, entropy):
            calls["entropy"] = entropy
            lp = self.w * torch.ones(attention_mask.shape)
            return lp, (2 * self.w * torch.ones(attention_mask.shape) if entropy else None)

    gen = torch.Generator().manual_seed(0)
    batch = make_batch([3, 5], 100, gen, "cpu")
    model = Model()
    actor_step(model, batch)()
    assert calls["entropy"] is True
    assert float(model.w.grad) == pytest.approx(8 * (1 + 2 * ENTROPY_COEF))


def test_max_tokens_doubles_until_out_of_memory(monkeypatch):
    from splitllama import bench

    fits = {"fused": 70000, "materialise": 20000}
    built = []

    def fake_measure(name, step, batch, config, ceiling, settings, gpus=1):
        path = name.split("/")[1].split("[")[0]
        tokens = sum(batch.lengths)
        if tokens > fits[path]:
            return {"name": name, "error": "out of memory", "real_tokens": tokens}
        return {"name": name, "ms": tokens / 1000, "peak_memory_gib": tokens / 1e4, "tokens_per_s": 1e6,
                "real_tokens": tokens}

    monkeypatch.setattr(bench.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(bench, "build", lambda cls, config, layout, options: built.append(options.log_probs))
    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "make_batch", lambda lengths, vocab, gen, device: make_batch(lengths, vocab, gen, "cpu"))
    rows = bench.part_max_tokens(bench_config("8b", 1, 1), 700.0, BenchSettings(tokens=8192), None)
    assert built == ["fused", "materialise"]
    fused, materialise = rows
    # 8192, 16384, ... ; documents are drawn until the target count, so the real count overshoots a little
    assert 65536 <= fused["largest_tokens"] <= 70000 and fused["out_of_memory_at"] == 131072
    assert 16384 <= materialise["largest_tokens"] <= 20000 and materialise["out_of_memory_at"] == 32768


def test_head_and_recompute_parts_time_each_variant_on_one_batch(monkeypatch):
    from splitllama import bench

    built, batches = [], []

    def fake_measure(name, step, batch, config, ceiling, settings, gpus=1):
        batches.append(batch)
        return {"name": name, "ms": 100.0 + len(batches), "activation_memory_gib": 10.0 / len(batches),
                "peak_memory_gib": 20.0, "real_tokens": sum(batch.lengths)}

    monkeypatch.setattr(bench.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(bench, "build", lambda cls, config, layout, options: built.append(options))
    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "make_batch", lambda lengths, vocab, gen, device: make_batch(lengths, vocab, gen, "cpu"))
    settings = BenchSettings(tokens=2048, repeats=1, warmup=0)
    config = bench_config("8b", 1, 1)
    head = bench.part_head(config, 700.0, settings, torch.Generator().manual_seed(0))
    assert [r["name"] for r in head] == ["head/fused", "head/materialise"]
    assert built == [ModelOptions(recompute="none", log_probs="fused"),
                     ModelOptions(recompute="none", log_probs="materialise")]
    assert batches[0] is batches[1], "both paths must run on the same documents"
    assert [(f["name"], m["name"]) for f, m in head_pairs(head)] == [("head/fused", "head/materialise")]
    rows = bench.part_recompute(config, 700.0, settings, torch.Generator().manual_seed(0))
    assert [(r["name"], r["recompute"]) for r in rows] == [
        ("recompute/none", "none"), ("recompute/selective", "selective"), ("recompute/full", "full")]
    assert rows[0]["time_vs_none"] == 1.0 and rows[2]["activation_memory_vs_none"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("fields,message", [
    (dict(tokens=0), "tokens must be a positive int, got 0"),
    (dict(warmup=-1), "warmup must be a non-negative int"),
    (dict(recompute="sometimes"), "recompute='sometimes' is not one of"),
])
def test_bench_settings_are_refused_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        BenchSettings(**fields)


def test_long_part_pairs_kernels_on_the_same_batch_and_setting():
    def long(batch, backend, recompute, ms, **extra):
        return {**_timed(f"long/{batch}/{backend}", "long", ms, 40.0, None), "batch": batch, "backend": backend,
                "recompute": recompute, **extra}

    rows = [long("rl26docs", "torch_varlen", "none", 100.0), long("rl26docs", "flash_attn_4", "none", 97.0),
            {"name": "long/1x32768/torch_varlen", "error": "out of memory", "part": "long", "batch": "1x32768",
             "backend": "torch_varlen", "recompute": "none"},
            long("1x32768", "torch_varlen", "selective", 600.0), long("1x32768", "flash_attn_4", "selective", 500.0),
            long("4x32768", "flash_attn_4", "full", 9000.0, longest=True)]
    assert [(a["name"], b["name"], a["recompute"]) for a, b in backend_pairs(rows)] == [
        ("long/rl26docs/torch_varlen", "long/rl26docs/flash_attn_4", "none"),
        ("long/1x32768/torch_varlen", "long/1x32768/flash_attn_4", "selective")]
    text = summary(rows, ceiling=700.0)
    assert "flash_attn_4 vs torch_varlen at rl26docs (recompute none): 1.031x faster (target >= 1.02)" in text
    assert "flash_attn_4 vs torch_varlen at 1x32768 (recompute selective): 1.200x faster (target >= 1.15)" in text
    assert "4x32768 with flash_attn_4, recompute full: fits: 9000 ms" in text


def test_recompute_ladder_goes_from_the_given_setting_to_heavier_ones():
    assert recompute_ladder("none") == ["none", "selective", "full"]
    assert recompute_ladder("selective") == ["selective", "full"]
