"""The README's "From Python" example, run as written: its code block is taken from
README.md and executed in a fresh process, on CPU, in a directory holding a tiny split
checkpoint under the name the example loads (what `splitllama assemble` would have made)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import splitllama
from splitllama.verify.tiny import tiny_split_config
from splitllama.verify.random_checkpoints import random_split_checkpoint

REPO = Path(__file__).resolve().parents[2]
# A process group already made in this pytest process would be joined by the example.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def python_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^From Python.*?^```python\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no ```python block after 'From Python'"
    return match.group(1)


def test_the_example_uses_only_names_the_package_exports():
    used = set(re.findall(r"splitllama\.(\w+)", python_example()))
    assert used and used <= set(splitllama.__all__), used - set(splitllama.__all__)
    for name in used:
        assert getattr(splitllama, name) is not None


def test_the_python_example_runs_as_written(tmp_path):
    code = python_example()
    (checkpoint,) = set(re.findall(r'read_split_config\("([^"]+)"\)', code))
    random_split_checkpoint(tiny_split_config(), str(tmp_path / checkpoint), dtype=torch.float32)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    # the example's last line prints the shapes: logits [B, S, V], log-probs and entropy [B, S]
    assert result.stdout.strip().splitlines()[-1] == (
        "torch.Size([2, 6, 256]) torch.Size([2, 6]) torch.Size([2, 6])"), result.stdout
