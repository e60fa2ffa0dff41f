"""The production models refuse token ids and labels outside the vocabulary.

Without the check, an out-of-range id is no error at TP > 1: the vocab-parallel
embedding zeroes ids outside each rank's shard, so the model returns finite, wrong
logits. The refusal is therefore the only thing that stands between a bad id and a silent
wrong answer (``planted_bugs``: ``input_range_check_removed``)."""

from __future__ import annotations

import pytest
import torch

from splitllama.checkpoints import load_checkpoint
from splitllama.config import CustomSplitLlamaConfig
from splitllama.distributed import agree, setup_parallel
from splitllama.verify.runner import build_production
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import layouts

# case -> (field, bad value at a valid position); the error must name the field and the range
BAD_VALUES = {
    "input_id_equal_to_vocab": ("input_ids", 256),
    "negative_input_id": ("input_ids", -1),
    "label_equal_to_vocab": ("labels", 256),
    "negative_label": ("labels", -3),
}


def out_of_range_refused(ckpt: str, layout, case: str, padded: bool) -> bool:
    """Whether the model at ``layout`` refuses the bad value of ``case`` (at a valid
    position) with a ValueError that names the field and the vocabulary, on every rank."""
    field, value = BAD_VALUES[case]
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    setup_parallel(layout, DEVICE)
    (model,) = build_production(config, layout, "lm", DTYPE, DEVICE, padded=padded)
    load_checkpoint(model, ckpt, progress=False)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=gen)
    labels = ids.roll(-1, 1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    (ids if field == "input_ids" else labels)[1, 3] = value
    device_args = [t.to(DEVICE) for t in (ids, mask)]
    try:
        if field == "labels":
            model.log_probs_and_entropy(*device_args, labels.to(DEVICE))
        else:
            model(*device_args)
    except ValueError as err:
        return agree(f"{field} at valid positions must lie in [0, vocab_size={config.vocab_size})" in str(err))
    return agree(False)


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
@pytest.mark.parametrize("layout", layouts("tp1", "tp2", "tp2_sp"))
def test_out_of_range_ids_and_labels_are_refused(layout, case, padded, checkpoint_factory):
    assert out_of_range_refused(checkpoint_factory("lm", False), layout, case, padded)


@pytest.mark.parametrize("layout", layouts("tp1", "tp2"))
def test_out_of_range_ids_at_padded_positions_are_ignored(layout, checkpoint_factory):
    """Only valid positions are checked: padding may hold any id (e.g. -100)."""
    ckpt = checkpoint_factory("lm", False)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    setup_parallel(layout, DEVICE)
    (model,) = build_production(config, layout, "lm", DTYPE, DEVICE)
    load_checkpoint(model, ckpt, progress=False)
    ids = torch.tensor([[-100, 5, 6, 7], [1, 2, 3, 300]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    out = model(ids.to(DEVICE), mask.to(DEVICE))
    assert torch.isfinite(out).all() and (out[~mask.to(out.device)] == 0).all()


@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp"))
def test_value_model_refuses_log_probs(layout, checkpoint_factory):
    ckpt = checkpoint_factory("value", False)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    setup_parallel(layout, DEVICE)
    (model,) = build_production(config, layout, "value", DTYPE, DEVICE)
    load_checkpoint(model, ckpt, progress=False)
    ids = torch.tensor([[1, 2, 3, 4]], device=DEVICE)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="log-probabilities and entropy need an LM head"):
        model.log_probs_and_entropy(ids, mask, ids)
