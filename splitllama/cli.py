"""The ``splitllama`` command: assemble, check, rollout, bench. The only module that prints.

Each sub-command's work lives in its own module, imported only when that command runs,
so ``splitllama --help`` and ``splitllama assemble`` stay fast (no megatron import); the
library returns reports and this module shows them.

Errors: bad input (arguments, the checkpoint directory, a layout the config cannot take)
is found BEFORE any process is launched and printed as one line
``splitllama <cmd>: error: ...``, exit code 2 (``--debug`` adds the traceback); flags and
a path that holds no checkpoint are refused before torch is imported. A failure inside a
distributed run is printed once, exit code 1: by rank 0 under torchrun; when the command
launched the ranks itself, the first failure of any rank (its cause). ``check`` exits 1
when production differs from the oracle, ``rollout`` when the rollout engine and verl's
trainer disagree or the weights are out of sync. Ctrl-C prints one line, exit code 130.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from splitllama import __version__
from splitllama.checkpoint.directory import BrokenCheckpointError
from splitllama.options import LOG_PROBS_CHOICES, RECOMPUTE_CHOICES, ModelOptions
from splitllama.parallel_sizes import FLAG_NAMES, check_parallel_sizes

# Set by ``_spawn_ranks`` for the ranks it launches: a fresh directory holding their
# rendezvous file (``RENDEZVOUS_FILE``) and the error a failing rank writes (rank{r}.json).
LAUNCH_DIR_ENV = "SPLITLLAMA_LAUNCH_DIR"
RENDEZVOUS_FILE = "rendezvous"
# The exit code of a command stopped by Ctrl-C (SIGINT), as shells report it.
INTERRUPTED = 128 + signal.SIGINT
EPILOG = """\
examples:
  splitllama check                              # built-in tiny model, CPU, TP=1
  splitllama check --tp 2 --sp                  # launches 2 processes itself (gloo/NCCL)
  torchrun --nproc-per-node 2 -m splitllama.cli check --tp 2 --sp CKPT
  splitllama assemble --lower L8B --upper L70B --num-lower 16 --num-upper 8 \\
      --adapter init --out SPLIT
  splitllama rollout --tp 2 --sp                # trainer -> rollout engine -> trainer (verl)
  splitllama bench --json bench.json --plot bench.png   # CUDA only
