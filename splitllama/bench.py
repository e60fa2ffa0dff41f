"""``splitllama bench``: real Llama-3.1 shapes on CUDA, measured side by side in one run.

Parts (``--only`` picks some):

* ``ceiling``   the bf16 matmul ceiling of this card (one 8192^3 GEMM), the yardstick;
* ``packing``   packed production vs padded production (same megatron layers, SDPA with
                a padding mask) vs the padded oracle, on documents drawn from an RL length
                distribution (padding fraction p reported), and the p = 0 control;
* ``backends``  the packed model with each available attention backend;
* ``tp``        (world size 2) TP=2 with and without SP vs TP=1, for 8B-shaped and
                70B-shaped stacks: per-GPU efficiency and peak memory;
* ``recompute`` activation recompute none / selective / full on the packed model: step
                time and activation memory;
* ``head``      the LM head's log-prob paths side by side, fused (tiles from the hidden
                states) vs materialising (``[T, V]`` logits), packed, on the same documents;
* ``max_tokens`` for each log-prob path, the packed token count doubled from ``--tokens``
                until out of memory: the largest that fits, its step time and peak memory;
* ``profile``   torch profiler over one packed step: where the GPU time goes, by
                operator and by kind (matmul, attention, other), to aim the next change.

The timed step is what an RL actor does: forward, log-probabilities of the next tokens and
the entropy of each next-token distribution (vocabulary kept split over TP), backward of a
loss of both. Useful FLOPs count real tokens only (Megatron's formula with causal
attention halved, docs/verification.md), so padded runs are credited with the same work.
Times are CUDA-event medians after warm-up, on fresh random inputs.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from splitllama.attention import BACKEND_ENV, available_backends
from splitllama.config import CustomSplitLlamaConfig, llama_preset
from splitllama.model import ParallelCustomSplitLLamaForCausalLM, ParallelCustomSplitLLamaForCausalLMRmPad
from splitllama.distributed import init_distributed, megatron_config, setup_parallel, shutdown
from splitllama.layout import ParallelLayout
from splitllama.options import LOG_PROBS_CHOICES, RECOMPUTE_CHOICES, ModelOptions

PARTS = ("ceiling", "packing", "backends", "tp", "recompute", "head", "max_tokens", "profile")
REAL_VOCAB = 128256
# The actor loss weighs entropy as RL trainers' entropy bonus does; any non-zero weight
# makes the backward go through the entropy.
ENTROPY_COEF = 1e-3
# max_tokens stops doubling here even if memory is left (16M tokens: far past one GPU).
MAX_TOKENS_LIMIT = 1 << 24


# ---- workload ----------------------------------------------------------------------------
def rl_lengths(tokens: int, gen: torch.Generator, median: int = 512, sigma: float = 0.9,
               max_len: int = 4096) -> list[int]:
    """Document lengths of RL rollouts (prompt + response): log-normal around ``median``,
    clipped to [16, max_len], drawn until ``tokens`` real tokens."""
    lengths: list[int] = []
    while sum(lengths) < tokens:
        draw = math.exp(math.log(median) + sigma * float(torch.randn(1, generator=gen)))
        lengths.append(int(min(max(draw, 16), max_len)))
    return lengths


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lengths: list[int]

    @property
    def padding_fraction(self) -> float:
        return 1.0 - sum(self.lengths) / self.attention_mask.numel()


def make_batch(lengths: list[int], vocab: int, gen: torch.Generator, device: str) -> Batch:
    """One document per row (as rollouts are), right-padded to the longest."""
    seq = max(lengths)
    mask = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    ids = torch.randint(0, vocab, mask.shape, generator=gen)
    return Batch(ids.to(device), mask.to(device), ids.roll(-1, 1).to(device), lengths)


def useful_flops(config: CustomSplitLlamaConfig, lengths: list[int]) -> float:
    """Forward + backward FLOPs of the real tokens (Megatron's count, causal halved)."""
    tokens = sum(lengths)
    s_bar = sum(n * n for n in lengths) / tokens
    per_token = 0.0
    for sub, count in ((config.lower, config.num_lower), (config.upper, config.num_upper)):
        h, d, nh, nkv = sub.hidden_size, sub.head_dim, sub.num_attention_heads, sub.num_key_value_heads
        params = h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * sub.intermediate_size
        per_token += count * (6 * params + 6 * nh * d * s_bar)
    per_token += 6 * config.h_lo * config.h_hi + (6 * config.h_hi ** 2 if config.mlp else 0)
    per_token += 6 * config.h_hi * config.vocab_size
    return per_token * tokens


def bench_config(family: str, lower_layers: int, upper_layers: int) -> CustomSplitLlamaConfig:
    """Real shapes: ``mixed`` = 8B lower + 70B upper (the product); ``8b`` / ``70b`` = both
    stacks of one shape (for TP scaling per layer shape)."""
    lower = {"mixed": "llama3.1-8b", "8b": "llama3.1-8b", "70b": "llama3.1-70b"}[family]
    upper = {"mixed": "llama3.1-70b", "8b": "llama3.1-8b", "70b": "llama3.1-70b"}[family]
    return CustomSplitLlamaConfig.from_llama_configs(
        llama_preset(lower, num_hidden_layers=lower_layers),
        llama_preset(upper, num_hidden_layers=upper_layers),
        lower_layers, upper_layers,
    )


# ---- timing ------------------------------------------------------------------------------
def step_times_ms(step, warmup: int, repeats: int, between=None) -> list[float]:
    """CUDA-event time of each of ``repeats`` calls of ``step`` after ``warmup`` untimed
    ones; ``between`` (untimed) runs after every call."""
    for _ in range(warmup):
        step()
        if between:
            between()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if between:
            between()
    return times


def time_ms(step, warmup: int, repeats: int) -> float:
    return statistics.median(step_times_ms(step, warmup, repeats))


def matmul_ceiling(repeats: int) -> float:
    """bf16 TFLOP/s of one 8192^3 GEMM on random data."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=5, repeats=max(repeats, 20))
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def actor_step(model, batch: Batch, entropy: bool = True):
    """Forward, next-token log-probs and entropy, backward: what an RL actor's update does."""
    def step():
        model.zero_grad(set_to_none=True)
        log_probs, ent = model.log_probs_and_entropy(batch.input_ids, batch.attention_mask, batch.labels,
                                                     entropy=entropy)
        loss = (log_probs * batch.attention_mask).sum()
        if ent is not None:
            loss = loss + ENTROPY_COEF * (ent * batch.attention_mask).sum()
        loss.backward()
    return step


def oracle_step(model, batch: Batch):
    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        log_probs = torch.log_softmax(logits, -1).gather(-1, batch.labels[..., None])[..., 0]
        (log_probs * batch.attention_mask).sum().backward()
    return step


def measure(name: str, step, batch: Batch, config, ceiling: float, args, gpus: int = 1) -> dict:
    """Time ``step``; TFLOP/s and the fraction of the ceiling are per GPU (``gpus`` share
    the step). Activation memory is the peak minus what stays resident after a step
    (parameters and their gradients)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = time_ms(step, args.warmup, args.repeats)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"name": name, "error": "out of memory", "real_tokens": sum(batch.lengths)}
    peak, resident = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    tflops = useful_flops(config, batch.lengths) / (ms * 1e-3) / 1e12 / gpus
    return {
        "name": name, "ms": ms, "tokens_per_s": sum(batch.lengths) / (ms * 1e-3),
        "useful_tflops": tflops, "fraction_of_ceiling": tflops / ceiling if ceiling else None,
        "peak_memory_gib": peak / 2**30, "activation_memory_gib": (peak - resident) / 2**30,
        "padding_fraction": batch.padding_fraction, "real_tokens": sum(batch.lengths),
    }


# ---- models ------------------------------------------------------------------------------
def build(cls, config, layout: ParallelLayout, options: ModelOptions | None = None):
    setup_parallel(layout, "cuda")
    model = cls(config, megatron_config(layout, torch.bfloat16, "cuda", initialize=True), options=options)
    return model.cuda()


def build_oracle(config):
    from oracle import CustomSplitLLamaForCausalLM

    with torch.device("cuda"):
        oracle = CustomSplitLLamaForCausalLM(config).to(torch.bfloat16)
    oracle.config.use_cache = False  # a training step: the config's default would fill a KV cache
    return oracle


# ---- parts ---------------------------------------------------------------------------------
def fitting(name: str, step_of, lengths: list[int], config, ceiling, args, gen) -> tuple[list[dict], Batch]:
    """Time a padded model on the RL documents; padded runs hold [rows, S] activations
    (the oracle's eager attention [rows, heads, S, S]), so when the batch does not fit,
    halve the documents. Returns the rows (out-of-memory attempts included) and the batch
    that was timed last."""
    rows = []
    while True:
        batch = make_batch(lengths, config.vocab_size, gen, "cuda")
        rows.append({**measure(f"rl/{name}[{len(lengths)} docs]", step_of(batch), batch, config, ceiling, args),
                     "part": "packing"})
        if "error" not in rows[-1] or len(lengths) == 1:
            return rows, batch
        lengths = lengths[: len(lengths) // 2]


def part_packing(config, ceiling, args, gen) -> list[dict]:
    """Packed production vs padded production and vs the padded oracle, each pair timed on
    the same documents; p = 0 (equal lengths) is the control."""
    rows = []
    layout = ParallelLayout()
    lengths = rl_lengths(args.tokens, gen)
    options = ModelOptions(recompute=args.recompute)
    packed = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, layout, options)
    padded = build(ParallelCustomSplitLLamaForCausalLM, config, layout, options)

    def packed_on(batch):
        return {**measure(f"rl/packed[{len(batch.lengths)} docs]", actor_step(packed, batch), batch, config,
                          ceiling, args), "part": "packing"}

    even = make_batch([args.tokens // 8] * 8, config.vocab_size, gen, "cuda")
    for name, model in (("packed", packed), ("padded", padded)):
        rows.append({**measure(f"p0/{name}", actor_step(model, even), even, config, ceiling, args),
                     "part": "packing"})
    rows.append(packed_on(make_batch(lengths, config.vocab_size, gen, "cuda")))
    timed, batch = fitting("padded", functools.partial(actor_step, padded), lengths, config, ceiling, args, gen)
    rows += timed
    if batch.lengths != lengths:
        rows.append(packed_on(batch))
    padded = None  # frees its memory before the oracle is built
    torch.cuda.empty_cache()
    oracle = build_oracle(config)
    timed, batch = fitting("oracle", functools.partial(oracle_step, oracle), lengths, config, ceiling, args, gen)
    rows += timed
    oracle = None
    torch.cuda.empty_cache()
    if not any(r["name"] == f"rl/packed[{len(batch.lengths)} docs]" for r in rows):
        rows.append(packed_on(batch))
    return rows


def part_backends(config, ceiling, args, gen) -> list[dict]:
    model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(),
                  ModelOptions(recompute=args.recompute))
    batch = make_batch(rl_lengths(args.tokens, gen), config.vocab_size, gen, "cuda")
    rows = []
    previous = os.environ.get(BACKEND_ENV)
    try:
        for backend in available_backends(torch.device("cuda"), torch.bfloat16):
            os.environ[BACKEND_ENV] = backend
            rows.append({**measure(f"backend/{backend}", actor_step(model, batch), batch, config, ceiling, args),
                         "part": "backends"})
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous
    return rows


def world_layout() -> ParallelLayout:
    """The layout the head and recompute parts run at: TP over every process, with SP
    when there is more than one (what a user of several GPUs of one host runs)."""
    world = dist.get_world_size()
    return ParallelLayout(tp=world, sp=world > 1)


def busiest(row: dict) -> dict:
    """``row`` with the peak and activation memory of the busiest GPU: it sets the limit."""
    if dist.get_world_size() == 1 or "error" in row:
        return row
    memory = torch.tensor([row["peak_memory_gib"], row["activation_memory_gib"]], device="cuda")
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    return {**row, "peak_memory_gib": float(memory[0]), "activation_memory_gib": float(memory[1])}


def time_variants(part: str, variants: dict[str, ModelOptions], config, ceiling, args, gen) -> list[dict]:
    """Packed actor steps of each variant (its model options) on the same documents, at
    ``world_layout()``; one model at a time, so each variant's peak memory is its own."""
    batch = make_batch(rl_lengths(args.tokens, gen), config.vocab_size, gen, "cuda")
    layout = world_layout()
    rows = []
    for variant, options in variants.items():
        model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, layout, options)
        name = f"{part}/{variant}" + ("" if layout.tp == 1 else f"/{layout}")
        row = measure(name, actor_step(model, batch), batch, config, ceiling, args, gpus=layout.tp)
        rows.append({**busiest(row), "part": part, "recompute": options.recompute, "log_probs": options.log_probs})
        del model
        torch.cuda.empty_cache()
    return rows


def part_recompute(config, ceiling, args, gen) -> list[dict]:
    """The packed model with each activation recompute setting, on the same documents."""
    rows = time_variants("recompute", {r: ModelOptions(recompute=r) for r in RECOMPUTE_CHOICES},
                         config, ceiling, args, gen)
    base = rows[0]
    for row in rows:
        if "ms" in row and "ms" in base:
            row["time_vs_none"] = row["ms"] / base["ms"]
            row["activation_memory_vs_none"] = row["activation_memory_gib"] / base["activation_memory_gib"]
    return rows


def part_head(config, ceiling, args, gen) -> list[dict]:
    """Packed actor steps (entropy on) with each log-prob path of the LM head, on the same
    documents."""
    return time_variants("head", {path: ModelOptions(recompute=args.recompute, log_probs=path)
                                  for path in LOG_PROBS_CHOICES},
                         config, ceiling, args, gen)


def part_max_tokens(config, ceiling, args, gen) -> list[dict]:
    """For each log-prob path: packed actor steps (entropy on) at ``--tokens``, twice that,
    ... until out of memory; the largest that fits with its time and peak memory. Every
    size draws its documents from its own seed, so both paths see the same batches."""
    if dist.get_world_size() > 1:
        # an out-of-memory on one TP rank would leave the others waiting in a collective
        return [{"name": "max_tokens", "part": "max_tokens", "error": "runs on one GPU only"}]
    quick = argparse.Namespace(**{**vars(args), "warmup": 1, "repeats": min(args.repeats, 3)})
    rows = []
    for path in LOG_PROBS_CHOICES:
        model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(),
                      ModelOptions(recompute=args.recompute, log_probs=path))
        largest, out_of_memory_at, tokens = None, None, args.tokens
        while tokens <= MAX_TOKENS_LIMIT:
            sized = torch.Generator().manual_seed(args.seed + tokens)
            batch = make_batch(rl_lengths(tokens, sized), config.vocab_size, sized, "cuda")
            row = measure(f"max_tokens/{path}[{tokens}]", actor_step(model, batch), batch, config, ceiling, quick)
            del batch
            if "error" in row:
                out_of_memory_at = tokens
                break
            largest = row
            tokens *= 2
        rows.append(max_tokens_row(path, largest, out_of_memory_at))
        del model
        torch.cuda.empty_cache()
    return rows


