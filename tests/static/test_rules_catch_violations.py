"""Each rule fires on a planted violation (and stays quiet on the compliant variant), so no
rule can pass the repository vacuously."""

from __future__ import annotations

import textwrap

import pytest

from tests.static import rules


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def variant(base: str, old: str, new: str) -> str:
    assert old in base, f"{old!r} is not in the snippet"  # else the case would equal the clean one
    return base.replace(old, new)


# ---- a compliant registry class hierarchy, shaped like splitllama/model.py and pipeline.py --------------
MODEL = src('''
    import torch


    class ParallelCustomSplitLLamaModel(torch.nn.Module):
        pass


    class ParallelCustomSplitLLamaModelRmPad(ParallelCustomSplitLLamaModel):
        pass


    class ParallelCustomSplitLLamaForCausalLM(torch.nn.Module):
        def _init_head(self, config):
            self.lm_head = None

        def _forward_head(self, hidden):
            return hidden


    class ParallelCustomSplitLLamaForCausalLMRmPad(ParallelCustomSplitLLamaForCausalLM):
        def forward(self, input_ids):
            return self._forward_head(input_ids)


    class ParallelCustomSplitLLamaForValueRmPad(ParallelCustomSplitLLamaForCausalLMRmPad):
        """The critic: a 1 x h_hi value head."""

        head_class = None

        def _init_head(self, config):
            self.value_head = None

        def _forward_head(self, hidden):
            return hidden[..., 0]
''')
PIPELINE = src('''
    from splitllama import model as m


    class PipelineStageMixin:
        def __init__(self, config, megatron_config, pre_process, post_process,
                     share_embeddings_and_output_weights=False, *, vp_stage=None):
            self.pre_process = pre_process

        def set_input_tensor(self, input_tensor):
            self.input_tensor = input_tensor


    class ParallelCustomSplitLLamaForCausalLMRmPadPP(PipelineStageMixin, m.ParallelCustomSplitLLamaForCausalLMRmPad):
        pass


    class ParallelCustomSplitLLamaForValueRmPadPP(PipelineStageMixin, m.ParallelCustomSplitLLamaForValueRmPad):
        pass
''')
REGISTRY = src('''
    _MODELS: dict[str, tuple[str, str, str]] = {
        "CustomSplitLLamaForCausalLM": (
            "splitllama.pipeline.ParallelCustomSplitLLamaForCausalLMRmPadPP",
            "splitllama.pipeline.ParallelCustomSplitLLamaForValueRmPadPP",
            "splitllama.model.ParallelCustomSplitLLamaForCausalLMRmPad",
        ),
    }
''')


def hierarchy(model: str = MODEL, pipeline: str = PIPELINE) -> dict[str, str]:
    return {"splitllama/model.py": model, "splitllama/pipeline.py": pipeline}


def one(path: str, text: str) -> dict[str, str]:
    return {path: src(text)}


VALUE_PP_AFTER_CAUSAL_PP = variant(
    PIPELINE, "PP(PipelineStageMixin, m.ParallelCustomSplitLLamaForValueRmPad)",
    "PP(ParallelCustomSplitLLamaForCausalLMRmPadPP, m.ParallelCustomSplitLLamaForValueRmPad)")

