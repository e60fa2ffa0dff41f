"""GPU time of every matmul of one packed actor step (2 + 8 layers), by input shapes (1 GPU).

Why: after the element-wise fusions the step is about 90% matmul time; this says which
GEMMs take it and at what rate, next to the matmul ceiling of the same process. Rows whose
``tflops`` is 0 are the fused head's GEMMs with an ``out_dtype`` argument, whose shapes the
FLOP count here does not parse (BENCHMARKS.md computes them by hand).

    python benchmarks/matmul_shapes.py > matmul_shapes.txt
"""

import json

import torch
from torch.profiler import ProfilerActivity, profile

from splitllama import bench
from splitllama.distributed import init_distributed
from splitllama.layout import ParallelLayout
from splitllama.options import ModelOptions


def main() -> None:
    init_distributed("cuda")
    ceiling = bench.matmul_ceiling(20)
    config = bench.bench_config("mixed", 2, 8)
    gen = torch.Generator().manual_seed(0)
    batch = bench.make_batch(bench.rl_lengths(16384, gen), config.vocab_size, gen, "cuda")
    model = bench.build(bench.ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(), ModelOptions())
    step = bench.actor_step(model, batch)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm") and e.device_time_total > 0:
            shapes = e.input_shapes
            try:
                a, b = (shapes[1], shapes[2]) if e.key == "aten::addmm" else (shapes[-2], shapes[-1])
                flops = 2 * a[0] * a[1] * b[1] * e.count
            except (IndexError, TypeError):
                flops = 0
            ms = e.device_time_total / 1e3
            rows.append(dict(op=e.key, shapes=str(shapes)[:90], calls=e.count, ms=round(ms, 2),
                             tflops=round(flops / ms / 1e9, 1) if ms else None))
    rows.sort(key=lambda r: -r["ms"])
    print("ceiling", round(ceiling, 1), "total mm ms", round(sum(r["ms"] for r in rows), 1))
    for r in rows[:30]:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
