"""verl's Megatron engine on the bridge-built model vs this project's own actor step, one GPU.

    python benchmarks/verl_engine.py --json verl_engine.json [--tokens 16384]

Bench shape: 2 real Llama-3.1-8B layers + 2 real Llama-3.1-70B layers, vocabulary 128,256,
bf16, packed RL documents (log-normal lengths, ``splitllama.bench_workload.rl_lengths``). The model
is built by ``splitllama.bridge`` (random weights) and driven two ways on the same rows:

- ``verl``: verl 0.9.1's own ``forward_backward_batch`` (one micro-batch, megatron's
  schedule, ``gptmodel_forward_model_engine``, its logits processor: materialised
  vocab-parallel logits, entropy, megatron's cross entropy), loss = sum of log-probs +
  1e-3 x entropy at every token but each row's last;
- ``project``: the model's own ``log_probs_and_entropy`` (fused head), the same loss.

Reported per path: median step time over --repeats (after --warmup) and peak memory. Then,
on a small sub-batch (--check-tokens), both paths' log-probs and entropy against the oracle
in float32 built from the exported weights, and the bf16 rule: verl's error must be at most
twice the project's error plus two bf16 roundings of max|ref| (docs/verification.md).

On CPU (``--device cpu --tiny``) it runs the built-in tiny model in float32 as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the built-in tiny model (CPU smoke test)")
    p.add_argument("--tokens", type=int, default=16384, help="real tokens of the timed batch")
    p.add_argument("--check-tokens", type=int, default=2048, help="real tokens of the oracle comparison")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


def _timed(step, device: str, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        step()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"ms": statistics.median(times), "peak_memory_gib": peak}


def main(argv=None) -> dict:
    args = _parse(argv)
    from mbridge import AutoBridge

    import splitllama.bridge  # noqa: F401  (registers the bridge)
    from splitllama.bench_workload import ENTROPY_COEF, bench_config, rl_lengths
    from splitllama.cpu_support import cpu_schedule_context
    from splitllama.distributed import init_distributed, setup_parallel
    from splitllama.layout import ParallelLayout
    from splitllama.verify import verl_engine
    from splitllama.verify.rules import bf16_allowed_error
    from splitllama.verify.tiny import tiny_split_config

    device = args.device
    if device == "cuda" and args.tiny:
        raise ValueError("--tiny is the CPU smoke test; the GPU run uses the bench shape")
    if device == "cpu" and not args.tiny:
        raise ValueError("on CPU pass --tiny: the bench shape needs a GPU")
    init_distributed(device)
    setup_parallel(ParallelLayout(), device)
    config = tiny_split_config() if args.tiny else bench_config("mixed", 2, 2)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    bridge = AutoBridge.from_config(config, dtype=dtype)
    bridge.set_extra_args(sequence_parallel=False, perform_initialization=True)
    (model,) = bridge.get_model()
    engine = verl_engine.engine(bridge, [model], value=False)
    gen = torch.Generator().manual_seed(0)

    def rows_of(tokens: int) -> list[torch.Tensor]:
        lengths = rl_lengths(tokens, gen, median=64 if args.tiny else 512, max_len=256 if args.tiny else 4096)
        return [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in lengths]

    def loss_function(model_output, data, dp_group):
        loss = 0.0
        for lp, ent in zip(model_output["log_probs"].unbind(), model_output["entropy"].unbind()):
            loss = loss + lp[:-1].sum() + ENTROPY_COEF * ent.sum()
        return loss, {}

    def verl_step(rows, forward_only=False):
        data = verl_engine.batch(rows, micro_batch_size=len(rows))
        model.zero_grad(set_to_none=True)
        with cpu_schedule_context():
            out = engine.forward_backward_batch(data, None if forward_only else loss_function,
                                                forward_only=forward_only)
        return out["model_output"]

    def project_step(rows, backward=True):
        seq = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), seq, dtype=torch.long)
        mask = torch.zeros(len(rows), seq, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, True
        ids, mask = ids.to(device), mask.to(device)
        labels = torch.roll(ids, -1, dims=1)
        model.zero_grad(set_to_none=True)
        lp, ent = model.log_probs_and_entropy(ids, mask, labels)
        last = torch.arange(seq, device=device)[None] < mask.sum(-1, keepdim=True) - 1
        if backward:
            ((lp * last).sum() + ENTROPY_COEF * (ent * mask).sum()).backward()
        return [lp[i, : len(r)].detach() for i, r in enumerate(rows)], [ent[i, : len(r)].detach()
                                                                       for i, r in enumerate(rows)]

    rows = rows_of(args.tokens)
    report = {"device": device, "shape": "tiny" if args.tiny else "2+2 real layers, vocab 128256, bf16",
              "real_tokens": sum(len(r) for r in rows), "documents": len(rows)}
    report["verl"] = _timed(lambda: verl_step(rows), device, args.warmup, args.repeats)
    report["project"] = _timed(lambda: project_step(rows), device, args.warmup, args.repeats)

    # equality on a sub-batch: both paths against the float32 oracle, the bf16 rule between them
    check = rows_of(args.check_tokens)
    with torch.no_grad():
        verl_out = verl_step(check, forward_only=True)
        proj_lp, proj_ent = project_step(check, backward=False)
    from oracle import CustomSplitLLamaForCausalLM

    state = {name: t.float().cpu() for name, t in bridge.export_weights([model])}
    oracle = CustomSplitLLamaForCausalLM(config).float()
    oracle.load_state_dict(state, strict=True)
    oracle.config.use_cache = False
    oracle.to(device)
    ref_lp, ref_ent = [], []
    with torch.no_grad():
        for r in check:  # one row at a time: [S, V] float32 logits stay small
            log_p = torch.log_softmax(oracle(input_ids=r[None].to(device)).logits[0].double(), -1)
            ref_lp.append(log_p[:-1].gather(-1, r[1:, None].to(device))[:, 0])
            ref_ent.append(-(log_p.exp() * log_p).sum(-1))
    rows_cmp = {}
    for name, verl_rows, proj_rows, ref_rows, cut in (
            ("log_probs", verl_out["log_probs"].unbind(), proj_lp, ref_lp, True),
            ("entropy", verl_out["entropy"].unbind(), proj_ent, ref_ent, False)):
        v = torch.cat([(t[:-1] if cut else t).double() for t in verl_rows])
        p = torch.cat([(t[:-1] if cut else t).double() for t in proj_rows])
        ref = torch.cat(ref_rows).double()
        verl_err, proj_err = float((v - ref).abs().max()), float((p - ref).abs().max())
        scale = float(ref.abs().max())
        bound = bf16_allowed_error(proj_err, scale)
        rows_cmp[name] = {"verl_error": verl_err, "project_error": proj_err, "max_abs_ref": scale,
                          "allowed": bound, "passed": bool(torch.isfinite(v).all()) and verl_err <= bound}
    report["check"] = rows_cmp
    report["passed"] = all(r["passed"] for r in rows_cmp.values())
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
