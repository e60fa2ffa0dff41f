"""Production == oracle, outputs and every parameter's gradient, on every layout of the table.

Each test builds the production model at a layout, loads the same random split checkpoint
into it and into the oracle, runs the micro-batches through both with the same loss, and
compares (``splitllama.verify``: float64 tolerance 1e-9 relative on CPU; the bf16
error-ratio rule on GPU). Every rank builds the same report; the verdict is all-reduced,
so a failure fails every rank.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitllama.config import CustomSplitLlamaConfig

from splitllama.verify.tiny import tiny_split_config
from splitllama.options import ModelOptions
from splitllama.verify.batches import Microbatch
from splitllama.verify.runner import oracle_reference, run_parity
from tests.cases import EDGE_MASKS, caller_position_ids, long_row_mask, masks, random_input_ids
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import LAYOUTS, STAGE_PLACEMENTS, layouts

VOCAB = 256  # the tiny presets' vocabulary


def microbatch(mask: torch.Tensor, head: str, seed: int, name: str = "", positions: bool = False,
               labels: bool = False, vocab: int = VOCAB, hidden: int | None = None,
               temperature: float | None = None) -> Microbatch:
    """``hidden``: probe the trunk's final hidden states ``[B, S, hidden]`` instead of the head;
    ``temperature``: of the labels' log-probs and entropy."""
    gen = torch.Generator().manual_seed(seed)
    ids = random_input_ids(mask, vocab, seed)
    pos = caller_position_ids(mask, seed) if positions else None
    if labels:
        return Microbatch(ids, mask, pos, torch.randn(*mask.shape, 2, generator=gen), name, ids.roll(-1, 1),
                          temperature)
    shape = (*mask.shape, vocab) if head == "lm" else mask.shape
    if hidden is not None:
        shape = (*mask.shape, hidden)
    return Microbatch(ids, mask, pos, torch.randn(*shape, generator=gen), name)


def edge_case_microbatches(head: str, hidden: int | None = None) -> list[Microbatch]:
    """The explicit edge cases (docs/verification.md) as micro-batches of different lengths (also what the
    pipeline schedule must cope with): all-padding rows and batch, no padding, single-token
    rows, max_seqlen 1, padding inside rows, an odd token count (SP padding), caller
    position_ids that differ from the default."""
    batches = [microbatch(mask, head, seed, name, hidden=hidden) for seed, (name, mask) in enumerate(EDGE_MASKS.items())]
    batches.append(microbatch(EDGE_MASKS["left_right_inside"], head, 98, "caller_positions", positions=True,
                              hidden=hidden))
    batches.append(microbatch(EDGE_MASKS["empty_row"], head, 99, "caller_positions_empty_row", positions=True,
                              hidden=hidden))
    return batches  # an even count: megatron's interleaved schedule wants a multiple of pp


def assert_passed(report) -> None:
    assert report.passed, "production differs from the oracle:\n" + "\n".join(
        f"{r.name}: rel_err {r.max_rel:.3e} > rel_bound {r.rel_bound:.3e}" for r in report.failures()
    )


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("head", ["lm", "value"])
@pytest.mark.parametrize("layout", layouts())
def test_edge_cases(layout, head, mlp, checkpoint_factory):
    ckpt = checkpoint_factory(head, mlp)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    assert_passed(run_parity(ckpt, config, layout, head, DTYPE, DEVICE, edge_case_microbatches(head)))


# The registry's classes without pipeline stages (the PP classes are the pp* layouts above).
NO_PP_LAYOUTS = ("tp1", "tp2", "tp2_sp")


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("layout", layouts(*NO_PP_LAYOUTS))
def test_padded_causal_lm_edge_cases(layout, mlp, checkpoint_factory):
    """The padded ``ParallelCustomSplitLLamaForCausalLM`` (padded attention path):
    logits, and log-probs with entropy, forward and backward."""
    ckpt = checkpoint_factory("lm", mlp)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    batches = edge_case_microbatches("lm") + [
        microbatch(EDGE_MASKS["left_right_inside"], "lm", 1, "log_probs_mixed", labels=True),
        microbatch(EDGE_MASKS["empty_row"], "lm", 2, "log_probs_empty_row", labels=True, positions=True),
    ]
    assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, batches, padded=True))


