"""The ``splitllama`` command as a user meets it: help, argument errors, and ``check``'s
exit code (0 on a correct model, 1 when production is wrong)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitllama.cli import build_parser
from splitllama.verify.batches import check_microbatches

# The planted two-projection adapter (docs/verification.md, defect 1) from the planted-bug table, applied in a
# fresh process before the command runs.
PLANTED_TWO_PROJECTIONS = """
import sys, types
from tests.integration.planted_bugs import PLANTED
bug = next(b for b in PLANTED if b.name == "two_projection_adapter")
bug.plant(types.SimpleNamespace(setattr=setattr))
from splitllama.cli import main
sys.exit(main(sys.argv[1:]))
"""
REPO = Path(__file__).resolve().parents[2]


# A process group already made in this pytest process (init_distributed sets these) would
# be joined, or its port taken, by the command: it must start as a user's would.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "splitllama.cli", *args]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def test_help_lists_commands_and_examples():
    text = build_parser().format_help()
    for word in ("assemble", "check", "rollout", "bench", "splitllama check --tp 2 --sp", "--version"):
        assert word in text


def _commands() -> dict:
    return build_parser().commands


def test_help_states_every_default_and_the_conditions_that_are_enforced():
    """An option with a default says it; --sp and --vpp say what they need, as the refusals
    do (test_cli_errors: sp_without_tp, vpp_without_pp)."""
    for name, command in _commands().items():
        for action in command._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert "default" in (action.help or ""), (name, action.option_strings, action.help)
    check = {a.dest: a.help for a in _commands()["check"]._actions}
    assert "needs --tp > 1" in check["sp"] and "to matter" not in check["sp"]
    assert "needs --pp > 1" in check["vpp"]


def test_version(capsys):
    from splitllama import __version__

    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"splitllama {__version__}\n"


@pytest.mark.parametrize("argv,message", [
    (["check", "--sp"], "--sp needs --tp > 1"),
    (["check", "--dtype", "bfloat16", "--device", "cpu"], "bfloat16 is checked on CUDA only"),
    (["check", "--dtype", "float16"], "invalid choice: 'float16'"),
])
def test_check_refuses_bad_arguments(argv, message):
    result = run(*argv)
    assert result.returncode != 0
    assert message in result.stderr


def test_check_passes_on_the_built_in_model_and_reports_what_it_checked(tmp_path):
    """The header names what was checked (options other than the defaults here, so each is
    seen to reach it), and the JSON carries the same content as the printed report."""
    out = tmp_path / "check.json"
    result = run("check", "--recompute", "selective", "--log-probs", "materialise", "--seed", "5", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed: PASS" in result.stdout
    report = json.loads(out.read_text())
    assert report["passed"] and all(row["passed"] for row in report["rows"])
    header, table = result.stdout.split("\n\n", 1)
    printed = dict(line.split(maxsplit=1) for line in header.splitlines())
    assert printed == {key: str(value) for key, value in report.items() if key not in ("rows", "passed")}
    assert printed == {"checkpoint": "built-in tiny model", "head": "lm", "adapter": "linear", "layout": "tp1_pp1",
                       "dtype": "float64", "recompute": "selective", "log_probs": "materialise",
                       "attention": "sdpa", "seed": "5"}
    rows = [line.split() for line in table.splitlines()[2:-1]]
    assert [[r["name"], f"{r['max_abs']:.3e}", f"{r['max_rel']:.3e}", f"{r['rel_bound']:.3e}",
             "pass" if r["passed"] else "FAIL"] for r in report["rows"]] == [
        [" ".join(r[:-4]), *r[-4:]] for r in rows]


def test_check_exits_1_when_production_is_wrong():
    result = run("check", code=PLANTED_TWO_PROJECTIONS)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout


@pytest.mark.parametrize("pp", [1, 2, 3])
def test_check_batch_count_fits_the_interleaved_schedule(pp):
    batches = check_microbatches(256, "lm", multiple_of=pp)
    assert len(batches) % pp == 0
    assert len({b.name for b in batches}) == len(batches)


def test_choices_mirror_the_library():
    from splitllama.bench import PARTS
    from splitllama.megatron_configs import RECOMPUTE
    from splitllama.options import RECOMPUTE_CHOICES

    assert tuple(RECOMPUTE) == RECOMPUTE_CHOICES  # megatron's settings exist for every choice
    assert build_parser().parse_args(["check", "--log-probs", "materialise"]).log_probs == "materialise"
    assert build_parser().parse_args(["check"]).log_probs == "fused"
    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                 if a.dest == "only")
    assert all(part in bench.help for part in PARTS)


# Loaded by every rank the command launches (PYTHONPATH): rank 1 alone fails inside the run.
RANK1_FAILS = """
import os
if os.environ.get("RANK") == "1":
    import splitllama.verify.check as check

    def failing(*args, **kwargs):
        raise RuntimeError("planted failure on rank 1 only")

    check.run_check = failing
