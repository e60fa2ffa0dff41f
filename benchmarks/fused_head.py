"""The LM head alone, log-prob + entropy, forward + backward: fused vs materialising, and
beside the fused heads of verl and Liger.

    python benchmarks/fused_head.py --json out.json [--tokens 16384 --max-tokens 131072]
    git show <commit>:splitllama/logprobs.py > /tmp/logprobs_before.py
    python benchmarks/fused_head.py --paths fused,fused_before,verl,liger --before /tmp/logprobs_before.py

hidden ``[T, H]`` and the weight shard ``[V/tp, H]`` in bf16 on one GPU (``--tp`` only
shrinks the shard to V/tp rows, as one rank of a TP group would hold; no collectives run).
For T = --tokens, 2x, 4x, ... up to --max-tokens, each path reports:
- paths: fused (weight gradient returned in bf16), materialising, and with --paths
  fused_fp32_grad (weight gradient added into a resident float32 buffer, as main_grad),
  fused_kept (the fused head as a model without activation recompute runs it: each tile's
  probabilities kept in bf16 for backward instead of recomputing its logits),
  ``fused@CxB`` (the fused head with chunks of C tokens and vocabulary blocks of B rows),
  fused_before (``fused_log_probs_entropy`` of the module file given by --before: an earlier
  revision, measured in the same process), verl (verl 0.9.1's Triton
  ``linear_cross_entropy``, what its ``use_fused_kernels`` runs) and liger (Liger 0.8.5's
  ``LigerFusedLinearScaledCrossEntropyFunction``: its CuTe kernel on SM90, a torch fallback
  elsewhere);
- ms: median over --repeats of CUDA-event timings of forward + backward (after --warmup);
- peak GiB above resident: ``max_memory_allocated`` during the step minus what was
  allocated before it (inputs, weight); ``transient`` subtracts what the step leaves
  behind (outputs, grad of hidden, grad of the weight);
- max-abs error of log-prob and entropy against a float32-GEMM reference (the same bf16
  inputs, logits from a float32 GEMM, log_softmax in float64);
- on --check-tokens tokens (once per path): max-abs error of log-prob and entropy and the
  relative error (norm of the difference over the norm) of the hidden and weight gradients
  against float64 (the same bf16 inputs, everything after them in float64).
A path that runs out of memory is reported as OOM and not tried at larger T.
Runs on CPU too (tiny --hidden/--vocab only: a smoke test of the script).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitllama.logprobs import (  # noqa: E402
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_VOCAB_BLOCK,
    fused_log_probs_entropy,
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
)
from splitllama.bench import step_times_ms  # noqa: E402
from splitllama.distributed import init_distributed, setup_parallel  # noqa: E402
from splitllama.layout import ParallelLayout  # noqa: E402

GIB = 2**30


def materialising(hidden, weight, labels):
    logits = hidden @ weight.T
    return vocab_parallel_log_probs(logits, labels), vocab_parallel_entropy(logits)


def make_fused(chunk_tokens, vocab_block, recompute_logits=True):
    def fused(hidden, weight, labels):
        return fused_log_probs_entropy(hidden, weight, labels, chunk_tokens=chunk_tokens,
                                       vocab_block=vocab_block, tp_group=None, recompute_logits=recompute_logits)
    return fused


def make_fused_fp32_grad(chunk_tokens, vocab_block):
    """The fused head adding the weight's gradient into a float32 buffer (as megatron's
    main_grad), resident like the weight."""
    buffers = {}

    def fused(hidden, weight, labels):
        if weight not in buffers:
            buffers.clear()
            buffers[weight] = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        return fused_log_probs_entropy(hidden, weight, labels, chunk_tokens=chunk_tokens, vocab_block=vocab_block,
                                       tp_group=None, grad_weight_into=buffers[weight])
    return fused


def make_before(path):
    """``fused_log_probs_entropy`` of an earlier revision's logprobs.py, at its defaults."""
    spec = importlib.util.spec_from_file_location("logprobs_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def fused(hidden, weight, labels):
        return module.fused_log_probs_entropy(hidden, weight, labels, tp_group=None)
    return fused


def verl_head(hidden, weight, labels):
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels, 1.0, "none", None)


