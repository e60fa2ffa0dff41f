"""``splitllama bench``: real Llama-3.1 shapes on CUDA, measured side by side in one run.

Parts (``--only`` picks some):

* ``ceiling``   the bf16 matmul ceiling of this card (one 8192^3 GEMM), the yardstick;
* ``packing``   packed production vs padded production (same megatron layers, SDPA with
                a padding mask) vs the padded oracle, on documents drawn from an RL length
                distribution (padding fraction p reported), and the p = 0 control;
* ``backends``  the packed model with each available attention backend;
* ``long``      long-context RL: the RL documents and batches of ``LONG_TOKENS`` tokens in
                documents of 8k, 16k and 32k tokens, each timed with torch's varlen
                kernel and with flash-attn 4 on the same model and batch; each batch at the
                lightest activation recompute it fits with (``--recompute`` first); then
                which recompute setting 4 x 32k-token documents need, with the default
                backend;
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

The workload, the actor step and the FLOP model are ``bench_workload``'s; the table and
plot are ``bench_report``'s. This module holds the settings, timing, the parts and the run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from splitllama.attention import BACKEND_ENV, available_backends, flash_attn_4_varlen, select_backend
from splitllama.bench_workload import Batch, actor_step, bench_config, make_batch, oracle_step, rl_lengths, useful_flops
from splitllama.model import ParallelCustomSplitLLamaForCausalLM, ParallelCustomSplitLLamaForCausalLMRmPad
from splitllama.distributed import init_distributed, setup_parallel, shutdown
from splitllama.megatron_configs import megatron_config
from splitllama.layout import ParallelLayout
from splitllama.options import LOG_PROBS_CHOICES, RECOMPUTE_CHOICES, ModelOptions

logger = logging.getLogger(__name__)

PARTS = ("ceiling", "packing", "backends", "long", "tp", "recompute", "head", "max_tokens", "profile")
# max_tokens stops doubling here even if memory is left (16M tokens: far past one GPU).
MAX_TOKENS_LIMIT = 1 << 24


@dataclass(frozen=True)
class BenchSettings:
    """What every part runs with: the stacks' depth (``num_lower`` 8B-shaped and
    ``num_upper`` 70B-shaped layers), real ``tokens`` per batch, ``repeats`` timed
    after ``warmup`` untimed steps (median reported), the random ``seed``, and the timed
    model's activation ``recompute`` (the ``recompute`` part times every choice)."""

    num_lower: int = 2
    num_upper: int = 2
    tokens: int = 16384
    repeats: int = 10
    warmup: int = 3
    seed: int = 0
    recompute: str = "none"

    def __post_init__(self) -> None:
        for field in ("num_lower", "num_upper", "tokens", "repeats"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"{field} must be a positive int, got {getattr(self, field)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {self.warmup!r}")
        self.options()  # validates recompute

    def options(self, **changes) -> ModelOptions:
        """The timed model's options (``changes``: a part's variant)."""
        return ModelOptions(**{"recompute": self.recompute, **changes})


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