"""


def test_a_failure_on_one_rank_is_printed_once_with_its_cause(tmp_path):
    """Rank 0 then fails too (its peer is gone); the launcher prints the FIRST failure."""
    (tmp_path / "sitecustomize.py").write_text(RANK1_FAILS)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", SPLITLLAMA_COLLECTIVE_TIMEOUT="30")
    result = subprocess.run([sys.executable, "-m", "splitllama.cli", "check", "--tp", "2"], capture_output=True,
                            text=True, timeout=300, cwd=REPO, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert lines == ["splitllama check: error: RuntimeError: planted failure on rank 1 only "
                     "(--debug shows the traceback)"], result.stderr


def test_layers_per_stage_reaches_the_layout():
    """``--pp 2 --layers-per-stage 3,2`` on a 5-layer checkpoint: the flag the uneven-split
    hint names gives the layout its stage counts (the run itself: the integration layouts)."""
    from splitllama.cli import _check_inputs

    args = build_parser().parse_args(["check", "--pp", "2", "--layers-per-stage", "1,3", "--device", "cpu"])
    layout, head, _, _ = _check_inputs(args)
    assert (layout.pp, layout.layers_per_stage, head) == (2, (1, 3), "lm")
    from splitllama.verify.tiny import tiny_split_config

    assert [len(s.lower_layers) + len(s.upper_layers) for s in layout.validate(tiny_split_config())] == [1, 3]


def test_check_value_model_from_a_causal_lm_checkpoint(tmp_path):
    """``check --value --fresh-value-head`` on a user's CausalLM checkpoint: production and
    oracle start from the same fresh value head (seeded by --seed) and are compared."""
    import torch

    from splitllama.verify.tiny import tiny_split_config
    from splitllama.verify.random_checkpoints import random_split_checkpoint

    checkpoint = random_split_checkpoint(tiny_split_config(), str(tmp_path / "causal"), dtype=torch.float32)
    result = run("check", "--value", "--fresh-value-head", "--seed", "3", checkpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\nhead        value (fresh, seed 3)\n" in result.stdout, result.stdout
    assert "grad score.weight" in result.stdout and "passed: PASS" in result.stdout
    # the fresh head was asked for: transformers' table of a missing score / unexpected lm_head is not shown
    assert "LOAD REPORT" not in result.stdout + result.stderr


def test_ctrl_c_stops_the_launched_ranks_with_one_line(monkeypatch, capfd):
    """Ctrl-C reaches every process in the terminal's foreground group: the launcher and each
    rank it started. The ranks ignore it (five tracebacks were printed before); the launcher
    stops them, prints one line and exits 130. The ranks meet through a file in the run's
    own directory: no port is picked by the launcher (two runs once picked the same one)."""
    import signal
    import time

    import psutil

    from splitllama import cli

    for name in (*_LAUNCHER_ENV, cli.LAUNCH_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    def ignores_sigint(pid: int) -> bool:
        status = Path(f"/proc/{pid}/status").read_text()
        ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
        return bool(ignored >> (signal.SIGINT - 1) & 1)

    def interrupted(procs):
        time.sleep(1.5)  # the ranks are running Python (a SIGINT not ignored would raise in them)
        seen["env"] = [psutil.Process(p.pid).environ() for p in procs]
        seen["ignore"] = [ignores_sigint(p.pid) for p in procs]
        for p in procs:
            os.kill(p.pid, signal.SIGINT)
        time.sleep(0.5)
        seen["running"] = [p.poll() is None for p in procs]
        raise KeyboardInterrupt  # what the launcher's own SIGINT raises

    monkeypatch.setattr(cli, "_wait_for_ranks", interrupted)
    capfd.readouterr()
    code = cli.main(["check", "--tp", "2"])
    out, err = capfd.readouterr()
    assert (code, out, err) == (130, "", "splitllama check: interrupted\n")
    assert seen["ignore"] == seen["running"] == [True, True]
    for env in seen["env"]:
        assert "MASTER_PORT" not in env and Path(env[cli.LAUNCH_DIR_ENV]).name.startswith("splitllama-launch-")
    assert not Path(seen["env"][0][cli.LAUNCH_DIR_ENV]).exists()  # removed with the run
