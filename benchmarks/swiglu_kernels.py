"""SwiGLU forward and backward kernels alone, at the bench's packed shape (1 GPU).

Why: in the 2 + 8 profile megatron's fused SwiGLU backward took 63.9 ms over 10 calls,
about 6x longer than its memory traffic needs at the H200's bandwidth. This times each
candidate on ``[tokens, 2 ffn]`` bf16 inputs for both stacks' ffn sizes, in the order the
model calls them (the 8B stack, then the 70B stack, then the 8B again), and reports the
effective bandwidth (bytes that must move / time):

* ``megatron``  ``bias_swiglu_impl`` as megatron's MLP calls it (its ``jit_fuser``
                functions, compiled on first use with torch.compile's default shape policy);
* ``static``    the same formulas, one compile per shape (``dynamic=False``);
* ``product``   ``layers.SwiGLU``: ffn static, tokens dynamic (what the model runs);
* ``eager``     the unfused ``silu(gate) * up``, autograd's own backward.

Forward moves 3 x tokens x ffn x 2 bytes (read gate and up, write the product); backward
5 x tokens x ffn x 2 (read both halves and the incoming gradient, write both halves).

    python benchmarks/swiglu_kernels.py --json swiglu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
import torch.nn.functional as F
from megatron.core.fusions import fused_bias_swiglu as megatron_swiglu

from splitllama import layers

_orig = {name: getattr(getattr(megatron_swiglu, name), "_torchdynamo_orig_callable",
                       getattr(megatron_swiglu, name)) for name in ("swiglu", "swiglu_back")}


@contextlib.contextmanager
def _megatron_compiled_per_shape():
    """megatron's SwiGLU functions compiled once per shape (its autograd function looks
    them up in its module at each call)."""
    saved = {name: getattr(megatron_swiglu, name) for name in _orig}
    for name, fn in _orig.items():
        setattr(megatron_swiglu, name, torch.compile(fn, dynamic=False))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(megatron_swiglu, name, fn)


def _eager(y):
    gate, up = y.chunk(2, -1)
    return F.silu(gate) * up


def _megatron(y):
    return megatron_swiglu.bias_swiglu_impl(y, None)


# name: (function, the context it runs in)
VARIANTS = {
    "megatron": (_megatron, contextlib.nullcontext),
    "static": (_megatron, _megatron_compiled_per_shape),
    "product": (layers.SwiGLU(), contextlib.nullcontext),
    "eager": (_eager, contextlib.nullcontext),
}


def time_one(fn, tokens: int, ffn: int, repeats: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(tokens, 1, 2 * ffn, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    g = torch.randn(tokens, 1, ffn, device="cuda", dtype=torch.bfloat16, generator=gen)
    fwd, bwd = [], []
    for i in range(repeats + 3):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        out = fn(y)
        events[1].record()
        (dy,) = torch.autograd.grad(out, y, g)
        events[2].record()
        torch.cuda.synchronize()
        if i >= 3:
            fwd.append(events[0].elapsed_time(events[1]))
            bwd.append(events[1].elapsed_time(events[2]))
    fwd_ms, bwd_ms = statistics.median(fwd), statistics.median(bwd)
    unit = tokens * ffn * 2
    return dict(tokens=tokens, ffn=ffn, forward_ms=fwd_ms, backward_ms=bwd_ms,
                forward_gbps=3 * unit / fwd_ms / 1e6, backward_gbps=5 * unit / bwd_ms / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=17854, help="packed tokens (default: the bench batch's 17,854)")
    parser.add_argument("--ffn", default="14336,28672", help="ffn sizes in call order (default: 8B, 70B)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    sizes = [int(s) for s in args.ffn.split(",")]
    # back to the first shape once the second has been seen, then a new batch length
    order = [(args.tokens, f) for f in sizes] + [(args.tokens, sizes[0]), (args.tokens - 999, sizes[0])]
    rows = []
    for name, (fn, context) in VARIANTS.items():
        with context():
            for call, (tokens, ffn) in enumerate(order):
                compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                row = dict(variant=name, call=call, **time_one(fn, tokens, ffn, args.repeats))
                row["new_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiles
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
