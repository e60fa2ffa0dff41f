"""The catalogue of bad inputs: each row runs the ``splitllama`` command and must get ONE
line ``splitllama <cmd>: error: ...`` naming the flag, the file or the config field as the
user wrote it, exit code 2, no traceback, and no process launched (every row but the
broken-weights ones fails in the checks that run before ``check`` spawns ranks or imports
megatron; those are found when the check reads the weights).

Rows marked ``process`` run the installed command in a fresh process: the broken-weights
row (it reaches the run, which sets up process groups) and one row of each kind of check
(flags, checkpoint files, config fields, assemble), so the whole path from the command line
is covered. The others call ``cli.main`` in this process and read its output from the file
descriptors: the same code, without paying the interpreter and transformers' import (about
4 s) once per row.

The damaged checkpoints are copies of one tiny random split checkpoint: a shard missing
from its index, a truncated file, overwritten header bytes, a tensor removed, reshaped or
added, a NaN in a weight (Inf, in process: the last test), a nested config field of the
wrong type or contradicting another. ``assemble`` rows use tiny Hugging Face Llama checkpoints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitllama import weight_names as wn
from splitllama.config import llama_preset
from splitllama.verify.tiny import tiny_split_config
from splitllama.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE
from splitllama.verify.random_checkpoints import random_split_checkpoint
from tests.unit.hf_llama import random_llama, save_llama

REPO = Path(__file__).resolve().parents[2]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / SINGLE_FILE)


def _config_edited(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    shutil.copytree(source, target)
    fields = json.loads((target / "config.json").read_text())
    change(fields)
    (target / "config.json").write_text(json.dumps(fields))
    return target


def _set(path: str, value) -> Callable[[dict], None]:
    """Set a (dotted) field of a config dict: ``_set("lower_config.num_attention_heads", "four")``."""
    *parents, name = path.split(".")

    def change(fields: dict) -> None:
        for parent in parents:
            fields = fields[parent]
        fields[name] = value
    return change


def _rewritten(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    shutil.copytree(source, target)
    tensors = _tensors(source)
    change(tensors)
    save_file(tensors, target / SINGLE_FILE, metadata={"format": "pt"})
    return target


@pytest.fixture(scope="session")
def bad(tmp_path_factory) -> dict[str, Path]:
    """Name -> a directory that some row hands to the command."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = Path(random_split_checkpoint(tiny_split_config(), str(root / "good"), dtype=torch.float32))
    assert (good / SINGLE_FILE).is_file()
    out = {"good": good}

    out["not_json"] = Path(shutil.copytree(good, root / "not_json"))
    (out["not_json"] / "config.json").write_text("{not json")

    truncated = Path(shutil.copytree(good, root / "truncated"))
    data = (truncated / SINGLE_FILE).read_bytes()
    (truncated / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    out["truncated"] = truncated

    corrupted = Path(shutil.copytree(good, root / "corrupted"))
    data = bytearray((corrupted / SINGLE_FILE).read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header starts after an 8-byte length
    (corrupted / SINGLE_FILE).write_bytes(bytes(data))
    out["corrupted"] = corrupted

    missing_shard = Path(shutil.copytree(good, root / "missing_shard"))
    names = list(_tensors(good))
    shard = "model-00002-of-00002.safetensors"
    (missing_shard / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {
        n: ("model-00001-of-00002.safetensors" if i % 2 else shard) for i, n in enumerate(names)}}))
    (missing_shard / SINGLE_FILE).rename(missing_shard / "model-00001-of-00002.safetensors")
    out["missing_shard"] = missing_shard

    def reshape(t):
        t[wn.LM_HEAD] = t[wn.LM_HEAD][:-1].clone()

    def add(t):
        t["model.extra.weight"] = torch.zeros(2)

    out["wrong_shape"] = _rewritten(good, root / "wrong_shape", reshape)
    out["missing_tensor"] = _rewritten(good, root / "missing_tensor", lambda t: t.pop(wn.FINAL_NORM))
    out["extra_tensor"] = _rewritten(good, root / "extra_tensor", add)

    def poison(value: float):
        def change(t):
            t[wn.upper_layer(1, "mlp.up_proj.weight")][3, :2] = value
        return change

    out["nan_weight"] = _rewritten(good, root / "nan_weight", poison(float("nan")))
    out["nested_wrong_type"] = _config_edited(good, root / "nested_wrong_type",
                                              _set("lower_config.num_attention_heads", "four"))
    out["nested_inconsistent"] = _config_edited(good, root / "nested_inconsistent",
                                                _set("upper_config.num_attention_heads", 6))
    out["value_checkpoint"] = Path(random_split_checkpoint(tiny_split_config(), str(root / "value"), "value",
                                                           dtype=torch.float32))

    out["llama"] = save_llama(random_llama(llama_preset("tiny-llama3.1-8b"), 1, torch.float32), root / "llama")
    out["llama_70b_shape"] = save_llama(random_llama(llama_preset("tiny-llama3.1-70b"), 2, torch.float32),
                                        root / "llama_70b_shape")
    out["llama_vocab_300"] = save_llama(
        random_llama(llama_preset("tiny-llama3.1-70b", vocab_size=300), 3, torch.float32), root / "llama_vocab")
    out["llama_tied"] = save_llama(random_llama(llama_preset("tiny-llama3.1-70b", tie_word_embeddings=True), 5,
                                                torch.float32), root / "llama_tied")
    out["llama_yarn"] = save_llama(random_llama(llama_preset("tiny-llama3.1-70b", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32768}),
        4, torch.float32), root / "llama_yarn")
    out["llama_wrong_type"] = _config_edited(out["llama"], root / "llama_wrong_type",
                                             _set("num_attention_heads", "four"))
    out["llama_inconsistent"] = _config_edited(out["llama"], root / "llama_inconsistent",
                                               _set("num_attention_heads", 6))
    out["existing_out"] = root / "existing_out"
    out["existing_out"].mkdir()
    (out["existing_out"] / "keep.txt").write_text("mine")
    return out