def max_tokens_row(path: str, largest: dict | None, out_of_memory_at: int | None) -> dict:
    """``largest``: the measured row of the largest batch that fit (None: not even the first)."""
    row = {"name": f"max_tokens/{path}", "part": "max_tokens", "log_probs": path,
           "largest_tokens": None, "out_of_memory_at": out_of_memory_at}
    if largest is not None:
        row.update(largest_tokens=largest["real_tokens"], ms=largest["ms"],
                   peak_memory_gib=largest["peak_memory_gib"], tokens_per_s=largest["tokens_per_s"])
    return row


def part_tp(config, ceiling, args, gen) -> list[dict]:
    world = dist.get_world_size()
    rows = []
    for family in ("8b", "70b"):
        config = bench_config(family, args.lower_layers, args.upper_layers)
        batch = make_batch(rl_lengths(args.tokens, gen), config.vocab_size, gen, "cuda")
        for layout in (ParallelLayout(), ParallelLayout(tp=world), ParallelLayout(tp=world, sp=True)):
            model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, layout,
                          ModelOptions(recompute=args.recompute))
            row = measure(f"tp/{family}/{layout}", actor_step(model, batch), batch, config, ceiling, args,
                          gpus=layout.tp)
            rows.append({**busiest(row), "part": "tp", "family": family, "tp": layout.tp, "sp": layout.sp})
            del model
            torch.cuda.empty_cache()
        base = rows[-3]["ms"]
        for row in rows[-2:]:
            row["per_gpu_efficiency"] = base / (row["tp"] * row["ms"])
    return rows


