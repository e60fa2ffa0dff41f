"""The comparison rules of ``splitllama.verify.rules`` on hand-made tensors: what passes, what
fails, and that NaN never passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from splitllama.verify.batches import Microbatch, check_microbatches
from splitllama.verify.rules import BF16_FLOOR_ROUNDINGS, BF16_UNIT_ROUNDOFF, SETUP_FIELDS, _row, compare


def test_bf16_rule_allows_twice_the_oracle_bf16_error_plus_two_roundings():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    oracle_bf16 = ref + torch.tensor([0.0, 0.05, 0.0], dtype=torch.float64)
    # absolute bound: 2 * 0.05 + 2 roundings (2^-8 each) at the scale 4.0
    bound = 2 * 0.05 + BF16_FLOOR_ROUNDINGS * BF16_UNIT_ROUNDOFF * 4.0
    within = ref + torch.tensor([0.0, 0.0, 0.99 * bound], dtype=torch.float64)
    beyond = ref + torch.tensor([0.0, 0.0, 1.01 * bound], dtype=torch.float64)
    assert _row("x", within, ref, torch.bfloat16, oracle_bf16).passed
    assert not _row("x", beyond, ref, torch.bfloat16, oracle_bf16).passed


def test_bf16_floor_alone_is_two_roundings_at_the_scale():
    """An oracle-in-bf16 that happens to be exact (few values, lucky rounding) leaves the
    floor: 2 * 2^-8 of max|ref|."""
    ref = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert _row("x", ref + 0.99 * 2 * 2**-8 * 3.0, ref, torch.bfloat16, ref.clone()).passed
    assert not _row("x", ref + 1.01 * 2 * 2**-8 * 3.0, ref, torch.bfloat16, ref.clone()).passed


def test_nan_never_passes():
    ref = torch.ones(3, dtype=torch.float64)
    prod = torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64)
    assert not _row("x", prod, ref, torch.float64).passed
    assert not _row("x", prod, ref, torch.bfloat16, ref.clone()).passed


def test_exactly_zero_reference_is_judged_at_the_model_gradient_scale():
    zero = torch.zeros(4, dtype=torch.float64)
    noise = torch.full((4,), 1e-7, dtype=torch.float64)
    # bf16: the floor is two bf16 roundings at the largest gradient (here 2.0)
    floor = BF16_FLOOR_ROUNDINGS * BF16_UNIT_ROUNDOFF * 2.0
    assert _row("g", noise, zero, torch.bfloat16, zero.clone(), zero_scale=2.0).passed
    assert not _row("g", torch.full((4,), 1.1 * floor, dtype=torch.float64), zero, torch.bfloat16,
                    zero.clone(), zero_scale=2.0).passed
    # float64 keeps its 1e-9 relative tolerance at that scale
    assert not _row("g", noise, zero, torch.float64, zero_scale=2.0).passed
    assert _row("g", noise * 1e-3, zero, torch.float64, zero_scale=2.0).passed


def _outputs_report(small_error: float, dtype=torch.bfloat16):
    """Two micro-batches of one output: 8 values at scale 4 (bf16 oracle off by 0.05) and
    a single value 1.0 (bf16 oracle exact); production off by ``small_error`` on the single
    value only."""
    big = torch.linspace(-4.0, 4.0, 8, dtype=torch.float64)[None]
    small = torch.ones(1, 1, dtype=torch.float64)
    batches = [Microbatch(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool), None, big, "big"),
               Microbatch(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), None, small, "one")]
    ref = [big, small]
    low = [big + 0.05, small.clone()]
    prod = [big.clone(), small + small_error]
    return compare(prod, ref, {}, {}, batches, "tp1", "value", dtype, low, {})


def test_bf16_output_slices_are_judged_by_the_whole_outputs_rule():
    # the whole output's bound: 2 x 0.05 + two roundings at scale 4 = 0.131 (absolute)
    bound = 2 * 0.05 + BF16_FLOOR_ROUNDINGS * BF16_UNIT_ROUNDOFF * 4.0
    assert _outputs_report(0.99 * bound).passed  # alone, the 1-value slice would allow 0.008
    failed = _outputs_report(1.01 * bound)
    assert [r.name for r in failed.failures()] == ["output[one]"]


def test_float_output_slices_keep_their_own_tolerance():
    assert not _outputs_report(1e-6, torch.float64).passed


def test_report_columns_say_what_they_hold():
    """A row whose absolute error exceeds its relative bound, as a check prints it: the
    header names the bound as relative, beside the relative error it bounds."""
    from splitllama.verify.rules import Report, Row

    report = Report("tp1_pp1", "lm", "float32", [Row("grad lm_head.weight", 1.432e-4, 4.105e-7, 1e-4, True)])
    lines = report.table().splitlines()
    legend = next(i for i, line in enumerate(lines) if line.startswith("abs_err ="))
    assert "rel_err = abs_err / max |oracle|" in lines[legend] and "rel_err <= rel_bound" in lines[legend]
    assert lines[legend + 1].split() == ["tensor", "abs_err", "rel_err", "rel_bound", "result"]
    assert json.loads(report.to_json())["rows"][0]["rel_bound"] == 1e-4


def test_the_docs_explain_every_report_field_and_row_name():
    """A report's header fields and its rows' micro-batch names are explained where the
    report points users (docs/verification.md, "Reading a report")."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "verification.md").read_text()
    section = text[text.index("## Reading a report"):text.index("## The bf16 rule")]
    names = {mb.name for head in ("lm", "value") for mb in check_microbatches(16, head, multiple_of=1)}
    for name in (*SETUP_FIELDS, *names, "output[NAME]", "grad NAME", "randomK"):
        assert f"`{name}`" in section, name
