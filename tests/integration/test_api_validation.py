"""The Python API refuses bad input with a ``ValueError`` naming the field, as the CLI does:
model construction, ``load_checkpoint`` and ``forward``'s inputs (one process).

``forward`` takes no float input (ids, mask, positions and labels are integer or bool
tensors), so there is no NaN to refuse; a float tensor where ids are expected is refused
by dtype. The loader's refusals of missing, unexpected and mis-shaped tensors are in
test_checkpoints.py."""

from __future__ import annotations

import pytest
import torch

from splitllama.checkpoints import load_checkpoint
from splitllama.config import tiny_split_config
from splitllama.distributed import megatron_config, setup_parallel
from splitllama.layout import ParallelLayout
from splitllama.model import ParallelCustomSplitLLamaForCausalLM, ParallelCustomSplitLLamaForCausalLMRmPad
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import layouts

pytestmark = pytest.mark.parametrize("layout", layouts("tp1"))


def _mc(layout: ParallelLayout | None = None):
    return megatron_config(layout or ParallelLayout(), DTYPE, DEVICE)


@pytest.mark.parametrize("build,message", [
    (lambda: ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc(ParallelLayout(tp=3))),
     "num_attention_heads=8 is not divisible by tensor_model_parallel_size=3"),
    (lambda: ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc(), recompute="sometimes"),
     "recompute='sometimes' is not one of"),
    (lambda: ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc(ParallelLayout(pp=2))),
     "runs without pipeline parallelism; got pipeline_model_parallel_size=2"),
    (lambda: ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc(), make_vocab_size_divisible_by=0),
     "make_vocab_size_divisible_by must be a positive int"),
], ids=["tp_not_dividing_heads", "recompute", "pp_for_non_pp_class", "vocab_multiple"])
def test_model_construction_refuses(layout, build, message):
    setup_parallel(layout, DEVICE)
    with pytest.raises(ValueError, match=message):
        build()


def test_any_vocabulary_builds_at_any_tp_multiple(layout):
    setup_parallel(layout, DEVICE)
    config = tiny_split_config()
    config.vocab_size = 301
    model = ParallelCustomSplitLLamaForCausalLMRmPad(config, _mc(), make_vocab_size_divisible_by=128)
    assert model.padded_vocab_size == 384
    assert model.lm_head.weight.shape[0] == model.model.embed_tokens.weight.shape[0] == 384


def test_load_checkpoint_refuses_another_vocabulary(layout, checkpoint_factory):
    setup_parallel(layout, DEVICE)
    ckpt = checkpoint_factory("lm", False)
    config = tiny_split_config()
    config.vocab_size = 301
    model = ParallelCustomSplitLLamaForCausalLMRmPad(config, _mc())
    with pytest.raises(ValueError, match="vocab_size=256 but the model was built with vocab_size=301"):
        load_checkpoint(model, ckpt, progress=False)


def _ids():
    return torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))


MASK = torch.ones(2, 5, dtype=torch.bool)


@pytest.mark.parametrize("cls", [ParallelCustomSplitLLamaForCausalLMRmPad, ParallelCustomSplitLLamaForCausalLM],
                         ids=["packed", "padded"])
@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=_ids() + 256, attention_mask=MASK), r"input_ids at valid positions must lie in \[0, vocab_size=256\)"),
    (dict(input_ids=_ids() - 300, attention_mask=MASK), r"input_ids at valid positions must lie in \[0, vocab_size=256\)"),
    (dict(input_ids=_ids().float(), attention_mask=MASK), "input_ids must be int32 or int64, got torch.float32"),
    (dict(input_ids=_ids()[0], attention_mask=MASK), r"input_ids must be a \[batch, seq\] tensor"),
    (dict(input_ids=_ids(), attention_mask=MASK[:, :4]), "attention_mask must be a tensor of the shape of input_ids"),
    (dict(input_ids=_ids(), attention_mask=MASK.float()), "attention_mask must have dtype in"),
    (dict(input_ids=_ids(), attention_mask=MASK, position_ids=torch.zeros(2, 5)), "position_ids must have dtype in"),
    (dict(input_ids=_ids(), attention_mask=MASK, labels=_ids() + 256),
     r"labels at valid positions must lie in \[0, vocab_size=256\)"),
    (dict(input_ids=_ids(), attention_mask=MASK, labels=_ids()[:, :3]), "labels must be a tensor of the shape"),
], ids=["ids_too_large", "ids_negative", "float_ids", "ids_1d", "mask_shape", "float_mask", "float_positions",
        "labels_out_of_range", "labels_shape"])
def test_forward_refuses(layout, cls, kwargs, message):
    setup_parallel(layout, DEVICE)
    model = cls(tiny_split_config(), _mc()).to(DEVICE)
    with pytest.raises(ValueError, match=message):
        model(**{name: value.to(DEVICE) for name, value in kwargs.items()})


def test_forward_refuses_inputs_on_another_device(layout):
    setup_parallel(layout, DEVICE)
    model = ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc()).to(DEVICE)
    with pytest.raises(ValueError, match="input_ids is on meta but the model on"):
        model(_ids().to("meta"), MASK.to("meta"))


def test_ids_at_padded_positions_are_not_checked(layout):
    """Out-of-range ids where the mask is 0 are padding the model never reads."""
    setup_parallel(layout, DEVICE)
    model = ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc()).to(DEVICE)
    ids, mask = _ids(), MASK.clone()
    ids[0, -1], mask[0, -1] = 10**6, False
    assert model(ids.to(DEVICE), mask.to(DEVICE)).shape == (2, 5, 256)
