"""Every equivalence check has been shown to fail on a planted bug, and keeps being shown.

Each case applies one bug from ``planted_bugs.PLANTED`` and asserts that the check that
guards against it now FAILS, on every rank (the parity verdict is all-reduced)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from splitllama.attention import select_backend
from splitllama.config import CustomSplitLlamaConfig
from splitllama.logprobs import vocab_parallel_entropy, vocab_parallel_log_probs
from splitllama.distributed import setup_parallel
from splitllama.verify.runner import agree, run_parity
from tests.integration.conftest import DEVICE, DTYPE, world_size
from tests.integration.layouts import LAYOUTS
from tests.integration.planted_bugs import PLANTED
from tests.integration.test_attention_backends import attention_backends_agree
from tests.integration.test_checkpoints import loader_refuses, round_trip_mismatches
from tests.integration.test_dist_checkpoints import declaration_problems, dist_round_trip_mismatches, reshard_loads
from tests.integration.test_fused_logprobs import fused_head_agrees, fused_head_main_grad_agrees
from tests.integration.test_input_validation import BAD_VALUES, out_of_range_refused
from tests.integration.test_rope_bands import rope_bands_checkpoint, rope_bands_parity, rope_matches_transformers
from tests.integration.test_thd_contract import thd_matches_packed
from tests.integration.test_training_step import training_step_passes
from tests.integration.test_parity import (
    edge_case_microbatches,
    log_prob_microbatches,
    odd_vocab_config,
    odd_vocab_log_prob_microbatches,
    recompute_placement_problems,
)
from tests.integration.test_tensor_parallel_marks import tensor_parallel_mark_problems


def _backend_missing(bug) -> list:
    """A skip mark for a bug in an attention backend the dispatch point does not choose here."""
    if bug.backend is None or select_backend(torch.device(DEVICE), DTYPE) == bug.backend:
        return []
    return [pytest.mark.skip(reason=f"the attention backend here is not {bug.backend}")]


def planted_cases():
    cases = [
        pytest.param(bug, name, id=f"{bug.name}-{name}", marks=_backend_missing(bug))
        for bug in PLANTED for name in bug.layouts if LAYOUTS[name].world_size == world_size()
    ]
    return cases or [pytest.param(None, None, id="none", marks=pytest.mark.skip(
        reason=f"no planted bug has a layout for {world_size()} process(es)"))]


def large_logits_agree(layout) -> bool:
    """Vocab-parallel log-probs and entropy of logits around +-3000 (exp overflows even
    in float64) against log_softmax of the gathered logits, float64, rel 1e-9."""
    setup_parallel(layout, DEVICE)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(6, 64, generator=gen, dtype=torch.float64) * 3000
    labels = torch.randint(0, 64, (6,), generator=gen)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    local = full.chunk(tp, dim=-1)[rank]
    log_probs, entropy = vocab_parallel_log_probs(local, labels), vocab_parallel_entropy(local)
    ref = torch.log_softmax(full, -1)
    ref_lp, ref_ent = ref.gather(-1, labels[:, None])[:, 0], -(ref.exp() * ref).sum(-1)
    ok = all(
        bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= 1e-9 * float(want.abs().max().clamp(min=1))
        for got, want in ((log_probs, ref_lp), (entropy, ref_ent))
    )
    return agree(ok)


def _parity_agrees(bug, layout, ckpt, scratch_dir) -> bool:
    # "log_probs": the models' log-prob path (the fused head by default) on labelled batches
    batches = log_prob_microbatches() if bug.check == "log_probs" else edge_case_microbatches(bug.head)
    report = run_parity(ckpt, CustomSplitLlamaConfig.from_pretrained(ckpt), layout, bug.head, DTYPE, DEVICE,
                        batches, bug.options, padded=bug.padded)
    return report.passed  # already agreed by every rank


def _parity_checkpoint(bug, factory) -> str:
    config = bug.config() if bug.config else None
    return factory(bug.head, bug.mlp, config=config, name=bug.name if config else None)


def _odd_vocab_checkpoint(bug, factory, dtype=None) -> str:
    if dtype is None:
        return factory("lm", False, config=odd_vocab_config(), name="odd_vocab")
    return factory("lm", False, config=odd_vocab_config(), name=f"odd_vocab-{dtype}", dtype=dtype)


INPUT_RANGE_CASES = [(case, padded) for case in sorted(BAD_VALUES) for padded in (False, True)]

# check kind -> (its inputs, made before the bug is planted; whether the check passes).
# Each "passes" is collective: every rank returns the same verdict.
CHECKS = {
    "parity": (_parity_checkpoint, _parity_agrees),
    "log_probs": (_parity_checkpoint, _parity_agrees),
    "round_trip": (lambda bug, f: f(bug.head, bug.mlp, name=f"round-trip-{DTYPE}", dtype=DTYPE),
                   lambda bug, layout, ckpt, scratch: agree(not round_trip_mismatches(ckpt, layout, bug.head, scratch))),
    "odd_vocab_round_trip": (lambda bug, f: _odd_vocab_checkpoint(bug, f, DTYPE),
                             lambda bug, layout, ckpt, scratch: agree(not round_trip_mismatches(ckpt, layout, "lm",
                                                                                               scratch))),
    "odd_vocab": (_odd_vocab_checkpoint, lambda bug, layout, ckpt, scratch: run_parity(
        ckpt, CustomSplitLlamaConfig.from_pretrained(ckpt), layout, "lm", DTYPE, DEVICE,
        odd_vocab_log_prob_microbatches(), bug.options).passed),
    "dist_round_trip": (lambda bug, f: f(bug.head, bug.mlp, name=f"round-trip-{DTYPE}", dtype=DTYPE),
                        lambda bug, layout, ckpt, scratch: not dist_round_trip_mismatches(
                            ckpt, layout, reshard_loads(layout), bug.head, scratch)),
    "dist_declaration": (lambda bug, f: f(bug.head, bug.mlp),
                         lambda bug, layout, ckpt, scratch: not declaration_problems(ckpt, layout, bug.head)),
    "fused_head": (lambda bug, f: None, lambda bug, layout, ckpt, scratch: fused_head_agrees(layout)),
    "attention_backends": (lambda bug, f: None,
                           lambda bug, layout, ckpt, scratch: attention_backends_agree(layout)),
    "large_logits": (lambda bug, f: None, lambda bug, layout, ckpt, scratch: large_logits_agree(layout)),
    "rope_parity": (lambda bug, f: rope_bands_checkpoint(f),
                    lambda bug, layout, ckpt, scratch: rope_bands_parity(ckpt, layout).passed),
    "rope_transformers": (lambda bug, f: None, lambda bug, layout, ckpt, scratch: all(
        rope_matches_transformers(stack) for stack in ("lower", "upper"))),
    "main_grad": (lambda bug, f: None, lambda bug, layout, ckpt, scratch: fused_head_main_grad_agrees(layout)),
    "training": (_parity_checkpoint, lambda bug, layout, ckpt, scratch: training_step_passes(
        ckpt, layout, bug.head, distributed_optimizer=False).passed),
    "loader_config": (lambda bug, f: f("lm", False), lambda bug, layout, ckpt, scratch: all(
        loader_refuses(ckpt, layout, case) for case in ("lower_eps", "upper_eps"))),
    "input_range": (lambda bug, f: f("lm", False), lambda bug, layout, ckpt, scratch: all(
        out_of_range_refused(ckpt, layout, case, padded) for case, padded in INPUT_RANGE_CASES)),
    "thd": (lambda bug, f: f("lm", False), lambda bug, layout, ckpt, scratch: thd_matches_packed(ckpt, layout)),
    "recompute_placement": (lambda bug, f: None, lambda bug, layout, ckpt, scratch: not recompute_placement_problems()),
    "tensor_parallel_marks": (lambda bug, f: None, lambda bug, layout, ckpt, scratch: all(
        agree(not tensor_parallel_mark_problems(layout, head, mlp)) for head, mlp in (("lm", True), ("value", False)))),
}


def _verl():
    """test_verl's checks, imported when a verl check runs (skipped without verl)."""
    pytest.importorskip("mbridge")
    pytest.importorskip("verl.workers.engine_workers")
    from tests.integration import test_verl

    return test_verl