@pytest.mark.parametrize("padded", [True, False], ids=["ParallelCustomSplitLLamaModel",
                                                       "ParallelCustomSplitLLamaModelRmPad"])
@pytest.mark.parametrize("layout", layouts(*NO_PP_LAYOUTS))
def test_trunk_final_hidden_states(layout, padded, checkpoint_factory):
    """The trunks against the oracle trunk's final hidden state (after the final norm),
    forward and backward, through a probe on the hidden states."""
    ckpt = checkpoint_factory("lm", True)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    batches = edge_case_microbatches("lm", hidden=config.h_hi)
    assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, batches, padded=padded, trunk=True))


def log_prob_microbatches() -> list[Microbatch]:
    """Next-token labels on rows with padding left/right/inside (at a temperature below 1,
    as RL rollouts are sampled; exact in binary), an empty row, an all-padding batch and
    single-token rows (at temperature 1)."""
    return [
        microbatch(EDGE_MASKS["left_right_inside"], "lm", 1, "mixed", labels=True, temperature=0.75),
        microbatch(EDGE_MASKS["empty_row"], "lm", 2, "empty_row", labels=True),
        microbatch(EDGE_MASKS["all_padding_batch"], "lm", 3, "all_padding", labels=True),
        microbatch(EDGE_MASKS["single_token_rows"], "lm", 4, "single_tokens", labels=True),
    ]


@pytest.mark.parametrize("log_probs", ["fused", "materialise"])
@pytest.mark.parametrize("layout", layouts())
def test_log_probs_and_entropy(layout, log_probs, checkpoint_factory):
    """Log-probs of given tokens and entropy (never gathering the vocabulary), by the
    fused head and by the materialising one, equal log_softmax of the oracle, values and
    gradients."""
    ckpt = checkpoint_factory("lm", False)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, log_prob_microbatches(),
                             ModelOptions(log_probs=log_probs)))


@pytest.mark.parametrize("log_probs", ["fused", "materialise"])
@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp"))
def test_log_probs_of_the_padded_class(layout, log_probs, checkpoint_factory):
    """The padded class scores the same labels; labels at padded positions are arbitrary
    (-100 here, as callers mask them) and must not reach the head."""
    ckpt = checkpoint_factory("lm", False)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    batches = log_prob_microbatches()
    for mb in batches:
        mb.labels = torch.where(mb.attention_mask, mb.labels, -100)
    assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, batches,
                             ModelOptions(log_probs=log_probs), padded=True))


@st.composite
def drawn_microbatches(draw, head: str):
    # even and >= 4: what the interleaved schedule accepts at pp=2 (run_pipeline says why)
    count = draw(st.sampled_from([4, 6]))
    out = []
    for k in range(count):
        mask = draw(masks(max_batch=3, max_seq=16))
        positions = draw(st.booleans())
        out.append(microbatch(mask, head, draw(st.integers(0, 2**16)), f"drawn{k}", positions=positions))
    return out


@pytest.mark.parametrize("layout", layouts())
def test_drawn_masks(layout, checkpoint_factory):
    """Hypothesis draws masks (padding left/right/both/inside/none, empty rows, single
    tokens) and caller position_ids; the ci profile is derandomized, so every rank draws
    the same examples."""
    ckpt = checkpoint_factory("lm", True)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)

    @settings(max_examples=4)
    @given(drawn_microbatches("lm"))
    def check(batches):
        assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, batches))

    check()


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp", "pp2_cut_adapter", "tp2_sp_pp2"))
def test_activation_recompute(layout, recompute, checkpoint_factory):
    """Megatron's activation recompute (selective: the MLP; full: every layer) changes what
    is stored for backward, never a gradient."""
    ckpt = checkpoint_factory("lm", True)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    batches = edge_case_microbatches("lm")
    assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, batches, ModelOptions(recompute=recompute)))


