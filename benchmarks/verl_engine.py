"""verl's training step on this model with ``use_fused_kernels`` off and on, one GPU.

    python benchmarks/verl_engine.py --json verl_engine.json [--lower 2 --upper 2] [--tokens 16384]

Bench shape: 2 real Llama-3.1-8B layers + 2 (or --upper 8) real Llama-3.1-70B layers,
vocabulary 128,256, bf16, packed RL documents (log-normal lengths,
``splitllama.bench_workload.rl_lengths``). Each path is verl 0.9.1's actor ``TrainingWorker``,
built from verl's own config as its PPO trainer builds it
(``splitllama.verify.verl_engine.actor_worker``: the bridge builds the model, random weights
of a split checkpoint written here), then ``train_batch``: micro-batch, megatron's schedule,
forward, verl's loss (sum of log-probs + 1e-3 x entropy at every token but each row's
last), backward, megatron's distributed Adam step. The two paths, in one process, one after
the other (the first worker is freed before the second is built):

- ``off``: ``use_fused_kernels=False``: the model returns vocab-parallel logits and verl
  computes log-probs (megatron's cross entropy) and entropy from the materialised
  ``[T, V/tp]`` float32 logits;
- ``on``: ``use_fused_kernels=True``: verl hands the labels and temperature to the model,
  whose fused head returns log-probs and entropy without materialising the logits.

Reported per path: median step time over --repeats (after --warmup), peak memory, and the
largest token count whose step fits (``--max-tokens``: doubling from --tokens until a step
runs out of memory, then bisecting --bisect times). Then, on a small batch
(--check-tokens), both paths' log-probs and entropy (``infer_batch``, temperature
--temperature) against the oracle in float32 built from the checkpoint, and the bf16 rule
between them: ``on``'s error must be at most twice ``off``'s error plus two bf16 roundings
of max|ref| (docs/verification.md), and the other way round. Targets: on <= 0.85x the time
and <= 0.5x the peak of off, and >= 1.8x the tokens.

On CPU (``--device cpu --tiny``) it runs the built-in tiny model as a smoke test (no
memory figures, no --max-tokens).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

TARGETS = {"time": 0.85, "peak_memory": 0.5, "max_tokens": 1.8}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the built-in tiny model (CPU smoke test)")
    p.add_argument("--lower", type=int, default=2, help="real Llama-3.1-8B layers")
    p.add_argument("--upper", type=int, default=2, help="real Llama-3.1-70B layers")
    p.add_argument("--tokens", type=int, default=16384, help="real tokens of the timed batch")
    p.add_argument("--check-tokens", type=int, default=2048, help="real tokens of the oracle comparison")
    p.add_argument("--temperature", type=float, default=0.75)
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", action="store_true", help="search the largest token count each path fits")
    p.add_argument("--bisect", type=int, default=3, help="bisection steps of the --max-tokens search")
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = _parse(argv)
    from omegaconf import OmegaConf

    from splitllama.bench_workload import ENTROPY_COEF, bench_config, rl_lengths
    from splitllama.cpu_support import cpu_schedule_context, use_cpu_for_verl
    from splitllama.distributed import init_distributed, setup_parallel
    from splitllama.layout import ParallelLayout
    from splitllama.verify import verl_engine
    from splitllama.verify.random_checkpoints import TEST_CHECKPOINT_INIT, random_split_checkpoint
    from splitllama.verify.rules import bf16_allowed_error
    from splitllama.verify.tiny import tiny_split_config

    device = args.device
    if device == "cuda" and args.tiny:
        raise ValueError("--tiny is the CPU smoke test; the GPU run uses the bench shape")
    if device == "cpu" and not args.tiny:
        raise ValueError("on CPU pass --tiny: the bench shape needs a GPU")
    if device == "cpu" and args.max_tokens:
        raise ValueError("--max-tokens searches GPU memory; the CPU smoke test has none to measure")
    init_distributed(device)
    layout = ParallelLayout()
    setup_parallel(layout, device)
    if device == "cpu":
        use_cpu_for_verl()
    config = tiny_split_config() if args.tiny else bench_config("mixed", args.lower, args.upper)
    workdir = tempfile.mkdtemp(prefix="verl_engine_bench_")
    ckpt = os.path.join(workdir, "checkpoint")
    # bf16 test weights (Llama's scale), written in bf16: what both paths and the oracle load
    random_split_checkpoint(config, ckpt, "lm", dtype=torch.bfloat16, **TEST_CHECKPOINT_INIT[torch.bfloat16])
    verl_engine.save_tokenizer(ckpt, config.vocab_size)
    gen = torch.Generator().manual_seed(0)

    def rows_of(tokens: int) -> list[torch.Tensor]:
        lengths = rl_lengths(tokens, gen, median=64 if args.tiny else 512, max_len=256 if args.tiny else 4096)
        return [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in lengths]

    def loss_function(model_output, data, dp_group):
        loss = 0.0
        for lp, ent in zip(model_output["log_probs"].unbind(), model_output["entropy"].unbind()):
            loss = loss + lp[:-1].sum() + ENTROPY_COEF * ent.sum()
        return loss, {}

    def worker_for(fused: bool):
        verl_config = verl_engine.verl_config(ckpt, layout, use_fused_kernels=fused)
        if args.recompute != "none":
            OmegaConf.update(verl_config, "actor_rollout_ref.actor.megatron.override_transformer_config"
                             ".recompute_granularity", args.recompute)
        with cpu_schedule_context():
            worker = verl_engine.actor_worker(verl_config)
        worker.set_loss_fn(loss_function)
        return worker

    def step(worker, rows) -> None:
        with cpu_schedule_context():
            # one micro-batch: every row at once
            worker.train_batch(verl_engine.batch(rows, temperature=args.temperature, update_lr_scheduler=False,
                                                 micro_batch_size_per_gpu=len(rows)))

    def timed(worker, rows) -> dict:
        for _ in range(args.warmup):
            step(worker, rows)
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(worker, rows)
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        return {"ms": statistics.median(times), "peak_memory_gib": peak}

    def fits(worker, tokens: int) -> bool:
        try:
            step(worker, rows_of(tokens))
            _sync(device)
            return True
        except torch.cuda.OutOfMemoryError:
            _free(device)
            return False

    def max_tokens(worker) -> dict:
        low, high = 0, args.tokens
        while fits(worker, high):
            low, high = high, 2 * high
        for _ in range(args.bisect):
            mid = (low + high) // 2
            low, high = (mid, high) if fits(worker, mid) else (low, mid)
        return {"fits": low, "does_not_fit": high}

    def outputs(worker, rows) -> dict[str, list[torch.Tensor]]:
        data = verl_engine.batch(rows, temperature=args.temperature, compute_loss=False,
                                 micro_batch_size_per_gpu=len(rows))
        with cpu_schedule_context():
            out = worker.infer_batch(data)
        return {k: [t.double().cpu() for t in out[k].unbind()] for k in ("log_probs", "entropy")}

    rows, check = rows_of(args.tokens), rows_of(args.check_tokens)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "shape": "tiny" if args.tiny else f"{args.lower}+{args.upper} real layers, vocab 128256, bf16",
              "recompute": args.recompute, "real_tokens": sum(len(r) for r in rows), "documents": len(rows)}
    observed = {}
    for name, fused in (("off", False), ("on", True)):
        # what the process holds before the worker is built: the first worker must be gone
        held = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
        worker = worker_for(fused)
        report[name] = {**timed(worker, rows), "held_before_build_gib": held}
        observed[name] = outputs(worker, check)
        if args.max_tokens:
            report[name]["max_tokens"] = max_tokens(worker)
        print(json.dumps({name: report[name]}), flush=True)  # each path as soon as it is measured
        del worker
        _free(device)

    # equality on the check rows: each path against the float32 oracle, the bf16 rule between them
    from oracle import CustomSplitLLamaForCausalLM

    oracle = CustomSplitLLamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device)
    oracle.config.use_cache = False
    reference = {"log_probs": [], "entropy": []}
    with torch.no_grad():
        for r in check:  # one row at a time: [S, V] float32 logits stay small
            log_p = torch.log_softmax(oracle(input_ids=r[None].to(device)).logits[0].double() / args.temperature, -1)
            reference["log_probs"].append(log_p[:-1].gather(-1, r[1:, None].to(device))[:, 0].cpu())
            reference["entropy"].append((-(log_p.exp() * log_p).sum(-1)).cpu())
    compared = {}
    for key, cut in (("log_probs", True), ("entropy", False)):
        ref = torch.cat(reference[key])
        flat = {p: torch.cat([t[:-1] if cut else t for t in observed[p][key]]) for p in ("off", "on")}
        errors = {p: float((flat[p] - ref).abs().max()) for p in flat}
        scale = float(ref.abs().max())
        finite = all(bool(torch.isfinite(t).all()) for t in flat.values())
        compared[key] = {"off_error": errors["off"], "on_error": errors["on"], "max_abs_ref": scale,
                         "passed": finite and errors["on"] <= bf16_allowed_error(errors["off"], scale)
                         and errors["off"] <= bf16_allowed_error(errors["on"], scale)}
    report["check"] = compared
    report["passed"] = all(c["passed"] for c in compared.values())
    if device == "cuda":
        ratios = {"time": report["on"]["ms"] / report["off"]["ms"],
                  "peak_memory": report["on"]["peak_memory_gib"] / report["off"]["peak_memory_gib"]}
        if args.max_tokens:
            ratios["max_tokens"] = report["on"]["max_tokens"]["fits"] / max(report["off"]["max_tokens"]["fits"], 1)
        report["on_vs_off"] = ratios
        report["targets_met"] = {k: (v >= TARGETS[k] if k == "max_tokens" else v <= TARGETS[k])
                                 for k, v in ratios.items()}
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