# Substrings of CUDA kernel names, checked in this order (cuBLAS on Hopper names its GEMMs
# nvjet_* or *xmma*; torch's flash kernels contain "flash").
_KINDS = (
    ("attention", ("flash", "attention", "fmha", "flex")),
    ("matmul", ("gemm", "matmul", "cutlass", "xmma", "nvjet")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in _KINDS if any(k in lowered for k in keys)), "other")


def part_profile(config, ceiling, args, gen) -> list[dict]:
    """One packed actor step under the torch profiler: GPU time by kernel kind and the
    top kernels (names as the profiler reports them)."""
    from torch.profiler import ProfilerActivity, profile

    model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout())
    batch = make_batch(rl_lengths(args.tokens, gen), config.vocab_size, gen, "cuda")
    step = actor_step(model, batch)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels) or 1.0
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time_total
    top = sorted(kernels, key=lambda e: -e.device_time_total)[:15]
    return [{
        "name": "profile/packed", "part": "profile",
        "gpu_ms": total / 1e3,
        "share_by_kind": {k: v / total for k, v in sorted(by_kind.items())},
        "top_kernels": [{"kernel": e.key[:120], "ms": e.device_time_total / 1e3, "calls": e.count} for e in top],
    }]


# ---- report ---------------------------------------------------------------------------------
def summary(rows: list[dict], ceiling: float) -> str:
    lines = [f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s (TFLOP/s below are per GPU)"]
    lines.append(f"{'run':<28} {'ms':>9} {'tok/s':>10} {'TFLOP/s':>8} {'of ceil':>7} {'peak GiB':>8} "
                 f"{'act GiB':>7} {'p':>5}  extra")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<28} {r['error']}")
            continue
        if r.get("part") == "max_tokens":
            continue  # reported below the table
        if r.get("part") == "profile":
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["share_by_kind"].items())
            lines.append(f"{r['name']:<28} GPU time {r['gpu_ms']:.1f} ms: {shares}")
            lines += [f"    {k['ms']:8.2f} ms x{k['calls']:<4} {k['kernel']}" for k in r["top_kernels"]]
            continue
        extra = f"eff {r['per_gpu_efficiency']:.2f}" if "per_gpu_efficiency" in r else ""
        if "time_vs_none" in r:
            extra = f"time {r['time_vs_none']:.2f}x, activations {r['activation_memory_vs_none']:.2f}x of none"
        lines.append(
            f"{r['name']:<28} {r['ms']:9.1f} {r['tokens_per_s']:10.0f} {r['useful_tflops']:8.1f} "
            f"{r['fraction_of_ceiling']:7.2f} {r['peak_memory_gib']:8.1f} {r['activation_memory_gib']:7.1f} "
            f"{r['padding_fraction']:5.2f}  {extra}"
        )
    for packed, padded in speedup_pairs(rows):
        p = padded["padding_fraction"]
        target = 0.85 / (1 - p) if p > 0 else 0.97
        lines.append(f"speedup {packed['name']} vs {padded['name']} (p={p:.2f}): "
                     f"{padded['ms'] / packed['ms']:.2f} (target >= {target:.2f})")
    for fused, materialised in head_pairs(rows):
        lines.append(f"fused vs materialising step time at {fused['real_tokens']} tokens (entropy on): "
                     f"{fused['ms'] / materialised['ms']:.2f}x (target <= 0.95), peak memory "
                     f"{fused['peak_memory_gib'] / materialised['peak_memory_gib']:.2f}x")
    for r in rows:
        if r.get("part") == "max_tokens":
            lines.append(max_tokens_line(r))
    by_name = {r["name"]: r for r in rows if "ms" in r}
    for on in (r for r in by_name.values() if r.get("sp")):
        off = by_name.get(on["name"].replace("_sp", ""))
        if off:
            lines.append(f"SP on/off at TP={on['tp']}, {on['family']}: time {on['ms'] / off['ms']:.2f} "
                         "(target <= 1.02), "
                         f"activation memory {on['activation_memory_gib'] / off['activation_memory_gib']:.2f} "
                         "(target <= 0.80)")
    return "\n".join(lines)