def measure(name: str, step, batch: Batch, config, ceiling: float, settings, gpus: int = 1) -> dict:
    """Time ``step``; TFLOP/s and the fraction of the ceiling are per GPU (``gpus`` share
    the step). Activation memory is the peak minus what stays resident after a step
    (parameters and their gradients)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = time_ms(step, settings.warmup, settings.repeats)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        logger.info("%s: out of memory", name)
        return {"name": name, "error": "out of memory", "real_tokens": sum(batch.lengths)}
    peak, resident = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    tflops = useful_flops(config, batch.lengths) / (ms * 1e-3) / 1e12 / gpus
    # each row as it is measured: a run cut short still leaves its figures in the log
    logger.info("%s: %.1f ms, %.1f TFLOP/s, %.1f GiB peak", name, ms, tflops, peak / 2**30)
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
        oracle = CustomSplitLLamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager")
        oracle = oracle.to(torch.bfloat16)
    oracle.config.use_cache = False  # a training step: the config's default would fill a KV cache
    return oracle


# ---- parts ---------------------------------------------------------------------------------
def fitting(name: str, step_of, lengths: list[int], config, ceiling, settings, gen) -> tuple[list[dict], Batch]:
    """Time a padded model on the RL documents; padded runs hold [rows, S] activations
    (the oracle's eager attention [rows, heads, S, S]), so when the batch does not fit,
    halve the documents. Returns the rows (out-of-memory attempts included) and the batch
    that was timed last."""
    rows = []
    while True:
        batch = make_batch(lengths, config.vocab_size, gen, "cuda")
        rows.append({**measure(f"rl/{name}[{len(lengths)} docs]", step_of(batch), batch, config, ceiling, settings),
                     "part": "packing"})
        if "error" not in rows[-1] or len(lengths) == 1:
            return rows, batch
        lengths = lengths[: len(lengths) // 2]


def part_packing(config, ceiling, settings, gen) -> list[dict]:
    """Packed production vs padded production and vs the padded oracle, each pair timed on
    the same documents; p = 0 (equal lengths) is the control."""
    rows = []
    layout = ParallelLayout()
    lengths = rl_lengths(settings.tokens, gen)
    options = settings.options()
    packed = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, layout, options)
    padded = build(ParallelCustomSplitLLamaForCausalLM, config, layout, options)

    def packed_on(batch):
        return {**measure(f"rl/packed[{len(batch.lengths)} docs]", actor_step(packed, batch), batch, config,
                          ceiling, settings), "part": "packing"}

    even = make_batch([settings.tokens // 8] * 8, config.vocab_size, gen, "cuda")
    for name, model in (("packed", packed), ("padded", padded)):
        rows.append({**measure(f"p0/{name}", actor_step(model, even), even, config, ceiling, settings),
                     "part": "packing"})
    rows.append(packed_on(make_batch(lengths, config.vocab_size, gen, "cuda")))
    timed, batch = fitting("padded", functools.partial(actor_step, padded), lengths, config, ceiling, settings, gen)
    rows += timed
    if batch.lengths != lengths:
        rows.append(packed_on(batch))
    padded = None  # frees its memory before the oracle is built
    torch.cuda.empty_cache()
    oracle = build_oracle(config)
    timed, batch = fitting("oracle", functools.partial(oracle_step, oracle), lengths, config, ceiling, settings, gen)
    rows += timed
    oracle = None
    torch.cuda.empty_cache()
    if not any(r["name"] == f"rl/packed[{len(batch.lengths)} docs]" for r in rows):
        rows.append(packed_on(batch))
    return rows


@contextlib.contextmanager
def forced_backend(backend: str):
    """Every batch planned inside runs ``backend`` (the dispatch point's override)."""
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous


def part_backends(config, ceiling, settings, gen) -> list[dict]:
    model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(),
                  settings.options())
    batch = make_batch(rl_lengths(settings.tokens, gen), config.vocab_size, gen, "cuda")
    rows = []
    for backend in available_backends(torch.device("cuda"), torch.bfloat16):
        with forced_backend(backend):
            rows.append({**measure(f"backend/{backend}", actor_step(model, batch), batch, config, ceiling, settings),
                         "part": "backends"})
    return rows


# Long-context RL (reasoning traces): tokens per batch of long documents, the document
# lengths, the kernels compared, and the batch whose recompute setting is asked for.
LONG_TOKENS = 32768
LONG_DOCUMENTS = (8192, 16384, 32768)
LONG_BACKENDS = ("torch_varlen", "flash_attn_4")
LONGEST_BATCH = (4, 32768)


def long_backends() -> list[str]:
    """``LONG_BACKENDS`` that run here (flash-attn 4 where it imports)."""
    return [b for b in LONG_BACKENDS if b != "flash_attn_4" or flash_attn_4_varlen() is not None]


def recompute_ladder(first: str) -> list[str]:
    """``first`` and the heavier activation recompute settings after it."""
    return list(RECOMPUTE_CHOICES[RECOMPUTE_CHOICES.index(first):])


def part_long(config, ceiling, settings, gen) -> list[dict]:
    """Actor steps (entropy on) on the RL documents and on ``LONG_TOKENS``-token batches of
    ``LONG_DOCUMENTS``-token documents, with each of ``long_backends()`` on the same model
    and batch. A batch runs at the lightest recompute setting (from ``--recompute`` on) at
    which every backend fits. Then ``LONGEST_BATCH`` with the default backend: the first
    setting it fits with, timed once."""
    lengths = rl_lengths(settings.tokens, gen)
    batches = {f"rl{len(lengths)}docs": lengths}
    for length in LONG_DOCUMENTS:
        batches[f"{LONG_TOKENS // length}x{length}"] = [length] * (LONG_TOKENS // length)
    backends = long_backends()
    rows, pending = [], dict(batches)
    for recompute in recompute_ladder(settings.recompute):
        if not pending:
            break
        model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(),
                      settings.options(recompute=recompute))
        for label, lengths in list(pending.items()):
            batch = make_batch(lengths, config.vocab_size, gen, "cuda")
            timed = []
            for backend in backends:
                with forced_backend(backend):
                    row = measure(f"long/{label}/{backend}", actor_step(model, batch), batch, config, ceiling,
                                  settings)
                timed.append({**row, "part": "long", "batch": label, "backend": backend, "recompute": recompute})
                if "error" in row:
                    break
            rows += timed
            if all("error" not in r for r in timed):
                del pending[label]
            del batch
        del model
        torch.cuda.empty_cache()
    rows += longest_batch(config, ceiling, settings, gen)
    return rows


def longest_batch(config, ceiling, settings, gen) -> list[dict]:
    """``LONGEST_BATCH`` with the default backend at each recompute setting until one fits."""
    count, length = LONGEST_BATCH
    batch = make_batch([length] * count, config.vocab_size, gen, "cuda")
    backend = select_backend(torch.device("cuda"), torch.bfloat16)
    once = dataclasses.replace(settings, warmup=0, repeats=1)
    rows = []
    for recompute in RECOMPUTE_CHOICES:
        model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(),
                      settings.options(recompute=recompute))
        row = measure(f"long/{count}x{length}/{backend}", actor_step(model, batch), batch, config, ceiling, once)
        rows.append({**row, "part": "long", "batch": f"{count}x{length}", "backend": backend,
                     "recompute": recompute, "longest": True})
        del model
        torch.cuda.empty_cache()
        if "error" not in row:
            break
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


