"""The compiled element-wise pieces' shape policy (``elementwise.compiled_per_batch``).

Megatron's fused SwiGLU, compiled with torch.compile's default policy for both stacks,
ran at a third of the bandwidth once the second stack's width made that dim dynamic
(BENCHMARKS.md); and compiling every shape statically would recompile on every RL batch.
So: a new batch length or row count must compile nothing after the first of its kind,
and a new width must compile a graph of its own (the width stays a constant in the
kernel). Compiled for real here (inductor on CPU), not under the CPU gate's eager stance.
"""

import torch

from splitllama.elementwise import compiled_per_batch


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_batch_dims_dynamic_widths_static():
    @compiled_per_batch
    def scale_shift(x):
        return x * 2 + 1

    new_graphs = []
    with torch.compiler.set_stance("default"):
        for shape in [(5, 1, 8), (7, 1, 8), (5, 1, 16), (9, 1, 16), (5, 1, 24), (11, 3, 24), (4, 2, 24)]:
            before = _graphs()
            x = torch.randn(shape)
            assert torch.equal(scale_shift(x), x * 2 + 1)
            new_graphs.append(_graphs() - before)
    # first call; new length; new width; new length; new width; rows 1 -> 3 (size 1 is
    # specialised by torch); new length and row count
    assert new_graphs == [1, 0, 1, 0, 1, 1, 0]
