"""The Python API refuses bad input with a ``ValueError`` naming the field, as the CLI does:
model construction, ``load_checkpoint`` and ``forward``'s inputs.

Token ids and labels outside the vocabulary matter most: without the check, an
out-of-range id is no error at TP > 1 (the vocab-parallel embedding zeroes ids outside
each rank's shard), so the model would return finite, wrong logits. The refusal is the
only thing between a bad id and a silent wrong answer (``planted_bugs``:
``input_range_check_removed``). ``forward`` takes no float input (ids, mask, positions and
labels are integer or bool tensors), so there is no NaN to refuse; a float tensor where
ids are expected is refused by dtype. The loader's refusals of missing, unexpected and
mis-shaped tensors and of config mismatches are in test_checkpoints.py."""

from __future__ import annotations

import pytest
import torch

from splitllama.checkpoint.split import load_checkpoint
from splitllama.config import CustomSplitLlamaConfig
from splitllama.verify.tiny import tiny_split_config
from splitllama.distributed import setup_parallel
from splitllama.megatron_configs import megatron_config
from splitllama.layout import ParallelLayout
from splitllama.model import ParallelCustomSplitLLamaForCausalLM, ParallelCustomSplitLLamaForCausalLMRmPad
from splitllama.options import ModelOptions
from splitllama.verify.runner import agree, build_production
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import layouts

# case -> (field, bad value at a valid position); the error must name the field and the range
BAD_VALUES = {
    "input_id_equal_to_vocab": ("input_ids", 256),
    "negative_input_id": ("input_ids", -1),
    "label_equal_to_vocab": ("labels", 256),
    "negative_label": ("labels", -3),
}


def loaded_model(checkpoint: str, layout, head: str, padded: bool = False):
    """The production model at ``layout`` with ``checkpoint``'s weights: the packed class,
    or the padded ``ParallelCustomSplitLLamaForCausalLM``."""
    config = CustomSplitLlamaConfig.from_pretrained(checkpoint)
    setup_parallel(layout, DEVICE)
    (model,) = build_production(config, layout, head, DTYPE, DEVICE, padded=padded)
    load_checkpoint(model, checkpoint, progress=False)
    return model


def out_of_range_refused(ckpt: str, layout, case: str, padded: bool) -> bool:
    """Whether the model at ``layout`` refuses the bad value of ``case`` (at a valid
    position) with a ValueError that names the field and the vocabulary, on every rank."""
    field, value = BAD_VALUES[case]
    model = loaded_model(ckpt, layout, "lm", padded)
    vocab = model.hf_config.vocab_size
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, 6), generator=gen)
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
        return agree(f"{field} at valid positions must lie in [0, vocab_size={vocab})" in str(err))
    return agree(False)


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
@pytest.mark.parametrize("layout", layouts("tp1", "tp2", "tp2_sp"))
def test_out_of_range_ids_and_labels_are_refused(layout, case, padded, checkpoint_factory):
    assert out_of_range_refused(checkpoint_factory("lm", False), layout, case, padded)


@pytest.mark.parametrize("layout", layouts("tp1", "tp2"))
def test_out_of_range_ids_at_padded_positions_are_ignored(layout, checkpoint_factory):
    """Only valid positions are checked: padding may hold any id (e.g. -100)."""
    model = loaded_model(checkpoint_factory("lm", False), layout, "lm")
    ids = torch.tensor([[-100, 5, 6, 7], [1, 2, 3, 300]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    out = model(ids.to(DEVICE), mask.to(DEVICE))
    assert torch.isfinite(out).all() and (out[~mask.to(out.device)] == 0).all()


@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp"))
def test_value_model_refuses_log_probs(layout, checkpoint_factory):
    model = loaded_model(checkpoint_factory("value", False), layout, "value")
    ids = torch.tensor([[1, 2, 3, 4]], device=DEVICE)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="log-probabilities and entropy need an LM head"):
        model.log_probs_and_entropy(ids, mask, ids)


def _mc(layout: ParallelLayout | None = None):
    return megatron_config(layout or ParallelLayout(), DTYPE, DEVICE)


@pytest.mark.parametrize("build,message", [
    (lambda: ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc(ParallelLayout(tp=3))),
     "num_attention_heads=8 is not divisible by tensor_model_parallel_size=3"),
    (lambda: ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc(),
                                                             options=ModelOptions(recompute="sometimes")),
     "recompute='sometimes' is not one of"),
    (lambda: ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc(ParallelLayout(pp=2))),
     "runs without pipeline parallelism; got pipeline_model_parallel_size=2"),
    (lambda: ParallelCustomSplitLLamaForCausalLMRmPad(
        tiny_split_config(), _mc(), options=ModelOptions(make_vocab_size_divisible_by=0)),
     "make_vocab_size_divisible_by must be a positive int"),
], ids=["tp_not_dividing_heads", "recompute", "pp_for_non_pp_class", "vocab_multiple"])
@pytest.mark.parametrize("layout", layouts("tp1"))
def test_model_construction_refuses(layout, build, message):
    setup_parallel(layout, DEVICE)
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("layout", layouts("tp1"))
def test_any_vocabulary_builds_at_any_tp_multiple(layout):
    setup_parallel(layout, DEVICE)
    config = tiny_split_config()
    config.vocab_size = 301
    model = ParallelCustomSplitLLamaForCausalLMRmPad(config, _mc(), options=ModelOptions(make_vocab_size_divisible_by=128))
    assert model.padded_vocab_size == 384
    assert model.lm_head.weight.shape[0] == model.model.embed_tokens.weight.shape[0] == 384