CHECKS.update({
    "verl_export": (lambda bug, f: f("lm", False), lambda bug, layout, ckpt, scratch: _verl().export_matches(
        ckpt, layout, "lm")[0]),
    "verl_odd_vocab": (lambda bug, f: _verl().verl_checkpoint(f, config=odd_vocab_config(), name="verl-odd-vocab"),
                       lambda bug, layout, ckpt, scratch: _verl().verl_agrees(ckpt, layout, "lm")[0]),
    # verl's actor with use_fused_kernels: verl passes labels and its temperature to the model
    "verl_fused": (lambda bug, f: _verl().verl_checkpoint(f), lambda bug, layout, ckpt, scratch: _verl().verl_agrees(
        ckpt, layout, "lm", {"use_fused_kernels": True})[0]),
    "verl_float32_temperature": (lambda bug, f: _verl().verl_checkpoint(f, config=odd_vocab_config(),
                                                                       name="verl-odd-vocab"),
                                 lambda bug, layout, ckpt, scratch: _verl().float32_temperature_agrees(ckpt, layout)[0]),
})
# Checks that nothing else in the gate runs without a bug: shown here to pass first, so
# that "fails with the bug" means the bug, not a broken check. The parity and round-trip
# checks pass in test_parity.py / test_checkpoints.py on the same layouts.
SHOWN_TO_PASS_HERE = {"fused_head", "large_logits", "loader_config", "input_range"}


@pytest.mark.parametrize("bug,layout_name", planted_cases())
def test_planted_bug_is_caught(bug, layout_name, monkeypatch, checkpoint_factory, scratch_dir):
    layout = LAYOUTS[layout_name]
    prepare, passes = CHECKS[bug.check]
    ckpt = prepare(bug, checkpoint_factory)
    if bug.check in SHOWN_TO_PASS_HERE:
        assert passes(bug, layout, ckpt, scratch_dir), "the check itself must pass without the bug"
    bug.plant(monkeypatch)
    assert not passes(bug, layout, ckpt, scratch_dir), \
        f"planted bug {bug.name} ({bug.why}) went unnoticed at {layout_name}"
    dist.barrier()