# (rule, files, words the first violation says; None: the files follow the rule)
CASES = {
    # -- registry-classes
    "classes-ok": ("registry-classes", hierarchy(), None),
    "classes-value-pp-after-causal-pp-ok": ("registry-classes", hierarchy(pipeline=VALUE_PP_AFTER_CAUSAL_PP), None),
    "classes-class-renamed": ("registry-classes", hierarchy(model=variant(
        MODEL, "class ParallelCustomSplitLLamaModelRmPad(", "class SplitModelRmPad(")),
        "ParallelCustomSplitLLamaModelRmPad is not defined"),
    "classes-wrong-base": ("registry-classes", hierarchy(model=variant(
        MODEL, "RmPad(ParallelCustomSplitLLamaForCausalLMRmPad):", "RmPad(torch.nn.Module):")),
        "must list ParallelCustomSplitLLamaForCausalLMRmPad among its direct bases"),
    "classes-value-defines-forward": ("registry-classes", hierarchy(model=variant(
        MODEL, "        return hidden[..., 0]\n",
        "        return hidden[..., 0]\n\n    def forward(self, input_ids):\n        return input_ids\n")),
        "may define only _init_head and _forward_head"),
    "classes-value-sets-another-attribute": ("registry-classes", hierarchy(model=variant(
        MODEL, "        return hidden[..., 0]\n", "        return hidden[..., 0]\n\n    packed = False\n")),
        "may define only _init_head and _forward_head and head_class"),
    "classes-causal-has-no-head": ("registry-classes", hierarchy(model=variant(
        MODEL, "    def _init_head(self, config):\n        self.lm_head = None\n", "")),
        "_init_head must be defined by both"),
    "classes-empty-value-pp": ("registry-classes", hierarchy(pipeline=variant(
        PIPELINE, "PP(PipelineStageMixin, m.ParallelCustomSplitLLamaForValueRmPad)",
        "PP(m.ParallelCustomSplitLLamaForValueRmPad)")), "an empty subclass"),
    "classes-pp-share-default-true": ("registry-classes", hierarchy(pipeline=variant(
        PIPELINE, "share_embeddings_and_output_weights=False", "share_embeddings_and_output_weights=True")),
        "__init__ defaults share_embeddings_and_output_weights"),
    "classes-pp-parameters-reordered": ("registry-classes", hierarchy(pipeline=variant(
        PIPELINE, "pre_process, post_process,", "post_process, pre_process,")), "has parameters"),
    "classes-value-pp-runs-lm-head": ("registry-classes", hierarchy(pipeline=variant(
        VALUE_PP_AFTER_CAUSAL_PP, "RmPadPP(PipelineStageMixin, m.ParallelCustomSplitLLamaForCausalLMRmPad):\n    pass",
        "RmPadPP(PipelineStageMixin, m.ParallelCustomSplitLLamaForCausalLMRmPad):\n"
        "    def _forward_head(self, hidden):\n        return hidden")), "_forward_head comes from"),
    "classes-inconsistent-mro": ("registry-classes", hierarchy(pipeline=variant(
        VALUE_PP_AFTER_CAUSAL_PP, "PP(ParallelCustomSplitLLamaForCausalLMRmPadPP, m.",
        "PP(m.ParallelCustomSplitLLamaForCausalLMRmPad, m.")), "no consistent method resolution order"),
    # -- registry
    "registry-ok": ("registry", {"splitllama/registry.py": REGISTRY}, None),
    "registry-roles-swapped": ("registry", {"splitllama/registry.py": variant(
        REGISTRY, "RmPadPP\",\n        \"splitllama.pipeline.ParallelCustomSplitLLamaForValue",
        "RmPadPP\",\n        \"splitllama.pipeline.ParallelCustomSplitLLamaForCausalLM")}, "must be the literal tuple"),
    "registry-missing": ("registry", {"splitllama/registry.py": "_MODELS = {}\n"}, "must be the literal tuple"),
    # -- boundaries
    "bench-imports-oracle-ok": ("boundaries", one("splitllama/bench.py", "from oracle import modeling\n"), None),
    "harness-imports-oracle-ok": ("boundaries", one("splitllama/verify/runner.py", '''
        from oracle import CustomSplitLLamaForCausalLM
        from splitllama.model import ParallelCustomSplitLLamaForCausalLMRmPad
    '''), None),
    "cli-imports-harness-in-function-ok": ("boundaries", one("splitllama/cli.py", '''
        def main():
            from splitllama.verify.check import run_cli
    '''), None),
    "oracle-imports-data-ok": ("boundaries", one("oracle/modeling.py", '''
        from splitllama import weight_names as wn
        from splitllama.config import CustomSplitLlamaConfig
    '''), None),
    "product-imports-oracle": ("boundaries", one("splitllama/model.py", '''
        def compare():
            import oracle.modeling
    '''), "product imports the oracle"),
    "product-imports-harness": ("boundaries", one("splitllama/layers.py",
                                                  "from splitllama.verify import rules\n"), "imports the harness"),
    "cli-imports-harness-at-top": ("boundaries", one("splitllama/cli.py", "from splitllama import verify\n"),
                                   "imports the harness"),
    "harness-imports-tests": ("boundaries", one("splitllama/verify/check.py", "from tests.cases import x\n"),
                              "imports tests"),
    "oracle-imports-math": ("boundaries", one("oracle/modeling.py", "from splitllama.layers import RMSNorm\n"),
                            "the oracle imports splitllama.layers.RMSNorm"),
    "oracle-imports-package": ("boundaries", one("oracle/modeling.py", "import splitllama\n"),
                               "the oracle imports splitllama;"),
    "oracle-imports-relative-dynamic": ("boundaries", one("oracle/modeling.py", '''
        import importlib
        model = importlib.import_module("splitllama.model")
    '''), "the oracle imports splitllama.model"),
    "oracle-imports-megatron": ("boundaries", one("oracle/modeling.py", "import megatron.core\n"),
                                "imports megatron"),
    # -- flash-attn
    "flash-attn-guarded-ok": ("flash-attn", one("splitllama/attention.py", '''
        try:
            from flash_attn import flash_attn_varlen_func
        except (ModuleNotFoundError, ImportError):
            flash_attn_varlen_func = None
    '''), None),
    "flash-attn-elsewhere": ("flash-attn", one("splitllama/layers.py", '''
        try:
            import flash_attn
        except ImportError:
            flash_attn = None
    '''), "outside splitllama/attention.py"),
    "flash-attn-unguarded": ("flash-attn", one("splitllama/attention.py", "from flash_attn import x\n"),
                             "without try/except ImportError"),
    "flash-attn-guard-catches-other": ("flash-attn", one("tests/unit/test_x.py", '''
        try:
            import flash_attn
        except RuntimeError:
            pass
    '''), "without try/except ImportError"),
    # -- no-pickle
    "torch-load-weights-only-ok": ("no-pickle", one("tests/unit/test_x.py", '''
        import torch as t
        t.load("x.pt", weights_only=True)
    '''), None),
    "torch-load-default": ("no-pickle", one("splitllama/checkpoint/split.py", '''
        from torch import load
        state = load("x.pt")
    '''), "torch.load without weights_only=True"),
    "torch-load-weights-only-false": ("no-pickle", one("oracle/modeling.py", '''
        import torch
        torch.load("x.pt", weights_only=False)
    '''), "torch.load without weights_only=True"),
    "pickle-loads": ("no-pickle", one("splitllama/cli.py", "import pickle\npickle.loads(b'')\n"),
                     "pickle.loads runs code"),
    "trust-remote-code": ("no-pickle", one("tests/unit/test_x.py", '''
        from transformers import AutoModel
        AutoModel.from_pretrained("x", trust_remote_code=True)
    '''), "trust_remote_code"),
    # -- collectives
    "collectives-allow-listed-ok": ("collectives", one("splitllama/logprobs.py", '''
        import torch.distributed as dist
        dist.all_reduce(x)
    '''), None),
    "collectives-in-harness-ok": ("collectives", one("splitllama/verify/runner.py", '''
        from torch import distributed
        distributed.barrier()
    '''), None),
    "collective-in-oracle": ("collectives", one("oracle/modeling.py", '''
        import torch

        def forward(x):
            torch.distributed.all_reduce(x)
    '''), "oracle is single-process"),
    "collective-in-model-math": ("collectives", one("splitllama/layers.py", '''
        from torch.distributed import all_gather_into_tensor as gather
        gather(out, x)
    '''), "torch.distributed.all_gather_into_tensor called"),
    # -- no-citations
    "citation-free-ok": ("no-citations", one("splitllama/model.py", '''
        """Speculative SPECTRAL words, and a shared folder: not citations."""
        # spec-compliant
    '''), None),
    "citation-in-comment": ("no-citations", one("splitllama/model.py", "x = 1\ny = 2  # see SP" "EC 4.3\n"),
                            "cites 'SP" "EC 4'"),
    "citation-in-docstring": ("no-citations", one("oracle/modeling.py", '''
        def f():
            """Shapes.

            As in SP''' '''EC.md."""
    '''), "cites 'SP" "EC.md'"),
    "citation-of-shared-folder": ("no-citations", one("tests/unit/test_x.py", '"""Data from .' './shared."""\n'),
                                  "cites '.." "/shared'"),
    # -- import-cycle
    "no-cycle-ok": ("import-cycle", {
        "splitllama/a.py": "from splitllama import b\n",
        "splitllama/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from splitllama import a\n",
    }, None),
    "cycle-at-top": ("import-cycle", {
        "splitllama/a.py": "from splitllama.b import g\n",
        "splitllama/b.py": "from . import a\n",
    }, "import cycle splitllama."),
    "cycle-through-function": ("import-cycle", {
        "splitllama/cli.py": "def main():\n    from splitllama.parity import run_cli\n",
        "splitllama/parity.py": "import torch\n\n\ndef run_cli():\n    from splitllama.cli import emit\n",
    }, "import cycle splitllama."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rule_on_planted_code(case: str) -> None:
    rule, files, says = CASES[case]
    violations = rules.check(rule, files)
    if says is None:
        assert not violations, "\n".join(map(str, violations))
    else:
        assert violations, f"{rule} did not fire"
        assert says in str(violations[0]), str(violations[0])


def test_every_rule_fires_on_some_case() -> None:
    assert {rule for rule, _, says in CASES.values() if says} == set(rules.RULES)


def test_violation_line_numbers() -> None:
    [v] = rules.check("no-pickle", one("splitllama/x.py", "import torch\n\n\ntorch.load('x.pt')\n"))
    assert (v.path, v.line) == ("splitllama/x.py", 4)
    [v] = rules.check("no-citations", one("splitllama/x.py", '"""One.\n\nTwo: SP' 'EC 2."""\n'))
    assert v.line == 3
