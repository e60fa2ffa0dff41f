"""The trunk's element-wise fusions, each measured side by side in one process (1 GPU).

Packed RL actor steps (entropy on) at the bench shape with ``--depths`` lower x upper
real layers, on the same documents, for each variant:

* ``unfused``           megatron's unfused SwiGLU and an eager RMSNorm (the model before
                        the fusions; 7 element-wise passes per norm, 4 per SwiGLU);
* ``swiglu``            megatron's fused SwiGLU (``bias_activation_fusion``) only;
* ``swiglu+norm``       what the product runs: fused SwiGLU and the compiled RMSNorm;
* ``swiglu+norm+rope``  an experiment, not in the product: megatron's rotary application
                        replaced by one compiled function (float32 math, one rounding);

and, at depths with 8 or more upper layers, full activation recompute for ``unfused`` and
the product. The unfused variants put the original functions back in this process only.
The deepest depth is also profiled (GPU time by kernel kind, top element-wise kernels).

    python benchmarks/trunk_fusions.py --depths 2x2,2x8 --json fusions.json
"""

from __future__ import annotations

import argparse
import json

import torch
from megatron.core.transformer import attention as megatron_attention

from splitllama import bench, layers, model as model_module
from splitllama.distributed import init_distributed
from splitllama.layout import ParallelLayout
from splitllama.options import ModelOptions

_fused_norm = layers._rms_norm
_eager_norm = getattr(layers._rms_norm, "_torchdynamo_orig_callable", layers._rms_norm)
_stack_config = model_module.stack_config
_megatron_rope = megatron_attention.apply_rotary_pos_emb


@torch.compile(dynamic=True)
def _compiled_rope(t, freqs):
    t32 = t.float()
    x1, x2 = t32.chunk(2, -1)
    return (t32 * freqs.cos() + torch.cat((-x2, x1), -1) * freqs.sin()).to(t.dtype)


def _rope(t, freqs, config=None, cu_seqlens=None, mscale=1.0, cp_group=None):
    if cu_seqlens is None and mscale == 1.0 and freqs.shape[-1] == t.shape[-1]:
        return _compiled_rope(t, freqs)
    return _megatron_rope(t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)


def use_variant(name: str) -> None:
    """Set this process's functions to the variant's (see the module docstring)."""
    swiglu = name != "unfused"

    def stack_config(*args, **kwargs):
        config = _stack_config(*args, **kwargs)
        config.bias_activation_fusion = swiglu  # read by megatron's MLP at each forward
        return config

    model_module.stack_config = stack_config
    layers._rms_norm = _fused_norm if "norm" in name else _eager_norm
    megatron_attention.apply_rotary_pos_emb = _rope if "rope" in name else _megatron_rope


def profile_step(step) -> dict:
    profiled = bench.profile_step(step)
    other = [k for k in profiled.pop("kernels") if k["kind"] == "other"]
    return {**profiled, "top_other": other[:12]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="2x2,2x8", help="lower x upper real layers, comma list (default 2x2,2x8)")
    parser.add_argument("--tokens", type=int, default=16384, help="real tokens per batch (default 16384)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--json", metavar="FILE", help="write every row as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    init_distributed("cuda")
    ceiling = bench.matmul_ceiling(20)
    rows = []
    depths = args.depths.split(",")
    for depth in depths:
        lower, upper = (int(n) for n in depth.split("x"))
        config = bench.bench_config("mixed", lower, upper)
        gen = torch.Generator().manual_seed(0)
        batch = bench.make_batch(bench.rl_lengths(args.tokens, gen), config.vocab_size, gen, "cuda")
        runs = [(v, "none") for v in ("unfused", "swiglu", "swiglu+norm", "swiglu+norm+rope")]
        if upper >= 8:
            runs += [("unfused", "full"), ("swiglu+norm", "full")]
        for variant, recompute in runs:
            use_variant(variant)
            model = bench.build(bench.ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(),
                                ModelOptions(recompute=recompute))
            step = bench.actor_step(model, batch)
            row = bench.measure(f"{depth}/{variant}/{recompute}", step, batch, config, ceiling, args)
            row.update(depth=depth, variant=variant, recompute=recompute)
            if depth == depths[-1] and recompute == "none" and variant in ("unfused", "swiglu+norm"):
                row["profile"] = profile_step(step)
            print(json.dumps({k: row.get(k) for k in ("name", "ms", "fraction_of_ceiling",
                                                       "activation_memory_gib", "error")}), flush=True)
            rows.append(row)
            del model, step
            torch.cuda.empty_cache()
    use_variant("swiglu+norm")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "ceiling_tflops": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
