"""The parallel-size rules: one function, the sizes named as each caller's user knows them,
importable without torch (the command line checks its flags with it before importing torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitllama.layout import real_vocab_rows
from splitllama.parallel_sizes import FLAG_NAMES, MEGATRON_NAMES, check_parallel_sizes


@pytest.mark.parametrize("sizes,names,message", [
    (dict(tp=0), FLAG_NAMES, "--tp must be a positive int, got 0"),
    (dict(pp=2, vpp=0), MEGATRON_NAMES, "virtual_pipeline_model_parallel_size must be None or a positive int, got 0"),
    (dict(vpp=2), FLAG_NAMES, "--vpp 2 needs --pp > 1"),
    (dict(sp=True), MEGATRON_NAMES, "sequence_parallel needs tensor_model_parallel_size > 1"),
])
def test_sizes_are_refused_in_the_callers_names(sizes, names, message):
    with pytest.raises(ValueError, match=message):
        check_parallel_sizes(**sizes, names=names)


def test_possible_sizes_pass():
    check_parallel_sizes(tp=2, sp=True, pp=2, vpp=2)


@pytest.mark.parametrize("start,width,vocab,rows", [
    (0, 151, 301, range(0, 151)), (151, 151, 301, range(151, 301)), (256, 128, 300, range(256, 300)),
    (384, 128, 300, range(300, 300)),
])
def test_real_vocab_rows_stop_at_the_vocabulary(start, width, vocab, rows):
    assert real_vocab_rows(start, width, vocab) == rows


def test_importing_the_rules_loads_no_torch():
    code = "import sys, splitllama.parallel_sizes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