"""


def _add_assemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "assemble",
        help="build a split checkpoint from two Hugging Face Llama checkpoints",
        description=(
            "Build a split checkpoint: embedding and the FIRST --num-lower layers of the "
            "lower Llama, an adapter, the LAST --num-upper layers of the upper Llama, its "
            "final norm and LM head. Reads only the tensors it keeps (single or sharded "
            "safetensors), so peak memory tracks the output, not the input."
        ),
    )
    p.add_argument("--lower", required=True, metavar="DIR", help="lower (8B-shaped) Llama checkpoint")
    p.add_argument("--upper", required=True, metavar="DIR", help="upper (70B-shaped) Llama checkpoint")
    p.add_argument("--num-lower", type=int, required=True, metavar="N", help="layers 0..N-1 of --lower")
    p.add_argument("--num-upper", type=int, required=True, metavar="M", help="the last M layers of --upper")
    p.add_argument("--mlp", action="store_true", help="two-layer ReLU adapter instead of one linear")
    p.add_argument(
        "--adapter", default="init", metavar="identity|init|FILE.safetensors",
        help="identity (needs equal hidden sizes, linear adapter), init (fresh normal init, "
             "seeded by --seed) or a safetensors file with the adapter tensors (default: init)",
    )
    p.add_argument("--value", action="store_true",
                   help="a value (critic) checkpoint: a fresh value head score.weight [1, hidden] (normal "
                        "init seeded by --seed) instead of the upper model's LM head")
    p.add_argument("--seed", type=int, default=0, help="seed of --adapter init and of the --value head (default 0)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="prove production == oracle on one parallel layout",
        description=(
            "Build the production model at the given layout and the padded oracle from the "
            "same checkpoint, run a batch of random masks with the edge cases (empty rows, "
            "all-padding rows, single tokens, padding inside rows, odd token counts), "
            "backpropagate, and print max abs/rel errors of the outputs at valid tokens and "
            "of every parameter's gradient, with pass/fail per row. Exit code 1 on any "
            "failure. Without CHECKPOINT a built-in tiny model is used. Run it under "
            "torchrun with world size tp*pp, or plainly: it then launches that many "
            "processes itself."
        ),
    )
    _add_parallel_flags(p)
    p.add_argument("--layers-per-stage", type=_counts, default=None, metavar="N,N,...",
                   help="layers on each pipeline stage in model order, pp*vpp counts (default: an even "
                        "split); e.g. --pp 2 --layers-per-stage 3,2 for 5 layers")
    p.add_argument("--value", action="store_true",
                   help="check the value (critic) model: CHECKPOINT must hold score.weight (`splitllama "
                        "assemble --value`), or pass --fresh-value-head")
    p.add_argument("--fresh-value-head", action="store_true",
                   help="with --value: start from a CausalLM checkpoint (lm_head.weight) with a freshly "
                        "initialised value head, seeded by --seed")
    p.add_argument("--mlp", action="store_true",
                   help="built-in tiny model with the mlp adapter (without CHECKPOINT only: a checkpoint's "
                        "config names its adapter)")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "float64", "bfloat16"),
        help="compute dtype (default: float64 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random batch, of the built-in model's weights and of a fresh value head "
                        "(default 0)")
    p.add_argument("--recompute", default="none", choices=RECOMPUTE_CHOICES,
                   help="activation recompute of the production model (default none)")
    p.add_argument("--log-probs", default="fused", choices=LOG_PROBS_CHOICES,
                   help="how the LM head computes log-probs and entropy: fused (from the hidden "
                        "states in tiles, default) or materialise (from the full logits)")
    p.add_argument("--json", metavar="FILE", help="also write the report (what was checked, every row) as JSON")


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="split checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--sp", action="store_true", help="sequence parallel: splits the tokens over the TP ranks "
                                                     "(needs --tp > 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--vpp", type=int, default=None, metavar="N",
                   help="virtual pipeline chunks per stage (needs --pp > 1; default: none)")


def _add_rollout(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rollout",
        help="check the RL loop's data path: trainer -> rollout engine -> trainer (verl)",
        description=(
            "verl 0.9.1's actor worker loads the model at the given layout and exports its "
            "weights; a Hugging Face copy of the model (the rollout engine) is built from that "
            "stream alone and samples left-padded prompts at --temperature; verl's worker "
            "scores the same tokens as its trainer computes old log-probs (use_fused_kernels); "
            "both are compared with each other and with the oracle in float64, and verl's "
            "rollout-vs-trainer metrics are printed. Then one PPO step, a second export, and "
            "the engine's weights must equal the trainer's bit for bit. With --rollouts, "
            "another engine's tokens and log-probs are scored instead (docs/rollout.md). "
            "Exit code 1 on any failure. Without CHECKPOINT a built-in tiny model is used; a "
            "CHECKPOINT needs a tokenizer in its directory (verl reads one). Needs verl and "
            "mbridge (docs/verl.md). Run it under torchrun with world size tp*pp, or plainly: "
            "it then launches that many processes itself."
        ),
    )
    _add_parallel_flags(p)
    p.add_argument("--dtype", default=None, choices=("float64", "bfloat16"),
                   help="the engine's and the scoring worker's dtype (default: float64 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--temperature", type=float, default=0.75,
                   help="sampling temperature, both sides (default 0.75, exact in float32 as verl holds it)")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens generated per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prompts, the sampling and the built-in model's weights (default 0)")
    p.add_argument("--rollouts", metavar="FILE",
                   help="score another engine's rollouts: a safetensors file of verl's prompts, responses, "
                        "attention_mask, response_mask and rollout_log_probs (needs CHECKPOINT and the "
                        "--temperature they were sampled at)")
    p.add_argument("--json", metavar="FILE", help="also write the result (rows, metrics, tokens, log-probs) as JSON")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time production vs the padded oracle on real Llama-3 shapes (CUDA)",
        description=(
            "On CUDA: real Llama-3.1 layer shapes (a few layers of each stack, vocab "
            "128256), bf16, forward+backward on documents drawn from an RL length "
            "distribution; reports tokens/s, useful TFLOP/s, the matmul ceiling measured in "
            "the same run, packed/padded speedup, attention backends side by side, the LM "
            "head's fused vs materialising log-probs (entropy on) and the most packed tokens "
            "each fits in memory, and, under torchrun with 2 processes, TP=2 with and without SP."
        ),
    )
    p.add_argument("--lower-layers", type=int, default=2, help="8B-shaped layers (default 2)")
    p.add_argument("--upper-layers", type=int, default=2, help="70B-shaped layers (default 2)")
    p.add_argument("--tokens", type=int, default=16384, help="real tokens per batch (default 16384)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats, the median reported (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--only", default=None,
                   help="comma list of parts: ceiling, packing, backends, long (long-context RL documents), "
                        "tp (needs 2 processes), recompute, "
                        "head (fused vs materialising log-probs), max_tokens (largest packed batch per "
                        "log-prob path), profile (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the documents (default 0)")
    p.add_argument("--recompute", default="none", choices=RECOMPUTE_CHOICES,
                   help="activation recompute of the timed model (default none; the 'recompute' part "
                        "times all three)")
    p.add_argument("--json", metavar="FILE", help="write all figures as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG summary plot")


def _counts(text: str) -> tuple[int, ...]:
    """``3,2`` -> (3, 2): the value of --layers-per-stage."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer counts, "
                                         "e.g. 3,2") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: every stage needs at least one layer")
    return counts


