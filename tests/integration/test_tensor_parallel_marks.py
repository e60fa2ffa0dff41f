"""Every parameter's tensor-parallel marks equal those megatron's own layers give it.

Megatron's layers (``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding``) mark their weights ``tensor_model_parallel``, ``partition_dim``
and ``partition_stride`` only when they initialise them; the model is built without
initialisation (its weights are loaded), so it marks every weight itself from
``sharding.py``'s declaration. Megatron's gradient norm and distributed optimizer,
megatron-FSDP, resharding and export tools read these marks. The reference is the same
model built with ``perform_initialization=True``: each weight's marks as megatron's layer
that holds it set them, read before the model's own marking runs.
"""

from __future__ import annotations

import pytest
import torch

from splitllama import model as model_module
from splitllama.distributed import setup_parallel
from splitllama.megatron_configs import megatron_config
from splitllama.verify.runner import agree
from splitllama.pipeline import (
    ParallelCustomSplitLLamaForCausalLMRmPadPP,
    ParallelCustomSplitLLamaForValueRmPadPP,
    build_chunks,
)
from splitllama.verify.tiny import tiny_split_config
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import layouts

# megatron's values for a parameter no megatron layer marked (its
# ``set_defaults_if_not_set_tensor_model_parallel_attributes``)
UNMARKED = {"tensor_model_parallel": False, "partition_dim": -1, "partition_stride": 1}


def _marks(param: torch.Tensor) -> tuple:
    return tuple(getattr(param, attribute, default) for attribute, default in UNMARKED.items())


def _build(layout, head: str, mlp: bool, initialize: bool) -> list[torch.nn.Module]:
    cls = ParallelCustomSplitLLamaForCausalLMRmPadPP if head == "lm" else ParallelCustomSplitLLamaForValueRmPadPP
    return build_chunks(cls, tiny_split_config(mlp=mlp), megatron_config(layout, DTYPE, DEVICE, initialize=initialize),
                        layout=layout)


def megatron_marks(layout, head: str, mlp: bool) -> list[dict[str, tuple]]:
    """Per chunk of this rank, each parameter's marks as megatron's layers set them when
    they initialise the weights (read before the model marks its parameters itself)."""
    seen: list[dict[str, tuple]] = []
    mark = model_module.mark_tensor_parallel

    def recording(module, specs):
        seen.append({name: _marks(p) for name, p in module.named_parameters()})
        mark(module, specs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "mark_tensor_parallel", recording)
        chunks = _build(layout, head, mlp, initialize=True)
    assert len(seen) == len(chunks), f"{len(seen)} markings for {len(chunks)} chunks"
    return seen


def tensor_parallel_mark_problems(layout, head: str, mlp: bool) -> list[str]:
    """Parameters of the model as it is built for loading (no initialisation) whose marks
    differ from megatron's. A weight no megatron layer marks (norms, the value head) must be
    ``tensor_model_parallel=False``; its dim and stride are never read."""
    setup_parallel(layout, DEVICE)
    reference = megatron_marks(layout, head, mlp)
    problems = []
    for k, (chunk, expected) in enumerate(zip(_build(layout, head, mlp, initialize=False), reference)):
        for name, param in chunk.named_parameters():
            got, want = _marks(param), expected[name]
            split = want[0]
            if (got if split else got[:1]) != (want if split else want[:1]):
                problems.append(f"chunk {k} {name}: (tensor_model_parallel, partition_dim, partition_stride) "
                                f"= {got}, megatron's layer gives {want}")
        if not any(want[0] for want in expected.values()):
            problems.append(f"chunk {k}: megatron marked no weight tensor-parallel (nothing compared)")
    return problems


# every kind of weight (embedding, fused QKV, attention output, fused gate/up, down, both
# adapters, both heads, norms) at TP=1 (megatron marks split weights at any TP size), and
# the pipeline chunks of TP=2 x PP=2 x VPP=2
@pytest.mark.parametrize("head,mlp", [("lm", True), ("value", False)], ids=["lm-mlp", "value-linear"])
@pytest.mark.parametrize("layout", layouts("tp1", "tp2_pp2_vpp2"))
def test_marks_equal_megatron_layers(layout, head, mlp):
    problems = tensor_parallel_mark_problems(layout, head, mlp)
    assert agree(not problems), "\n".join(problems) or "another rank failed"