def max_tokens_line(r: dict) -> str:
    end = (f"out of memory at {r['out_of_memory_at']}" if r["out_of_memory_at"] is not None
           else f"stopped at the {MAX_TOKENS_LIMIT}-token limit")
    if r["largest_tokens"] is None:
        return f"max tokens {r['log_probs']}: none fits ({end})"
    return (f"max tokens {r['log_probs']}: {r['largest_tokens']} real tokens, {r['ms']:.1f} ms, "
            f"{r['peak_memory_gib']:.1f} GiB peak ({end})")


def head_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(fused, materialise) rows of the ``head`` part timed on the same documents."""
    timed = [r for r in rows if r.get("part") == "head" and "ms" in r]
    pairs = []
    for fused in (r for r in timed if r["log_probs"] == "fused"):
        other = next((r for r in timed if r["log_probs"] == "materialise"
                      and r["real_tokens"] == fused["real_tokens"]), None)
        if other:
            pairs.append((fused, other))
    return pairs


def speedup_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(packed, padded) rows timed on the same documents: ``X/packed[...]`` with
    ``X/padded[...]`` or ``X/oracle[...]``, ``p0/packed`` with ``p0/padded``."""
    timed = {r["name"]: r for r in rows if "ms" in r and r.get("part") == "packing"}
    pairs = []
    for name, row in timed.items():
        prefix, _, rest = name.partition("/")
        for kind in ("padded", "oracle"):
            if rest.startswith(kind):
                packed = timed.get(f"{prefix}/packed{rest[len(kind):]}")
                if packed:
                    pairs.append((packed, row))
    return pairs