def liger_head(hidden, weight, labels):
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    nll, ent = LigerFusedLinearScaledCrossEntropyFunction.apply(hidden, weight, labels, 1.0, -100, 1, True)
    return -nll, ent


def float64_errors(head, weight, tokens, gen, device) -> dict:
    """Errors of ``head`` on ``tokens`` tokens against float64 autograd of the same bf16
    inputs: log-prob and entropy max-abs, hidden and weight gradients relative (norm)."""
    hidden = torch.randn(tokens, weight.shape[1], generator=gen, device=device).to(torch.bfloat16)
    labels = torch.randint(0, weight.shape[0], (tokens,), generator=gen, device=device)
    g_lp, g_ent = torch.randn(2, tokens, generator=gen, device=device)
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    log_p = torch.log_softmax(h64 @ w64.T, -1)
    ref_lp, ref_ent = log_p.gather(1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    del log_p
    h = hidden.clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    lp, ent = head(h, w, labels)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()

    def rel(got, want):
        return float((got.double() - want).norm() / want.norm())
    return {"check_tokens": tokens, "check_lp_err": float((lp.detach().double() - ref_lp.detach()).abs().max()),
            "check_ent_err": float((ent.detach().double() - ref_ent.detach()).abs().max()),
            "grad_hidden_rel": rel(h.grad, h64.grad), "grad_weight_rel": rel(w.grad, w64.grad)}


def reference(hidden, weight32, labels, chunk=4096):
    """Log-prob and entropy from float32-GEMM logits, float64 softmax, in token chunks."""
    lps, ents = [], []
    for a in range(0, hidden.shape[0], chunk):
        log_p = torch.log_softmax((hidden[a:a + chunk].float() @ weight32.T).double(), -1)
        lps.append(log_p.gather(1, labels[a:a + chunk, None])[:, 0])
        ents.append(-(log_p.exp() * log_p).sum(-1))
        del log_p
    return torch.cat(lps), torch.cat(ents)


def measure(head, hidden, weight, labels, g_lp, g_ent, args, device):
    def step():
        lp, ent = head(hidden, weight, labels)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp, ent

    def clear():
        hidden.grad = weight.grad = None

    if device == "cuda":
        times = step_times_ms(step, args.warmup, args.repeats, between=clear)
    else:
        for _ in range(args.warmup):
            step()
            clear()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
            clear()
    row = {"ms": statistics.median(times), "ms_all": times}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        lp, ent = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        left = sum(t.numel() * t.element_size() for t in (lp, ent, hidden.grad, weight.grad) if t is not None)
        row.update(peak_gib=peak / GIB, transient_gib=(peak - left) / GIB)
        del lp, ent
        clear()
    with torch.no_grad():
        lp, ent = head(hidden, weight, labels)
    row.update(lp=lp.detach(), ent=ent.detach())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--max-tokens", type=int, default=131072)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tp", type=int, default=1, help="the shard holds vocab/tp rows")
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--vocab-block", type=int, default=DEFAULT_VOCAB_BLOCK)
    parser.add_argument("--paths", default="fused,materialising",
                        help="comma-separated: fused, materialising, fused_fp32_grad, fused_kept, fused@CxB, "
                             "fused_before, verl, liger")
    parser.add_argument("--before", metavar="FILE", help="an earlier logprobs.py, for the fused_before path")
    parser.add_argument("--check-tokens", type=int, default=2048,
                        help="tokens of the float64 error check of each path (0: none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    paths = args.paths.split(",")
    fixed = ("fused", "materialising", "fused_fp32_grad", "fused_kept", "fused_before", "verl", "liger")
    variants = {}
    for name in paths:
        if name.startswith("fused@"):
            try:
                chunk, block = (int(x) for x in name[len("fused@"):].split("x"))
            except ValueError:
                parser.error(f"--paths: {name!r}: expected fused@CxB with integers C and B")
            variants[name] = make_fused(chunk, block)
        elif name not in fixed:
            parser.error(f"--paths: {name!r} is not one of {', '.join(fixed)} or fused@CxB")
    if "fused_before" in paths and not args.before:
        parser.error("--paths fused_before needs --before FILE")
    if args.vocab % args.tp:
        parser.error(f"--vocab {args.vocab} is not divisible by --tp {args.tp}")
    if args.tokens < 1 or args.max_tokens < args.tokens:
        parser.error("--tokens must be >= 1 and <= --max-tokens")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed(device)
    setup_parallel(ParallelLayout(), device)  # the materialising path reads megatron's TP state (tp=1)
    heads = {"fused": make_fused(args.chunk_tokens, args.vocab_block), "materialising": materialising,
             "fused_fp32_grad": make_fused_fp32_grad(args.chunk_tokens, args.vocab_block),
             "fused_kept": make_fused(args.chunk_tokens, args.vocab_block, recompute_logits=False),
             "verl": verl_head, "liger": liger_head, **variants}
    if args.before:
        heads["fused_before"] = make_before(args.before)

    gen = torch.Generator(device=device).manual_seed(0)
    width = args.vocab // args.tp
    # logits of std ~1.8, as a trained head's are O(1-10)
    weight = (torch.randn(width, args.hidden, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    weight.requires_grad_(True)
    results, alive, tokens = [], set(paths), args.tokens
    if args.check_tokens:
        for name in paths:
            check_gen = torch.Generator(device=device).manual_seed(1)  # the same tokens for every path
            results.append({"path": name, "check": True,
                            **float64_errors(heads[name], weight, args.check_tokens, check_gen, device)})
            weight.grad = None
            if device == "cuda":
                torch.cuda.empty_cache()
    while tokens <= args.max_tokens and alive:
        hidden = torch.randn(tokens, args.hidden, generator=gen, device=device).to(torch.bfloat16).requires_grad_(True)
        labels = torch.randint(0, width, (tokens,), generator=gen, device=device)
        g_lp, g_ent = torch.randn(2, tokens, generator=gen, device=device)
        weight32 = weight.detach().float()
        ref_lp, ref_ent = reference(hidden.detach(), weight32, labels)
        del weight32
        for name in paths:
            if name not in alive:
                continue
            try:
                row = measure(heads[name], hidden, weight, labels, g_lp, g_ent, args, device)
            except torch.OutOfMemoryError:
                hidden.grad = weight.grad = None
                alive.discard(name)
                results.append({"path": name, "tokens": tokens, "oom": True})
                torch.cuda.empty_cache()
                continue
            row["lp_err"] = float((row.pop("lp").double() - ref_lp).abs().max())
            row["ent_err"] = float((row.pop("ent").double() - ref_ent).abs().max())
            results.append({"path": name, "tokens": tokens, **row})
            if device == "cuda":
                torch.cuda.empty_cache()
        del hidden, labels, g_lp, g_ent, ref_lp, ref_ent
        tokens *= 2

    print(f"{'path':<16}{'tokens':>8}{'ms':>10}{'peak GiB':>10}{'transient':>11}{'lp err':>10}{'ent err':>10}")
    for r in results:
        if r.get("check"):
            continue
        if r.get("oom"):
            print(f"{r['path']:<16}{r['tokens']:>8}{'OOM':>10}")
            continue
        print(f"{r['path']:<16}{r['tokens']:>8}{r['ms']:>10.1f}{r.get('peak_gib', float('nan')):>10.2f}"
              f"{r.get('transient_gib', float('nan')):>11.2f}{r['lp_err']:>10.2e}{r['ent_err']:>10.2e}")
    checks = [r for r in results if r.get("check")]
    if checks:
        print(f"\nagainst float64 on {args.check_tokens} tokens:")
        print(f"{'path':<16}{'lp err':>10}{'ent err':>10}{'grad_h rel':>12}{'grad_w rel':>12}")
        for r in checks:
            print(f"{r['path']:<16}{r['check_lp_err']:>10.2e}{r['check_ent_err']:>10.2e}"
                  f"{r['grad_hidden_rel']:>12.2e}{r['grad_weight_rel']:>12.2e}")
    if args.json:
        info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "args": vars(args), "results": results}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
