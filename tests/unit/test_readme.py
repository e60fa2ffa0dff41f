"""The README as a new user meets it: the "From Python" example, run as written (its code
block is taken from README.md and executed in a fresh process, on CPU, in a directory
holding a tiny split checkpoint under the name the example loads, what `splitllama
assemble` would have made), and the install lines (the first two commands, what `.ci/run`
runs, docs/verl.md's)."""

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
    # the example's one line of output, the shapes: logits [B, S, V], log-probs and entropy [B, S]
    assert result.stdout == "torch.Size([2, 6, 256]) torch.Size([2, 6]) torch.Size([2, 6])\n", result.stdout
    # quiet, as the command line is: no megatron notices, no progress bar
    assert result.stderr == "", result.stderr


def test_the_first_two_commands_are_what_ci_runs_in_venvs_of_their_own():
    """The check's venv gets the newest transformers, the gate's the oldest (5.9.0): one venv
    for both would silently replace the first's. The gate command is `.ci/run`'s."""
    check, gate = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)[:2]
    assert check.strip().endswith("&& splitllama check"), check
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert gate.strip() == " && ".join(ci), (gate, ci)
    venvs = [re.search(r"python3 -m venv (\S+)", block).group(1) for block in (check, gate)]
    assert venvs[0] != venvs[1] and f"{venvs[1]}/" in (REPO / ".gitignore").read_text().splitlines(), venvs


def test_install_lines_say_where_each_torch_comes_from():
    readme = (REPO / "README.md").read_text()
    # PyPI's torch is the CUDA build: the CPU build comes from PyTorch's CPU wheel index
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    # splitllama is not on PyPI: verl users install the extra from a clone
    verl = (REPO / "docs" / "verl.md").read_text()
    assert "pip install -e '.[verl]'" in verl and "splitllama[" not in verl + readme