def plot(rows: list[dict], ceiling: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "useful_tflops" in r]
    if not good:
        return
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(good) + 1.5))
    ax.barh([r["name"] for r in good], [r["useful_tflops"] for r in good], color="tab:blue")
    ax.axvline(ceiling, color="tab:red", linestyle="--", label=f"matmul ceiling {ceiling:.0f}")
    ax.set_xlabel("useful TFLOP/s (real tokens only)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PART_FUNCTIONS = {"packing": part_packing, "backends": part_backends, "tp": part_tp,
                  "recompute": part_recompute, "head": part_head, "max_tokens": part_max_tokens,
                  "profile": part_profile}


def run_bench(args, parts: tuple[str, ...]) -> dict | None:
    """Every part of ``parts``; the figures (rank 0) or None (other ranks)."""
    init_distributed("cuda")
    gen = torch.Generator().manual_seed(args.seed)
    rows: list[dict] = []
    config = bench_config("mixed", args.lower_layers, args.upper_layers)
    rank0 = dist.get_rank() == 0
    ceiling = matmul_ceiling(args.repeats)
    for part in tqdm(parts, desc="bench", disable=not rank0):
        if part == "tp" and dist.get_world_size() < 2:
            rows.append({"name": "tp", "error": "needs torchrun --nproc-per-node 2", "part": "tp"})
        elif part != "ceiling":
            rows += PART_FUNCTIONS[part](config, ceiling, args, gen)
    result = None
    if rank0:
        result = {"device": torch.cuda.get_device_name(), "world_size": dist.get_world_size(),
                  "torch": torch.__version__, "ceiling_tflops": ceiling, "rows": rows,
                  "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))}}
    shutdown()
    return result