def time_variants(part: str, variants: dict[str, ModelOptions], config, ceiling, settings, gen) -> list[dict]:
    """Packed actor steps of each variant (its model options) on the same documents, at
    ``world_layout()``; one model at a time, so each variant's peak memory is its own."""
    batch = make_batch(rl_lengths(settings.tokens, gen), config.vocab_size, gen, "cuda")
    layout = world_layout()
    rows = []
    for variant, options in variants.items():
        model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, layout, options)
        name = f"{part}/{variant}" + ("" if layout.tp == 1 else f"/{layout}")
        row = measure(name, actor_step(model, batch), batch, config, ceiling, settings, gpus=layout.tp)
        rows.append({**busiest(row), "part": part, "recompute": options.recompute, "log_probs": options.log_probs})
        del model
        torch.cuda.empty_cache()
    return rows


def part_recompute(config, ceiling, settings, gen) -> list[dict]:
    """The packed model with each activation recompute setting, on the same documents."""
    rows = time_variants("recompute", {r: ModelOptions(recompute=r) for r in RECOMPUTE_CHOICES},
                         config, ceiling, settings, gen)
    base = rows[0]
    for row in rows:
        if "ms" in row and "ms" in base:
            row["time_vs_none"] = row["ms"] / base["ms"]
            row["activation_memory_vs_none"] = row["activation_memory_gib"] / base["activation_memory_gib"]
    return rows


def part_head(config, ceiling, settings, gen) -> list[dict]:
    """Packed actor steps (entropy on) with each log-prob path of the LM head, on the same
    documents."""
    return time_variants("head", {path: settings.options(log_probs=path)
                                  for path in LOG_PROBS_CHOICES},
                         config, ceiling, settings, gen)