# How the library names what the user gave as a flag, per command: error messages from the
# library are shown in the user's terms (longest names first, so `num_layers_8=` goes
# before `num_layers_8`).
USER_TERMS = {
    "assemble": {
        "num_layers_8=": "--num-lower ", "num_layers_8": "--num-lower",
        "num_layers_70=": "--num-upper ", "num_layers_70": "--num-upper",
        "out_dir": "--out", "adapter=": "--adapter ", "max_shard_size=": "--max-shard-size ",
        "max_shard_size": "--max-shard-size", "(mlp=False; got mlp=True)": "(got --mlp)",
    },
    "check": {
        "layers_per_stage=": "--layers-per-stage ", "layers_per_stage": "--layers-per-stage",
        "load it into a value model (head 'value')": "check it with --value",
        "pass fresh_value_head=True": "pass --fresh-value-head (or make a value checkpoint with "
                                      "`splitllama assemble --value`)",
    },
}


def in_flag_terms(command: str, message: str) -> str:
    """``message`` with the library's argument names replaced by ``command``'s flags."""
    import re

    table = USER_TERMS.get(command, {})
    if not table:
        return message
    # a name that ends in a word character must end there (num_layers_8 is not num_layers_80)
    alternatives = [re.escape(n) + (r"(?!\w)" if n[-1].isalnum() or n[-1] == "_" else "")
                    for n in sorted(table, key=len, reverse=True)]
    return re.sub(rf"(?<![\w./-])(?:{'|'.join(alternatives)})", lambda m: table[m.group(0)], message)


