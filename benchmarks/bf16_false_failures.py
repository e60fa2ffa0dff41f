"""How often does a CORRECT tiny mlp-adapter model fail the bf16 rule? (BENCHMARKS.md)

Each seed x {lm, value} is one model (the bf16 test checkpoint init), compared at TP=1 on
the micro-batches ``splitllama check`` compares on (``verify.batches.check_microbatches``:
its edge cases) in bf16; a model fails when any row fails.

    python benchmarks/bf16_false_failures.py --seeds 12 [--without-ties]

``--without-ties`` measures the rule as it was before ``splitllama/verify/adapter_ties.py``.
Runs on CPU (about 5 s per model on 2 cores) or on one GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import splitllama.verify.runner as runner  # noqa: E402
from splitllama.config import CustomSplitLlamaConfig  # noqa: E402
from splitllama.verify.tiny import tiny_split_config  # noqa: E402
from splitllama.distributed import init_distributed  # noqa: E402
from splitllama.layout import ParallelLayout  # noqa: E402
from splitllama.verify.random_checkpoints import TEST_CHECKPOINT_INIT, random_split_checkpoint  # noqa: E402
from splitllama.verify.batches import check_microbatches  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=12, help="checkpoint seeds 0..N-1 per head (default 12)")
    parser.add_argument("--without-ties", action="store_true", help="judge without the ReLU-tie handling")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed(device)
    if args.without_ties:
        runner.AdapterTies = lambda *a, **k: None
    failed = 0
    for head in ("lm", "value"):
        for seed in range(args.seeds):
            ckpt = tempfile.mkdtemp()
            random_split_checkpoint(tiny_split_config(mlp=True), ckpt, head, seed=seed,
                                    **TEST_CHECKPOINT_INIT[torch.bfloat16])
            config = CustomSplitLlamaConfig.from_pretrained(ckpt)
            report = runner.run_parity(ckpt, config, ParallelLayout(), head, torch.bfloat16, device,
                                       check_microbatches(config.vocab_size, head))
            worst = max((r for r in report.rows if r.rel_bound > 0), key=lambda r: r.max_rel / r.rel_bound)
            failed += not report.passed
            print(f"{head} seed {seed}: {'PASS' if report.passed else 'FAIL'}, worst row "
                  f"{worst.max_rel / worst.rel_bound:.2f}x its bound ({worst.name})", flush=True)
    print(f"{failed}/{2 * args.seeds} correct models fail the bf16 rule")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