@dataclass(frozen=True)
class Row:
    name: str
    argv: Callable[[dict], list[str]]
    message: str  # a substring of the one error line
    code: int = 2
    process: bool = False  # in a fresh process (see the module docstring)


def _assemble(lower: str, upper: str, out: str = "", num_lower: int = 1, *flags: str) -> Callable[[dict], list[str]]:
    def argv(b):
        return ["assemble", "--lower", str(b[lower]), "--upper", str(b[upper]), "--num-lower", str(num_lower),
                "--num-upper", "1", "--out", str(b[out]) if out else str(b["good"].parent / f"out_{lower}_{upper}"),
                *flags]
    return argv


CATALOGUE = [
    Row("missing_directory", lambda b: ["check", "/nonexistent/split"], "/nonexistent/split is not a directory",
        process=True),
    Row("plain_llama_to_check", lambda b: ["check", str(b["llama"])],
        "has model_type='llama', expected 'custom_split_llama': make a split checkpoint with `splitllama assemble`"),
    Row("config_not_json", lambda b: ["check", str(b["not_json"])], "config.json is not valid JSON"),
    Row("missing_shard", lambda b: ["check", str(b["missing_shard"])],
        "names the shard model-00002-of-00002.safetensors, which does not exist"),
    Row("truncated_safetensors", lambda b: ["check", str(b["truncated"])], "cannot read the safetensors file"),
    Row("corrupted_safetensors_header", lambda b: ["check", str(b["corrupted"])], "cannot read the safetensors file"),
    Row("tensor_of_wrong_shape", lambda b: ["check", str(b["wrong_shape"])],
        "tensor lm_head.weight has shape (255, 128), expected (256, 128)"),
    Row("missing_tensor", lambda b: ["check", str(b["missing_tensor"])], "is missing tensors: model.norm.weight"),
    Row("extra_tensor", lambda b: ["check", str(b["extra_tensor"])], "has unexpected tensors: model.extra.weight"),
    Row("tp_not_dividing_heads", lambda b: ["check", "--tp", "3"],
        "--tp 3 --pp 1: lower_config.num_attention_heads=8 is not divisible by tensor_model_parallel_size=3",
        process=True),
    Row("tp_zero", lambda b: ["check", "--tp", "0"], "--tp must be a positive int, got 0"),
    Row("pp_larger_than_layers", lambda b: ["check", "--pp", "8"], "--tp 1 --pp 8: "),
    Row("vpp_without_pp", lambda b: ["check", "--vpp", "2"], "--vpp 2 needs --pp > 1"),
    Row("sp_without_tp", lambda b: ["check", "--sp"], "--sp needs --tp > 1"),
    Row("bf16_on_cpu", lambda b: ["check", "--dtype", "bfloat16", "--device", "cpu"],
        "--dtype bfloat16 is checked on CUDA only"),
    Row("unknown_dtype", lambda b: ["check", "--dtype", "float16"],
        "argument --dtype: invalid choice: 'float16' (choose from 'float32', 'float64', 'bfloat16')"),
    Row("assemble_different_vocabularies", _assemble("llama", "llama_vocab_300"), "vocab"),
    Row("assemble_rope_that_cannot_be_combined", _assemble("llama", "llama_yarn"), "rope"),
    Row("assemble_output_exists", _assemble("llama", "llama_70b_shape", "existing_out"),
        "--out ", process=True),
    # nested config fields, as they are written in config.json
    Row("nested_field_of_wrong_type", lambda b: ["check", str(b["nested_wrong_type"])],
        "config.json: lower_config.num_attention_heads: expected int, got str (value: 'four')", process=True),
    Row("nested_fields_inconsistent", lambda b: ["check", str(b["nested_inconsistent"])],
        "config.json: upper_config is inconsistent: The hidden size (128) is not a multiple of the number "
        "of attention heads (6)"),
    Row("assemble_source_field_of_wrong_type", _assemble("llama_wrong_type", "llama_70b_shape"),
        "config.json: num_attention_heads: expected int, got str (value: 'four')"),
    Row("assemble_source_fields_inconsistent", _assemble("llama_inconsistent", "llama_70b_shape"),
        "config.json is inconsistent: The hidden size (64) is not a multiple of the number of attention heads (6)"),
    # broken weights: named as such, with the tensor
    Row("nan_in_a_weight", lambda b: ["check", str(b["nan_weight"])],
        "is broken: tensor model.layers_last.1.mlp.up_proj.weight (448, 128) holds 2 NaN of 57344 values",
        process=True),
    # the flags the messages name, as the user typed them
    Row("uneven_pipeline_split_names_the_flag", lambda b: ["check", "--pp", "3"],
        "do not split evenly over 3 pipeline stages (pp=3 x vpp=1); pass --layers-per-stage, a list of 3 "
        "counts summing to 4"),
    Row("layers_per_stage_of_wrong_sum", lambda b: ["check", "--pp", "2", "--layers-per-stage", "3,2"],
        "--tp 1 --pp 2 --layers-per-stage 3,2: --layers-per-stage [3, 2] must hold 2 (pp=2 x vpp=1) positive "
        "counts summing to 4"),
    Row("layers_per_stage_not_counts", lambda b: ["check", "--pp", "2", "--layers-per-stage", "2,two"],
        "argument --layers-per-stage: '2,two' is not a comma-separated list of layer counts"),
    Row("value_on_a_causal_lm_checkpoint", lambda b: ["check", "--value", str(b["good"])],
        "pass --fresh-value-head (or make a value checkpoint with `splitllama assemble --value`)"),
    Row("lm_check_of_a_value_checkpoint", lambda b: ["check", str(b["value_checkpoint"])],
        "is a value checkpoint (score.weight, no lm_head.weight): check it with --value"),
    Row("fresh_value_head_without_value", lambda b: ["check", "--fresh-value-head", str(b["good"])],
        "--fresh-value-head needs --value"),
    Row("mlp_with_a_checkpoint", lambda b: ["check", "--mlp", str(b["good"])],
        "--mlp chooses the built-in tiny model's adapter; a CHECKPOINT's adapter is the one its config.json names"),
    Row("json_in_a_missing_directory", lambda b: ["check", "--json", "/nonexistent/dir/report.json"],
        "--json /nonexistent/dir/report.json: the directory /nonexistent/dir does not exist"),
    Row("assemble_num_lower_out_of_range", _assemble("llama", "llama_70b_shape", num_lower=5),
        "--num-lower 5 is out of range: the lower model has 4 layers (allowed 1..4)"),
    Row("assemble_from_a_split_checkpoint", _assemble("good", "llama_70b_shape"),
        "has model_type='custom_split_llama', expected 'llama' (it is a split checkpoint already"),
    # the condition that fails, not one that holds
    Row("assemble_identity_of_different_widths", _assemble("llama", "llama_70b_shape", "", 1, "--adapter", "identity"),
        "--adapter 'identity' needs equal hidden sizes, got lower 64 and upper 128 (use --adapter 'init' or"),
    Row("assemble_identity_with_mlp", _assemble("llama", "llama", "", 1, "--mlp", "--adapter", "identity"),
        "--adapter 'identity' needs the linear adapter (got --mlp)"),
    # rollout: what verl's worker needs, and the rollouts of another engine
    Row("rollout_checkpoint_without_tokenizer", lambda b: ["rollout", str(b["good"])],
        "holds no tokenizer (tokenizer.json or tokenizer_config.json): verl's worker reads one"),
    Row("rollouts_without_checkpoint", lambda b: ["rollout", "--rollouts", str(b["good"] / SINGLE_FILE)],
        "--rollouts needs the CHECKPOINT its engine ran"),
    Row("rollout_temperature_zero", lambda b: ["rollout", "--temperature", "0"],
        "--temperature must be a positive number, got 0.0"),
    Row("rollout_uneven_pipeline_split", lambda b: ["rollout", "--pp", "3"],
        "--tp 1 --pp 3: 4 layers (num_layers_8=2 + num_layers_70=2) do not split evenly over 3 pipeline stages "
        "(pp=3 x vpp=1) (verl splits the layers evenly)"),
    # named by the command it was given to, as that command's own errors are
    Row("unknown_flag", lambda b: ["check", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    Row("unknown_assemble_flag", _assemble("llama", "llama_70b_shape", "", 1, "--no-such-flag"),
        "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("row", CATALOGUE, ids=[r.name for r in CATALOGUE])
def test_bad_input_gets_one_line_and_exit_2(row: Row, bad, monkeypatch, capfd):
    argv = row.argv(bad)
    if row.process:
        result = subprocess.run([sys.executable, "-m", "splitllama.cli", *argv], capture_output=True, text=True,
                                timeout=120, cwd=REPO)
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        code, stdout, stderr = _in_process(argv, monkeypatch, capfd)
    lines = [line for line in stderr.splitlines() if line.strip()]
    command = argv[0]
    assert code == row.code, stderr
    assert len(lines) == 1 and lines[0].startswith(f"splitllama {command}: error: "), stderr
    assert row.message in lines[0], lines[0]
    assert stdout == ""


def _in_process(argv: list[str], monkeypatch, capfd, launcher: bool = False) -> tuple[int, str, str]:
    from splitllama import cli

    # as a user's shell would have it: no launcher variables from a process group that an
    # earlier test in this worker made (``launcher``: the test has set them)
    for name in (() if launcher else ("RANK", "WORLD_SIZE", "LOCAL_RANK")) + (cli.LAUNCH_DIR_ENV,):
        monkeypatch.delenv(name, raising=False)
    capfd.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    out, err = capfd.readouterr()
    return code, out, err


def test_debug_shows_the_traceback(bad):
    result = subprocess.run([sys.executable, "-m", "splitllama.cli", "check", "--debug", str(bad["not_json"])],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "is not valid JSON" in result.stderr.splitlines()[-1]


def test_check_finite_names_the_tensor_holding_nan_or_inf(bad, tmp_path):
    from splitllama.checkpoint.directory import BrokenCheckpointError, check_finite

    check_finite(bad["good"])  # a sound checkpoint passes
    name = wn.upper_layer(1, "mlp.up_proj.weight")

    def inf_and_nan(t):
        t[name][0, :3] = float("inf")
        t[name][1, 0] = float("-inf")
        t[name][2, 0] = float("nan")

    broken = _rewritten(bad["good"], tmp_path / "inf", inf_and_nan)
    with pytest.raises(BrokenCheckpointError, match=rf"is broken: tensor {name} \(448, 128\) holds 1 NaN and 4 Inf "
                                                    r"of 57344 values \(in model.safetensors\)"):
        check_finite(broken)


# A path that holds no checkpoint is refused before torch or transformers is imported: in
# a fraction of a second, where importing them takes seconds (8 s on a busy machine).
REFUSED_BEFORE_THE_IMPORTS = """
import sys
from splitllama.cli import main
code = main(sys.argv[1:])
print(code, sorted(m for m in ("torch", "transformers", "megatron") if m in sys.modules))
"""


@pytest.mark.parametrize("path", ["/nonexistent/split", "file", "empty", "not_json"])
def test_a_path_holding_no_checkpoint_is_refused_before_torch_is_imported(path, bad, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    directory = bad[path] if path in bad else tmp_path / path
    result = subprocess.run([sys.executable, "-c", REFUSED_BEFORE_THE_IMPORTS, "check", str(directory)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.stdout == "2 []\n", result.stdout + result.stderr
    assert result.stderr.startswith("splitllama check: error: "), result.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_a_launcher_with_another_world_size_gets_one_line(rank, monkeypatch, capfd):
    """``torchrun --nproc-per-node 2 ... check`` (tp*pp = 1): rank 0 says so, every rank exits 2,
    before any process group is made. (torchrun then prints its own summary of the failed
    workers and exits 1: a launcher's exit code is not the workers' to choose.)"""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = _in_process(["check"], monkeypatch, capfd, launcher=True)
    assert (code, out) == (2, "")
    expected = "splitllama check: error: world size 2 != tp*pp = 1: run with torchrun --nproc-per-node 1\n"
    assert err == (expected if rank == 0 else "")


def test_assemble_says_where_the_lm_head_came_from(bad, monkeypatch, capfd):
    """A tied upper model stores no lm_head: its input embedding is the head, and the
    summary says so (the weights themselves: test_assemble)."""
    argv = _assemble("llama", "llama_tied")(bad)
    code, out, err = _in_process(argv, monkeypatch, capfd)
    assert (code, err) == (0, ""), err
    assert "the upper model's input embedding as the LM head (its embeddings are tied: it stores no " \
           "lm_head.weight)" in out
    untied = [*argv[:4], str(bad["llama_70b_shape"]), *argv[5:-1], str(bad["good"].parent / "untied")]
    code, out, _ = _in_process(untied, monkeypatch, capfd)
    assert code == 0 and "the upper LM head;" in out
