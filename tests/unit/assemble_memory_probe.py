"""Peak resident memory of the assembler, measured in a fresh process (used by
tests/unit/test_assemble.py).

``python -m tests.unit.assemble_memory_probe baseline`` imports what the assembler imports
and reports its peak RSS; ``... assemble LOWER UPPER N M OUT SHARD`` also assembles. Each
prints one JSON line ``{"peak_rss_bytes": ...}``; the difference is what assembling costs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from splitllama.checkpoint.assemble import assemble_split_checkpoint


def _peak_rss_bytes() -> int:
    """VmHWM, the peak RSS of this process image. (``getrusage``'s ``ru_maxrss`` would not
    do: Linux carries it over from the parent through fork and exec, so a child started by
    a 500 MB pytest process reports at least 500 MB.)"""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def main(argv: list[str]) -> int:
    if argv[0] == "assemble":
        lower, upper, num_lower, num_upper, out, shard = argv[1:7]
        assemble_split_checkpoint(lower, upper, int(num_lower), int(num_upper), out,
                                  max_shard_size=shard, progress=False)
    elif argv[0] != "baseline":
        raise ValueError(f"mode {argv[0]!r} (allowed: 'baseline', 'assemble')")
    sys.stdout.write(json.dumps({"peak_rss_bytes": _peak_rss_bytes()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