def recomputed_layers(block) -> list[bool]:
    """Per layer of a megatron ``TransformerBlock``: recomputed in backward (its
    ``_checkpointed_forward``: ``uniform`` checkpoints every group of
    ``recompute_num_layers``, here 1; ``block`` the first ``recompute_num_layers``)."""
    config, count = block.config, len(block.layers)
    if config.recompute_granularity != "full":
        return [False] * count
    if config.recompute_method == "uniform":
        return [True] * count
    return [k < config.recompute_num_layers for k in range(count)]


def recompute_placement_problems() -> list[str]:
    """Full recompute must recompute every layer but the model's last, and that one only
    where its backward follows its forward at once: the head's stage without an
    interleaved pipeline (recomputing it there would save no memory; with vpp, or on any
    other stage, keeping a layer holds its activations for nothing). Checked on every stage
    of every ``STAGE_PLACEMENTS`` layout, each stage's trunk built in this process (the
    placement is decided when the trunk is built; nothing runs)."""
    from splitllama.distributed import setup_parallel
    from splitllama.megatron_configs import megatron_config
    from splitllama.model import ParallelCustomSplitLLamaModelRmPad

    setup_parallel(LAYOUTS["tp1"], DEVICE)
    config = tiny_split_config()
    problems = []
    for name, placement in STAGE_PLACEMENTS.items():
        mc = megatron_config(placement, DTYPE, DEVICE)
        for stage in placement.validate(config):
            trunk = ParallelCustomSplitLLamaModelRmPad(config, mc, stage, recompute="full")
            kept = {stack: [not flag for flag in recomputed_layers(block)]
                    for stack, block in (("lower", trunk.lower), ("upper", trunk.upper)) if block is not None}
            model_last = stage.has_head and (placement.vpp or 1) == 1
            upper = len(stage.upper_layers)
            expected = {"lower": [False] * len(stage.lower_layers),
                        "upper": [False] * (upper - 1) + [model_last] if upper else []}
            expected = {stack: flags for stack, flags in expected.items() if flags}
            if kept != expected:
                problems.append(f"{name} stage {stage.virtual_stage}: layers kept (not recomputed) {kept}, "
                                f"expected {expected}")
    return problems


@pytest.mark.parametrize("layout", layouts("tp1"))
def test_full_recompute_keeps_only_the_model_last_layer(layout):
    problems = recompute_placement_problems()
    assert not problems, "\n".join(problems)


def long_row_config() -> CustomSplitLlamaConfig:
    """Two heads per stack, so the padded oracle's float64 attention of a 4097-token row
    ([heads, S, S] = 2 x 4097^2, 270 MB) stays cheap on 2 CPU cores. The stacks keep the
    tiny model's differing rope and eps settings."""
    small = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=56)
    return tiny_split_config(lower=dict(small, num_hidden_layers=2), upper=dict(small, num_hidden_layers=3))


# checkpoint directory -> the oracle's outputs and gradients on the long row: its padded
# float64 attention is O(S^2) (most of the test's time), and the layouts of one world size
# compare with the same numbers, so each process computes them once. Only this test reads
# it; every other parity check, planted-bug checks included, runs its oracle afresh.
_LONG_ROW_REFERENCE: dict[str, tuple] = {}


@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp", "pp2_cut_adapter"))
def test_row_longer_than_4096(layout, checkpoint_factory):
    ckpt = checkpoint_factory("value", False, config=long_row_config(), name="long")
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    batches = [microbatch(long_row_mask(4097, batch=1), "value", 7, "4097")]
    if ckpt not in _LONG_ROW_REFERENCE:
        _LONG_ROW_REFERENCE[ckpt] = oracle_reference(ckpt, "value", DEVICE, batches)
    report = run_parity(ckpt, config, layout, "value", DTYPE, DEVICE, batches, reference=_LONG_ROW_REFERENCE[ckpt])
    assert_passed(report)