def emit(text: str = "") -> None:
    """User-facing output of every sub-command goes through here. A reader that has gone
    (``splitllama check | head``) gets no more; the command still runs to its end."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, naming the command, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandLine(_Parser):
    """The top-level parser: a flag no sub-command knows is reported by that sub-command
    (``splitllama check: error: unrecognized arguments: ...``), as its own errors are."""

    commands: dict[str, argparse.ArgumentParser]  # by name; set by build_parser

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.commands.get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _CommandLine(
        prog="splitllama",
        description="Custom Split LLaMA on Megatron-core: assemble checkpoints, prove "
                    "production equals the reference, benchmark.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"splitllama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_assemble(sub)
    _add_check(sub)
    _add_rollout(sub)
    _add_bench(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.commands = dict(sub.choices)
    return parser


class UsageError(ValueError):
    """Bad input found before any work starts: one line, exit code 2."""


# ---- assemble ----------------------------------------------------------------------------
def _assemble(args) -> int:
    from splitllama import weight_names as names
    from splitllama.checkpoint.assemble import LlamaCheckpoint, assemble_split_checkpoint, lm_head_source
    from splitllama.checkpoint.safetensors_io import SafetensorsReader

    try:
        out = assemble_split_checkpoint(
            args.lower, args.upper, args.num_lower, args.num_upper, args.out,
            mlp=args.mlp, adapter=args.adapter, seed=args.seed, value_head=args.value,
            max_shard_size=args.max_shard_size, progress=sys.stderr.isatty(),
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    files = SafetensorsReader(out).files()
    size = sum(f.stat().st_size for f in files)
    if args.value:
        head = "a fresh value head (score.weight)"
    elif lm_head_source(LlamaCheckpoint(args.upper, "upper")) == names.EMBED:
        head = (f"the upper model's input embedding as the LM head (its embeddings are tied: it stores no "
                f"{names.LM_HEAD})")
    else:
        head = "the upper LM head"
    emit(f"assembled {out}: lower layers 0..{args.num_lower - 1}, the last {args.num_upper} upper "
         f"layers, adapter {args.adapter}, {head}; {size / 1e9:.3f} GB in {len(files)} safetensors file(s)")
    return 0


# ---- check -------------------------------------------------------------------------------
def _check_inputs(args):
    """Everything ``check`` can refuse before launching: (layout, head, dtype, device).
    The flags are checked first, before torch is imported."""
    _check_parallel_flags(args)
    _check_output_file("--json", args.json)
    if args.fresh_value_head and not args.value:
        raise UsageError("--fresh-value-head needs --value (it starts a value model from a CausalLM checkpoint)")
    if args.fresh_value_head and not args.checkpoint:
        raise UsageError("--fresh-value-head needs a CHECKPOINT (the built-in model with --value has a value head)")
    if args.mlp and args.checkpoint:
        # the adapter of a checkpoint is its config's; --mlp would otherwise be dropped silently
        raise UsageError("--mlp chooses the built-in tiny model's adapter; a CHECKPOINT's adapter is the one "
                         "its config.json names (drop --mlp)")
    if args.checkpoint:
        _checkpoint_config(args.checkpoint, fields_only=True)  # a path holding no checkpoint: refused now
    import torch

    layout = _layout(args, args.layers_per_stage)
    device, dtype = _device_and_dtype(args)
    if device == "cpu" and dtype == torch.bfloat16:
        raise UsageError("--dtype bfloat16 is checked on CUDA only (the error-ratio rule needs GPU "
                         "kernels); on CPU use float64 or float32")
    head = "value" if args.value else "lm"
    from splitllama.verify.tiny import tiny_split_config

    config = (_checkpoint_config(args.checkpoint, head, args.fresh_value_head) if args.checkpoint
              else tiny_split_config(mlp=args.mlp))
    try:
        layout.validate(config)
    except ValueError as err:
        flags = _layout_flags(args)
        if args.layers_per_stage:
            flags += f" --layers-per-stage {','.join(map(str, args.layers_per_stage))}"
        raise UsageError(f"{flags}: {err}") from err
    return layout, head, dtype, device


def _check_parallel_flags(args) -> None:
    """--tp, --sp, --pp and --vpp by the rules of ``parallel_sizes`` (standard library only)."""
    try:
        check_parallel_sizes(args.tp, args.sp, args.pp, args.vpp, names=FLAG_NAMES)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _layout(args, layers_per_stage=None):
    """The ``ParallelLayout`` of the flags (``--vpp 1`` is no virtual pipeline)."""
    from splitllama.layout import ParallelLayout

    return ParallelLayout(tp=args.tp, sp=args.sp, pp=args.pp, vpp=args.vpp if args.vpp and args.vpp > 1 else None,
                          layers_per_stage=layers_per_stage)


def _device_and_dtype(args):
    """(--device, --dtype) with their defaults: cuda where one is visible; bfloat16 on cuda,
    float64 on cpu."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible (allowed here: cpu)")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float64)
    return device, dtype


