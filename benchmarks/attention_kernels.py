"""flash-attn 4 against torch's varlen kernel, alone (1 GPU, bf16, causal packed documents,
the 70B layer's heads: 64 query heads, 8 K/V groups, head dim 128):

* timing, forward + backward (CUDA events, mean of --repeats after warm-up), on the RL
  documents (median 512, 16,384 tokens), 4 x 8,192 and 1 x 32,768 tokens;
* error against float32 attention per document (output and dq/dk/dv, max-abs over
  max|ref|), on documents that include empty ones and ones of a single token (given to
  the kernel as they are: the product drops empty documents before planning; this records
  whether each kernel takes them), for GQA 64/8 x 128 and the tiny models' 8/2 x 8.

    python benchmarks/attention_kernels.py --json attention_kernels.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from splitllama.attention import _varlen_kwargs, flash_attn_4_varlen, varlen_attn
from splitllama.bench_workload import rl_lengths


def kernels() -> dict:
    def torch_varlen(q, k, v, cu, longest, scale):
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), **_varlen_kwargs())

    def flash_attn_4(q, k, v, cu, longest, scale):
        return flash_attn_4_varlen()(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                     max_seqlen_k=longest, softmax_scale=scale, causal=True)[0]

    found = {"torch_varlen": torch_varlen}
    if flash_attn_4_varlen() is not None:
        found["flash_attn_4"] = flash_attn_4
    return found


def inputs(lengths, heads, groups, dim, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=gen, device="cuda")
    k, v = (torch.randn(total, groups, dim, generator=gen, device="cuda") for _ in range(2))
    grad = torch.randn(total, heads, dim, generator=gen, device="cuda")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, grad, cu, max(lengths)


def reference(q, k, v, cu):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.zeros_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            s = (q[a:b].transpose(0, 1) @ k[a:b].transpose(0, 1).transpose(1, 2)) / math.sqrt(q.shape[-1])
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            out[a:b] = (s.softmax(-1) @ v[a:b].transpose(0, 1)).transpose(0, 1)
    return out


def fwd_bwd(fn, q, k, v, grad, cu, longest, dtype):
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, cu, longest)
    out.backward(grad.to(out.dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def errors(fn, lengths, heads, groups, dim) -> dict:
    q, k, v, grad, cu, longest = inputs(lengths, heads, groups, dim)
    scale = 1 / math.sqrt(dim)
    try:
        got = fwd_bwd(lambda *a: fn(*a, scale), q, k, v, grad, cu, longest, torch.bfloat16)
    except Exception as e:  # a kernel that refuses these documents: recorded, not fatal
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    want = fwd_bwd(lambda q_, k_, v_, cu_, longest_: reference(q_, k_, v_, cu_), q, k, v, grad, cu, longest,
                   torch.float32)
    return {name: float((g - w).abs().max() / w.abs().max()) for name, g, w in zip(("out", "dq", "dk", "dv"),
                                                                                       got, want)}


def timing(fn, lengths, repeats) -> float:
    q, k, v, grad, cu, longest = inputs(lengths, 64, 8, 128)
    q, k, v = (t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v))
    grad = grad.to(torch.bfloat16)

    def step():
        fn(q, k, v, cu, longest, 128 ** -0.5).backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-timing: the error checks only (e.g. beside other GPU work)")
    parser.add_argument("--json")
    args = parser.parse_args()
    found = kernels()
    edge = [1, 0, 300, 1, 0, 517, 2048, 1]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "errors": {}, "ms": {}}
    for name, fn in found.items():
        for heads, groups, dim in ((64, 8, 128), (8, 2, 8)):
            for label, lengths in (("with_empty", edge), ("without_empty", [n for n in edge if n])):
                key = f"{name}/{heads}x{groups}x{dim}/{label}"
                result["errors"][key] = errors(fn, lengths, heads, groups, dim)
                print(key, result["errors"][key], flush=True)
    batches = {"rl_median512": rl_lengths(16384, torch.Generator().manual_seed(0)), "4x8192": [8192] * 4,
               "1x32768": [32768]}
    for label, lengths in batches.items() if args.timing else ():
        s_bar = sum(n * n for n in lengths) / sum(lengths)
        flops = 4 * 64 * 128 * sum(lengths) * s_bar / 2 * 3.5  # fwd (2 GEMMs) + bwd (5), causal halved
        for name, fn in found.items():
            ms = timing(fn, lengths, args.repeats)
            result["ms"][f"{name}/{label}"] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
            print(f"{name:<14}{label:<14}{ms:9.2f} ms {flops / (ms * 1e-3) / 1e12:7.0f} TFLOP/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