def part_max_tokens(config, ceiling, settings, gen) -> list[dict]:
    """For each log-prob path: packed actor steps (entropy on) at ``--tokens``, twice that,
    ... until out of memory; the largest that fits with its time and peak memory. Every
    size draws its documents from its own seed, so both paths see the same batches."""
    if dist.get_world_size() > 1:
        # an out-of-memory on one TP rank would leave the others waiting in a collective
        return [{"name": "max_tokens", "part": "max_tokens", "error": "runs on one GPU only"}]
    quick = dataclasses.replace(settings, warmup=1, repeats=min(settings.repeats, 3))
    rows = []
    for path in LOG_PROBS_CHOICES:
        model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(),
                      settings.options(log_probs=path))
        largest, out_of_memory_at, tokens = None, None, settings.tokens
        while tokens <= MAX_TOKENS_LIMIT:
            sized = torch.Generator().manual_seed(settings.seed + tokens)
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


def part_tp(config, ceiling, settings, gen) -> list[dict]:
    world = dist.get_world_size()
    rows = []
    for family in ("8b", "70b"):
        config = bench_config(family, settings.num_lower, settings.num_upper)
        batch = make_batch(rl_lengths(settings.tokens, gen), config.vocab_size, gen, "cuda")
        for layout in (ParallelLayout(), ParallelLayout(tp=world), ParallelLayout(tp=world, sp=True)):
            model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, layout,
                          settings.options())
            row = measure(f"tp/{family}/{layout}", actor_step(model, batch), batch, config, ceiling, settings,
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


def profile_step(step) -> dict:
    """One call of ``step`` (after one untimed call) under the torch profiler: GPU time,
    its share by kernel kind, and every kernel with its time, longest first."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels) or 1.0
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time_total
    return {
        "gpu_ms": total / 1e3,
        "share_by_kind": {k: v / total for k, v in sorted(by_kind.items())},
        "kernels": [{"kernel": e.key[:120], "kind": kernel_kind(e.key), "ms": e.device_time_total / 1e3,
                     "calls": e.count} for e in kernels],
    }


def part_profile(config, ceiling, settings, gen) -> list[dict]:
    """One packed actor step under the torch profiler: GPU time by kernel kind and the
    top kernels (names as the profiler reports them)."""
    model = build(ParallelCustomSplitLLamaForCausalLMRmPad, config, ParallelLayout(), settings.options())
    batch = make_batch(rl_lengths(settings.tokens, gen), config.vocab_size, gen, "cuda")
    step = actor_step(model, batch)
    for _ in range(settings.warmup):
        step()
    profiled = profile_step(step)
    return [{
        "name": "profile/packed", "part": "profile", "gpu_ms": profiled["gpu_ms"],
        "share_by_kind": profiled["share_by_kind"], "top_kernels": profiled["kernels"][:15],
    }]


PART_FUNCTIONS = {"packing": part_packing, "backends": part_backends, "long": part_long, "tp": part_tp,
                  "recompute": part_recompute, "head": part_head, "max_tokens": part_max_tokens,
                  "profile": part_profile}


def run_bench(settings: BenchSettings, parts: tuple[str, ...]) -> dict | None:
    """Every part of ``parts``; the figures (rank 0) or None (other ranks)."""
    init_distributed("cuda")
    gen = torch.Generator().manual_seed(settings.seed)
    rows: list[dict] = []
    config = bench_config("mixed", settings.num_lower, settings.num_upper)
    rank0 = dist.get_rank() == 0
    ceiling = matmul_ceiling(settings.repeats)
    for part in tqdm(parts, desc="bench", disable=not rank0):
        if part == "tp" and dist.get_world_size() < 2:
            rows.append({"name": "tp", "error": "needs torchrun --nproc-per-node 2", "part": "tp"})
        elif part != "ceiling":
            rows += PART_FUNCTIONS[part](config, ceiling, settings, gen)
    result = None
    if rank0:
        result = {"device": torch.cuda.get_device_name(), "world_size": dist.get_world_size(),
                  "torch": torch.__version__, "ceiling_tflops": ceiling, "rows": rows,
                  "settings": {**dataclasses.asdict(settings), "parts": list(parts)}}
    shutdown()
    return result