@pytest.mark.parametrize("layout", layouts("tp1"))
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


@pytest.mark.parametrize("layout", layouts("tp1"))
@pytest.mark.parametrize("cls", [ParallelCustomSplitLLamaForCausalLMRmPad, ParallelCustomSplitLLamaForCausalLM],
                         ids=["packed", "padded"])
@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=_ids().float(), attention_mask=MASK), "input_ids must be int32 or int64, got torch.float32"),
    (dict(input_ids=_ids()[0], attention_mask=MASK), r"input_ids must be a \[batch, seq\] tensor"),
    (dict(input_ids=_ids(), attention_mask=MASK[:, :4]), "attention_mask must be a tensor of the shape of input_ids"),
    (dict(input_ids=_ids(), attention_mask=MASK.float()), "attention_mask must have dtype in"),
    (dict(input_ids=_ids(), attention_mask=MASK, position_ids=torch.zeros(2, 5)), "position_ids must have dtype in"),
    (dict(input_ids=_ids(), attention_mask=MASK, labels=_ids()[:, :3]), "labels must be a tensor of the shape"),
], ids=["float_ids", "ids_1d", "mask_shape", "float_mask", "float_positions", "labels_shape"])
def test_forward_refuses(layout, cls, kwargs, message):
    setup_parallel(layout, DEVICE)
    model = cls(tiny_split_config(), _mc()).to(DEVICE)
    with pytest.raises(ValueError, match=message):
        model(**{name: value.to(DEVICE) for name, value in kwargs.items()})


@pytest.mark.parametrize("layout", layouts("tp1"))
def test_forward_refuses_inputs_on_another_device(layout):
    setup_parallel(layout, DEVICE)
    model = ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc()).to(DEVICE)
    with pytest.raises(ValueError, match="input_ids is on meta but the model on"):
        model(_ids().to("meta"), MASK.to("meta"))


@pytest.mark.parametrize("layout", layouts("tp1"))
def test_trunk_refuses_a_call_without_a_batch(layout):
    """The trunk called directly with token ids would run without the batch's attention plan
    (no causal mask, no documents): refused instead."""
    setup_parallel(layout, DEVICE)
    model = ParallelCustomSplitLLamaForCausalLM(tiny_split_config(), _mc()).to(DEVICE)
    ids = _ids().to(DEVICE)
    with pytest.raises(ValueError, match="the trunk takes one splitllama Batch"):
        model.model(ids)


@pytest.mark.parametrize("layout", layouts("tp1"))
@pytest.mark.parametrize("temperature,labels,message", [
    (0.0, True, "temperature must be a positive finite number, got 0.0"),
    (float("nan"), True, "temperature must be a positive finite number"),
    ("0.7", True, "temperature must be a positive number, got str"),
    (torch.tensor([0.5, 1.0]), True, "temperature must be one number"),
    (0.7, False, "temperature scales log-probs and entropy: pass labels with it"),
], ids=["zero", "nan", "string", "per_row", "without_labels"])
def test_forward_refuses_a_bad_temperature(layout, temperature, labels, message):
    setup_parallel(layout, DEVICE)
    model = ParallelCustomSplitLLamaForCausalLMRmPad(tiny_split_config(), _mc()).to(DEVICE)
    ids = _ids().to(DEVICE)
    with pytest.raises(ValueError, match=message):
        model(ids, MASK.to(DEVICE), labels=ids if labels else None, temperature=temperature)
