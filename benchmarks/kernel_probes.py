"""Kernels the product could use instead of its own, measured alone (1 GPU, bf16):

* attention on the bench documents (26 packed documents, 17,854 tokens, causal), the 70B
  layer's heads (64 query, 8 key/value groups) and the 8B's (32 / 8), head dim 128:
  ``torch_varlen`` (torch's varlen flash attention, what the product runs on CUDA) against
  cuDNN's ragged attention (``aten._cudnn_attention_forward`` with ``cu_seqlens``, which
  torch's varlen API has switched off), with the groups as they are and repeated to the
  query heads; forward and forward + backward ms, and the max-abs error of the output and
  the three input gradients against float64 attention per document;
* the 70B MLP's largest GEMMs and the 8192^3 ceiling GEMM under cuBLAS and cuBLASLt
  (``torch.backends.cuda.preferred_blas_library``).

    python benchmarks/kernel_probes.py --json probes.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from splitllama.bench_workload import rl_lengths
from splitllama.attention import _varlen_kwargs, varlen_attn

HEAD_DIM = 128


def cuda_ms(fn, *args, repeats: int = 10, warmup: int = 3) -> float:
    """Mean ms of ``fn(*args)`` over ``repeats`` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def forward_backward(fn, q, k, v, grad_out) -> None:
    fn(q, k, v).backward(grad_out)


def attention_rows(tokens: int) -> dict:
    lengths = rl_lengths(tokens, torch.Generator().manual_seed(0))
    total, longest = sum(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5

    def flash(q, k, v):
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), **_varlen_kwargs())

    def cudnn(q, k, v):
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, longest, longest, True, 0.0, True,
                                                       False, scale=scale)[0]

    def cudnn_repeated(q, k, v):
        groups = q.shape[1] // k.shape[1]
        return cudnn(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))

    def reference(q, k, v):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        bounds = cu.tolist()
        return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)),
                                                         is_causal=True, scale=scale).transpose(0, 1)
                          for a, b in zip(bounds[:-1], bounds[1:])])

    rows = {}
    for shape, heads, groups in (("70b", 64, 8), ("8b", 32, 8)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(total, n, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
                   .requires_grad_(True) for n in (heads, groups, groups))
        grad_out = torch.randn(total, heads, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
        exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        want = reference(*exact)
        want.backward(grad_out.double())
        for name, fn in (("torch_varlen", flash), ("cudnn_ragged", cudnn), ("cudnn_ragged_repeated", cudnn_repeated)):
            key = f"{shape}/{name}"
            try:
                for t in (q, k, v):
                    t.grad = None
                out = fn(q, k, v)
                out.backward(grad_out)
                errors = {"out": float((out.double() - want).abs().max())}
                errors.update({f"d{n}": float((t.grad.double() - e.grad).abs().max())
                               for n, t, e in zip("qkv", (q, k, v), exact)})
                rows[key] = {"forward_ms": cuda_ms(fn, q, k, v),
                             "forward_backward_ms": cuda_ms(forward_backward, fn, q, k, v, grad_out), **errors}
            except RuntimeError as err:
                rows[key] = {"error": str(err)[:300]}
            print(key, rows[key], flush=True)
    return rows


def gemm_rows(tokens: int) -> dict:
    # (rows, inner, cols, first operand transposed): fc1 forward, fc1 data grad, fc1 weight grad
    shapes = [(tokens, 8192, 57344, False), (tokens, 57344, 8192, False), (57344, tokens, 8192, True),
              (8192, 8192, 8192, False)]
    rows = {}
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        for m, inner, n, transposed in shapes:
            a = (torch.randn(inner, m, device="cuda", dtype=torch.bfloat16).t() if transposed
                 else torch.randn(m, inner, device="cuda", dtype=torch.bfloat16))
            b = torch.randn(inner, n, device="cuda", dtype=torch.bfloat16)
            ms = cuda_ms(torch.matmul, a, b, repeats=20)
            rows[f"gemm/{library}/{m}x{inner}x{n}"] = {"ms": ms, "tflops": 2 * m * inner * n / ms / 1e9}
            print(library, m, inner, n, f"{ms:.3f} ms", f"{2 * m * inner * n / ms / 1e9:.1f} TFLOP/s", flush=True)
            del a, b
    torch.backends.cuda.preferred_blas_library("cublas")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="real tokens drawn for the documents")
    parser.add_argument("--json", metavar="FILE", help="write every row as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available() or varlen_attn is None:
        parser.error("needs a CUDA GPU and torch's varlen attention")
    print(torch.__version__, "cuDNN", torch.backends.cudnn.version(), flush=True)
    rows = {**attention_rows(args.tokens), **gemm_rows(sum(rl_lengths(args.tokens, torch.Generator().manual_seed(0))))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