ODD_VOCAB = 301  # prime: no TP > 1 divides it, so the embedding and LM head are padded


def odd_vocab_config(mlp: bool = False) -> CustomSplitLlamaConfig:
    config = tiny_split_config(mlp=mlp)
    config.vocab_size = ODD_VOCAB
    return config


@pytest.mark.parametrize("head", ["lm", "value"])
@pytest.mark.parametrize("layout", layouts())
def test_odd_vocabulary(layout, head, checkpoint_factory):
    """A vocabulary TP does not divide: padded rows change no output and no real gradient
    (logits, values and the gathered gradients, which hold exactly the real rows)."""
    ckpt = checkpoint_factory(head, False, config=odd_vocab_config(), name="odd_vocab")
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    assert config.vocab_size == ODD_VOCAB
    batches = [microbatch(mask, head, seed, name, vocab=ODD_VOCAB)
               for seed, (name, mask) in enumerate(EDGE_MASKS.items())]
    batches = batches[: len(batches) // 2 * 2]  # an even count for the interleaved schedule
    assert_passed(run_parity(ckpt, config, layout, head, DTYPE, DEVICE, batches))


def odd_vocab_log_prob_microbatches() -> list[Microbatch]:
    # four: the interleaved schedule on CPU needs 2 * pp micro-batches
    return [
        microbatch(EDGE_MASKS["left_right_inside"], "lm", 1, "mixed", labels=True, vocab=ODD_VOCAB),
        microbatch(EDGE_MASKS["single_token_rows"], "lm", 4, "single_tokens", labels=True, vocab=ODD_VOCAB),
        microbatch(EDGE_MASKS["empty_row"], "lm", 2, "empty_row", labels=True, vocab=ODD_VOCAB),
        microbatch(EDGE_MASKS["odd_token_count"], "lm", 3, "odd_tokens", labels=True, vocab=ODD_VOCAB),
    ]


@pytest.mark.parametrize("layout", layouts())
def test_odd_vocabulary_log_probs(layout, checkpoint_factory):
    """Log-probs and entropy with padded vocabulary columns left out of the log-sum-exp."""
    ckpt = checkpoint_factory("lm", False, config=odd_vocab_config(), name="odd_vocab")
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, odd_vocab_log_prob_microbatches()))


@pytest.mark.parametrize("layout", layouts("tp1", "tp2", "tp2_sp"))
def test_odd_vocabulary_padded_class(layout, checkpoint_factory):
    """The padded (seed) class: full logits [B, S, V] gathered, padding sliced off."""
    ckpt = checkpoint_factory("lm", False, config=odd_vocab_config(), name="odd_vocab")
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    batches = [microbatch(EDGE_MASKS["left_right_inside"], "lm", 1, "mixed", vocab=ODD_VOCAB),
               microbatch(EDGE_MASKS["left_right_inside"], "lm", 2, "mixed_lp", labels=True, vocab=ODD_VOCAB)]
    assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, batches, padded=True))


@pytest.mark.parametrize("layout", layouts())
def test_odd_vocabulary_padded_as_megatron_does(layout, checkpoint_factory):
    """make_vocab_size_divisible_by=128 (megatron's default): 301 rows padded to 128 * tp,
    so at TP=2 the last rank holds 45 real rows and 211 padding rows. Logits through the
    vocab-parallel pipeline output (padding at -inf) and log-probs, values and gradients."""
    ckpt = checkpoint_factory("lm", False, config=odd_vocab_config(), name="odd_vocab")
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    batches = [microbatch(EDGE_MASKS["left_right_inside"], "lm", 5, "mixed", vocab=ODD_VOCAB),
               microbatch(EDGE_MASKS["empty_row"], "lm", 6, "empty_row", vocab=ODD_VOCAB),
               *odd_vocab_log_prob_microbatches()[:2]]
    assert_passed(run_parity(ckpt, config, layout, "lm", DTYPE, DEVICE, batches,
                             ModelOptions(make_vocab_size_divisible_by=128)))
