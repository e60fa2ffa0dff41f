"""The trunk's element-wise fusions, each measured side by side in one process (1 GPU).

Packed RL actor steps (entropy on) at the bench shape with ``--depths`` lower x upper
real layers, on the same documents, for each variant:

* ``unfused``           megatron's unfused SwiGLU, and ``elementwise.rms_norm`` and
                        ``elementwise.rotate`` run eagerly (several element-wise passes
                        each instead of one);
* ``mswiglu+norm``      megatron's fused SwiGLU (``bias_activation_fusion``) and the
                        compiled RMSNorm;
* ``swiglu+norm``       ``layers.SwiGLU`` (compiled, ffn static) and the compiled RMSNorm;
* ``swiglu+norm+rope``  the above and the compiled rotary;
* ``+kept_head``        what the product runs: the above, and the fused LM head keeps each
                        tile's probabilities for backward instead of recomputing its logits
                        (what it does without activation recompute; every other variant
                        has the head recompute them, as the product did before).

and, at depths with 8 or more upper layers, full activation recompute for ``unfused``, the
product (the head then recomputes its logits, and the model's last layer is not
recomputed: ``layers.decoder_stack``) and ``+every_layer`` (the product recomputing every
layer, as it did before). The other variants put eager or megatron's functions back in
this process only. The deepest depth is also profiled (GPU time by kernel kind, top
element-wise kernels) for the product and for the product with the head recomputing its
logits. ``--runs`` picks variant/recompute pairs instead of the full list.

    python benchmarks/trunk_fusions.py --depths 2x2,2x8 --json fusions.json
"""

from __future__ import annotations

import argparse
import json

import torch

from splitllama import bench, elementwise, model as model_module
from splitllama.distributed import init_distributed
from splitllama.layout import ParallelLayout
from splitllama.options import ModelOptions

PRODUCT = "swiglu+norm+rope+kept_head"
EVERY_LAYER = PRODUCT + "+every_layer"
_stack_config = model_module.stack_config
_decoder_stack = model_module.decoder_stack
_compiled = {name: getattr(elementwise, name) for name in ("rms_norm", "rotate")}
_eager = {name: fn.__wrapped__ for name, fn in _compiled.items()}


def use_variant(name: str) -> None:
    """Set this process's functions to the variant's (see the module docstring)."""

    def stack_config(*args, **kwargs):
        config = _stack_config(*args, **kwargs)
        # read by megatron's MLP when built and at each forward
        config.use_te_activation_func = name.startswith("swiglu")  # layers.SwiGLU in its slot
        config.bias_activation_fusion = name.startswith("mswiglu")
        return config

    def decoder_stack(config, count, last_layer_kept=False):
        return _decoder_stack(config, count, last_layer_kept and "every_layer" not in name)

    model_module.stack_config = stack_config
    model_module.decoder_stack = decoder_stack
    elementwise.rms_norm = (_compiled if "norm" in name else _eager)["rms_norm"]
    elementwise.rotate = (_compiled if "rope" in name else _eager)["rotate"]


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
    parser.add_argument("--runs", help="only these variant/recompute pairs, comma list "
                                       f"(e.g. {PRODUCT}/full,{EVERY_LAYER}/full; default: all of the docstring's)")
    parser.add_argument("--json", metavar="FILE", help="write every row as JSON")
    args = parser.parse_args()
    chosen = None if args.runs is None else [tuple(run.split("/")) for run in args.runs.split(",")]
    known = ("unfused", "mswiglu+norm", "swiglu+norm", "swiglu+norm+rope", PRODUCT, EVERY_LAYER)
    for run in chosen or []:
        if len(run) != 2 or run[0] not in known or run[1] not in ("none", "selective", "full"):
            parser.error(f"--runs: {'/'.join(run)!r} is not VARIANT/RECOMPUTE with VARIANT one of {', '.join(known)} "
                         "and RECOMPUTE one of none, selective, full")
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
        runs = [(v, "none") for v in ("unfused", "mswiglu+norm", "swiglu+norm", "swiglu+norm+rope", PRODUCT)]
        if upper >= 8:
            runs += [("unfused", "full"), (PRODUCT, "full"), (EVERY_LAYER, "full")]
        if chosen is not None:
            runs = chosen
        for variant, recompute in runs:
            use_variant(variant)
            model = bench.build(bench.ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(),
                                ModelOptions(recompute=recompute))
            if variant != PRODUCT:
                model.lm_head.recompute_logits = True
            step = bench.actor_step(model, batch)
            row = bench.measure(f"{depth}/{variant}/{recompute}", step, batch, config, ceiling, args)
            row.update(depth=depth, variant=variant, recompute=recompute)
            if depth == depths[-1] and recompute == "none" and variant in ("swiglu+norm+rope", PRODUCT):
                row["profile"] = profile_step(step)
            print(json.dumps({k: row.get(k) for k in ("name", "ms", "fraction_of_ceiling",
                                                       "activation_memory_gib", "error")}), flush=True)
            rows.append(row)
            del model, step
            torch.cuda.empty_cache()
    use_variant(PRODUCT)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "ceiling_tflops": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