def _layout_flags(args) -> str:
    """The layout's flags as the user gave them, for a message about the layout."""
    return f"--tp {args.tp} --pp {args.pp}{f' --vpp {args.vpp}' if args.vpp else ''}"


def _check_output_file(flag: str, path: str | None) -> None:
    """A file the command writes at the end: refused now if it cannot be written there."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a directory; name a file")
    if not target.resolve().parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {target.parent} does not exist")


def _checkpoint_config(path: str, head: str = "lm", fresh_value_head: bool = False, fields_only: bool = False):
    """The split config of checkpoint directory ``path``, after checking its tensors'
    names and shapes (safetensors headers only: no weight is read). ``fields_only``: check
    only that ``path`` holds a readable config.json (standard library only)."""
    from splitllama.checkpoint.directory import config_fields, validate_checkpoint_dir

    try:
        if fields_only:
            return config_fields(path)
        return validate_checkpoint_dir(path, head, fresh_value_head)
    except ValueError as err:
        message = str(err)  # names the directory or a file in it, as the user wrote it
        raise UsageError(message if str(Path(path)) in message else f"{path}: {message}") from err


def _spawn_ranks(world: int, argv: list[str]) -> int:
    """Run this command in ``world`` processes (one per rank, this machine). If a rank
    fails, the others are given a moment to report and then stopped: no hang. Failing
    ranks leave their error in a file instead of printing it; this process prints the
    FIRST one (the cause: the other ranks fail after it, on the collective it left).

    The ranks meet through a file in a directory made for this run (no port is picked
    here and bound later by a rank, which two runs started at once could both pick). They
    start with Ctrl-C ignored: on Ctrl-C this process stops them and prints one line."""
    import tempfile

    launch = tempfile.mkdtemp(prefix="splitllama-launch-")
    env = dict(os.environ, WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **{LAUNCH_DIR_ENV: launch})
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    procs: list[subprocess.Popen] = []
    try:
        # a child inherits the ignored SIGINT (and Python leaves an ignored SIGINT ignored)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for r in range(world):
                procs.append(subprocess.Popen([sys.executable, "-m", "splitllama.cli", *argv],
                                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))))
        finally:
            signal.signal(signal.SIGINT, previous)
        _wait_for_ranks(procs)
        reports = sorted(json.loads(f.read_text()) for f in Path(launch).glob("rank*.json"))
        if reports:
            print(reports[0][2], file=sys.stderr, flush=True)
        elif any(p.returncode not in (0, 1) for p in procs):
            codes = {r: p.returncode for r, p in enumerate(procs) if p.returncode}
            print(f"splitllama {argv[0]}: error: rank(s) exited with codes {codes} without a report (killed?)",
                  file=sys.stderr, flush=True)
        return max(p.returncode for p in procs)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        raise
    finally:
        shutil.rmtree(launch, ignore_errors=True)


def _wait_for_ranks(procs: list[subprocess.Popen]) -> None:
    """Until every rank has exited; ranks still running 30 s after one failed are killed."""
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 30:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)


def _launch_or_join(layout, device: str, argv: list[str]) -> int | None:
    """Launch the ranks (returns their exit code) when not one of them and the layout needs
    more than one; else join the process group of ``layout.world_size`` ranks (None)."""
    if device == "cpu":  # megatron's CUDA stream advice (it says so for every SP layer)
        import warnings

        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
    if "RANK" not in os.environ and layout.world_size > 1:
        return _spawn_ranks(layout.world_size, argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != layout.world_size:  # under a launcher (torchrun) started with another process count
        raise UsageError(f"world size {world} != tp*pp = {layout.world_size}: run with "
                         f"torchrun --nproc-per-node {layout.world_size}")
    import datetime

    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from splitllama.distributed import init_distributed

    hf_logging.disable_progress_bar()  # the oracle's save/load of a small checkpoint: noise here
    launch = os.environ.get(LAUNCH_DIR_ENV)
    init_distributed(device, timeout=datetime.timedelta(seconds=float(os.environ.get(
        "SPLITLLAMA_COLLECTIVE_TIMEOUT", "300"))),
        init_method=Path(launch, RENDEZVOUS_FILE).as_uri() if launch else None)
    assert dist.get_world_size() == layout.world_size, (dist.get_world_size(), layout)
    return None


def _check(args, argv: list[str]) -> int:
    layout, head, dtype, device = _check_inputs(args)
    launched = _launch_or_join(layout, device, argv)
    if launched is not None:
        return launched
    import torch.distributed as dist

    from splitllama.distributed import shutdown
    from splitllama.verify.check import run_check

    report = run_check(args.checkpoint, layout, head, dtype, device, seed=args.seed, mlp=args.mlp,
                       options=ModelOptions(recompute=args.recompute, log_probs=args.log_probs),
                       fresh_value_head=args.fresh_value_head)
    if dist.get_rank() == 0:
        if args.json:
            Path(args.json).write_text(report.to_json())
        emit(report.table())
    shutdown()
    return 0 if report.passed else 1


# ---- rollout -----------------------------------------------------------------------------
def _rollout_inputs(args):
    """Everything ``rollout`` can refuse before launching: (layout, dtype, device). The flags
    are checked first, before torch is imported."""
    import importlib.util
    import math

    _check_parallel_flags(args)
    _check_output_file("--json", args.json)
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature must be a positive number, got {args.temperature}")
    if args.new_tokens < 1:
        raise UsageError(f"--new-tokens must be a positive int, got {args.new_tokens}")
    if args.rollouts and not args.checkpoint:
        raise UsageError("--rollouts needs the CHECKPOINT its engine ran (the built-in model generated nothing)")
    if args.rollouts and not Path(args.rollouts).is_file():
        raise UsageError(f"--rollouts {args.rollouts} is not a file")
    missing = [name for name in ("verl", "mbridge") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"rollout runs verl's trainer: {' and '.join(missing)} not installed (docs/verl.md)")
    if args.checkpoint:
        _checkpoint_config(args.checkpoint, fields_only=True)  # a path holding no checkpoint: refused now
        if not any(Path(args.checkpoint, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise UsageError(f"{args.checkpoint} holds no tokenizer (tokenizer.json or tokenizer_config.json): "
                             "verl's worker reads one from the model directory")
    from splitllama.verify.tiny import tiny_split_config

    layout = _layout(args)
    device, dtype = _device_and_dtype(args)
    config = _checkpoint_config(args.checkpoint) if args.checkpoint else tiny_split_config()
    try:
        layout.validate(config)
    except ValueError as err:
        # verl's bridge splits the layers evenly: the uneven split the message offers is not
        # reachable through verl
        message = str(err).split("; pass layers_per_stage")[0]
        raise UsageError(f"{_layout_flags(args)}: {message}"
                         + (" (verl splits the layers evenly)" if message != str(err) else "")) from err
    return layout, dtype, device


def _rollout(args, argv: list[str]) -> int:
    layout, dtype, device = _rollout_inputs(args)
    launched = _launch_or_join(layout, device, argv)
    if launched is not None:
        return launched
    import contextlib
    import io

    import torch.distributed as dist

    from splitllama.distributed import shutdown
    from splitllama.verify.rollout import run_rollout

    # verl's engine prints its configs and model sizes to stdout, and verl and mbridge warn
    # about engines and kernels they cannot import: shown with --debug only
    quiet = contextlib.ExitStack()
    if not args.debug:
        import warnings

        quiet.enter_context(warnings.catch_warnings())
        for module in (r"verl(\.|$)", r"mbridge(\.|$)"):
            warnings.filterwarnings("ignore", module=module)
    with quiet, contextlib.redirect_stdout(sys.stderr if args.debug else io.StringIO()):
        result = run_rollout(args.checkpoint, layout, device, dtype, rollouts=args.rollouts,
                             temperature=args.temperature, new_tokens=args.new_tokens, seed=args.seed)
    if dist.get_rank() == 0:
        if args.json:
            Path(args.json).write_text(result.to_json())
        emit(result.table())
    shutdown()
    return 0 if result.passed else 1


# ---- bench -------------------------------------------------------------------------------
def _bench(args) -> int:
    import torch

    _check_output_file("--json", args.json)
    _check_output_file("--plot", args.plot)
    if not torch.cuda.is_available():
        raise UsageError("bench needs CUDA (it times real Llama-3 shapes in bfloat16)")
    from splitllama.bench import PARTS, BenchSettings, run_bench
    from splitllama.bench_report import plot, summary

    parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(","))
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise UsageError(f"--only {sorted(unknown)}: allowed parts are {list(PARTS)}")
    try:
        settings = BenchSettings(num_lower=args.lower_layers, num_upper=args.upper_layers, tokens=args.tokens,
                                 repeats=args.repeats, warmup=args.warmup, seed=args.seed, recompute=args.recompute)
    except ValueError as err:
        raise UsageError(str(err)) from err
    result = run_bench(settings, parts)
    if result is not None:  # rank 0
        emit(f"{result['device']} x{result['world_size']}, torch {result['torch']}")
        emit(summary(result["rows"], result["ceiling_tflops"]))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        if args.plot:
            plot(result["rows"], result["ceiling_tflops"], args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # (megatron's notices about itself are filtered by the package, for library calls too)
    # torch's deprecation of collectives megatron-core 0.16 calls (reduce_scatter_tensor, ...)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        return _run(args, argv, rank)
    except KeyboardInterrupt:
        _report(args, rank, f"splitllama {args.command}: interrupted")
        return INTERRUPTED


def _run(args, argv: list[str], rank: int) -> int:
    try:
        if args.command == "assemble":
            return _assemble(args)
        if args.command == "check":
            return _check(args, argv)
        if args.command == "rollout":
            return _rollout(args, argv)
        return _bench(args)
    except UsageError as err:
        _report(args, rank, f"splitllama {args.command}: error: {in_flag_terms(args.command, str(err))}")
        return 2
    except Exception as err:
        if isinstance(err, BrokenCheckpointError):  # found inside the run (the check reads the weights there)
            _report(args, rank, f"splitllama {args.command}: error: {err}")
            return 2
        # a failure inside the run: reported once
        _report(args, rank, f"splitllama {args.command}: error: {type(err).__name__}: {err}"
                            f"{'' if args.debug else ' (--debug shows the traceback)'}")
        return 1


def _report(args, rank: int, line: str) -> None:
    """Print the error once: by rank 0, or, in ranks that ``_spawn_ranks`` launched, into
    the file from which the launcher prints the first failure of any rank."""
    text = (traceback.format_exc() if args.debug else "") + line
    launch = os.environ.get(LAUNCH_DIR_ENV)
    if launch:
        Path(launch, f"rank{rank}.json").write_text(json.dumps([time.time(), rank, text]))
    elif rank == 0:
        print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
