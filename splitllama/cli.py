"""The ``splitllama`` command: assemble, check, bench.

Each sub-command's work lives in its own module, imported only when that command runs,
so ``splitllama --help`` and ``splitllama assemble`` stay fast (no megatron import).
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  splitllama check                              # built-in tiny model, CPU, TP=1
  splitllama check --tp 2 --sp                  # launches 2 processes itself (gloo/NCCL)
  torchrun --nproc-per-node 2 -m splitllama.cli check --tp 2 --sp CKPT
  splitllama assemble --lower L8B --upper L70B --num-lower 16 --num-upper 8 \\
      --adapter init --out SPLIT
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
    p.add_argument("--seed", type=int, default=0, help="seed of --adapter init (default 0)")
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
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="split checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--sp", action="store_true", help="sequence parallel (needs --tp > 1 to matter)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
    p.add_argument("--value", action="store_true", help="check the value (critic) model")
    p.add_argument("--mlp", action="store_true", help="built-in tiny model with the mlp adapter")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "float64", "bfloat16"),
        help="compute dtype (default: float64 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time production vs the padded oracle on real Llama-3 shapes (CUDA)",
        description=(
            "On CUDA: real Llama-3.1 layer shapes (a few layers of each stack, vocab "
            "128256), bf16, forward+backward on documents drawn from an RL length "
            "distribution; reports tokens/s, useful TFLOP/s, the matmul ceiling measured in "
            "the same run, packed/padded speedup, attention backends side by side and, "
            "under torchrun with 2 processes, TP=2 with and without SP."
        ),
    )
    p.add_argument("--lower-layers", type=int, default=2, help="8B-shaped layers (default 2)")
    p.add_argument("--upper-layers", type=int, default=2, help="70B-shaped layers (default 2)")
    p.add_argument("--tokens", type=int, default=16384, help="real tokens per batch (default 16384)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--only", default=None,
                   help="comma list of parts: ceiling, packing, backends, tp (needs 2 processes), profile "
                        "(default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write all figures as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG summary plot")


def emit(text: str = "") -> None:
    """User-facing output of every sub-command goes through here (library modules do not
    print; a static rule checks it)."""
    print(text, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitllama",
        description="Custom Split LLaMA on Megatron-core: assemble checkpoints, prove "
                    "production equals the reference, benchmark.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_assemble(sub)
    _add_check(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "assemble":
        from splitllama.assemble import run_cli
    elif args.command == "check":
        from splitllama.parity import run_cli
    else:
        from splitllama.bench import run_cli
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
