"""Every rule flags a violating snippet and accepts a compliant one, so no rule can pass
silently: a rule added without cases here fails ``test_every_rule_has_cases``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from tests.static import rules
from tests.static.rules import RULES, RULES_BY_ID, check_sources


def src(text: str) -> str:
    """Dedented source whose first line is line 1."""
    return textwrap.dedent(text).lstrip("\n")


def variant(base: str, old: str, new: str) -> str:
    """``base`` with ``old`` replaced, refusing a replacement that changes nothing (which
    would turn a violating case into a copy of the compliant one)."""
    assert old in base, f"variant: {old!r} not in the base snippet"
    return base.replace(old, new)


# ---- compliant production hierarchy ------------------------------------------------------
MODEL_PY = src('''
    import torch
    from megatron.core.transformer.module import MegatronModule


    class ParallelCustomSplitLLamaModel(MegatronModule):
        def __init__(self, config, megatron_config):
            super().__init__(megatron_config)


    class ParallelCustomSplitLLamaModelRmPad(ParallelCustomSplitLLamaModel):
        pass


    class ParallelCustomSplitLLamaForCausalLM(torch.nn.Module):
        def __init__(self, config, megatron_config):
            super().__init__()
            self._init_head(config)

        def _init_head(self, config):
            self.lm_head = None

        def _forward_head(self, hidden):
            return hidden


    class ParallelCustomSplitLLamaForCausalLMRmPad(ParallelCustomSplitLLamaForCausalLM):
        def forward(self, input_ids, attention_mask, position_ids=None):
            return self._forward_head(input_ids)


    class ParallelCustomSplitLLamaForValueRmPad(ParallelCustomSplitLLamaForCausalLMRmPad):
        """Critic: the LM head replaced by a 1 x h_hi value head."""

        def _init_head(self, config):
            self.value_head = None

        def _forward_head(self, hidden):
            return hidden[..., 0]
''')

PP_INIT = '''
        def __init__(self, config, megatron_config, pre_process, post_process,
                     share_embeddings_and_output_weights=False):
            self.pre_process = pre_process

        def set_input_tensor(self, input_tensor):
            self.input_tensor = input_tensor
'''.lstrip("\n")

# Value PP inherits the pipeline API directly from the CausalLM PP class.
PIPELINE_DIRECT = src('''
    from splitllama.model import (
        ParallelCustomSplitLLamaForCausalLMRmPad,
        ParallelCustomSplitLLamaForValueRmPad,
    )


    class ParallelCustomSplitLLamaForCausalLMRmPadPP(ParallelCustomSplitLLamaForCausalLMRmPad):
''' + PP_INIT + '''

    class ParallelCustomSplitLLamaForValueRmPadPP(ParallelCustomSplitLLamaForCausalLMRmPadPP,
                                                   ParallelCustomSplitLLamaForValueRmPad):
        pass
''')

# Both PP classes take the pipeline API from a mixin (multiple inheritance).
PIPELINE_MIXIN = src('''
    from . import model


    class PipelineMixin:
''' + PP_INIT + '''

    class ParallelCustomSplitLLamaForCausalLMRmPadPP(
            PipelineMixin, model.ParallelCustomSplitLLamaForCausalLMRmPad):
        pass


    class ParallelCustomSplitLLamaForValueRmPadPP(
            PipelineMixin, model.ParallelCustomSplitLLamaForValueRmPad):
        """The critic, pipelined."""
''')

# The mixin lives in another module, the model classes come in through an alias.
STAGES_PY = src('''
    class StageMixin:
''' + PP_INIT)
PIPELINE_MIXIN_ELSEWHERE = src('''
    from splitllama import model as m
    from splitllama.stages import StageMixin


    class ParallelCustomSplitLLamaForCausalLMRmPadPP(
            StageMixin, m.ParallelCustomSplitLLamaForCausalLMRmPad):
        pass


    class ParallelCustomSplitLLamaForValueRmPadPP(
            StageMixin, m.ParallelCustomSplitLLamaForValueRmPad):
        pass
''')

# The value PP lists the value model first: C3 still finds the pipeline API in the
# CausalLM PP class and the head in the value model.
PIPELINE_VALUE_FIRST = variant(
    PIPELINE_DIRECT,
    "(ParallelCustomSplitLLamaForCausalLMRmPadPP,\n"
    "                                               ParallelCustomSplitLLamaForValueRmPad)",
    "(ParallelCustomSplitLLamaForValueRmPad, ParallelCustomSplitLLamaForCausalLMRmPadPP)",
)

REGISTRY_PY = src('''
    import importlib

    _MODELS: dict[str, tuple[str, str, str]] = {
        "CustomSplitLLamaForCausalLM": (
            "splitllama.pipeline.ParallelCustomSplitLLamaForCausalLMRmPadPP",
            "splitllama.pipeline.ParallelCustomSplitLLamaForValueRmPadPP",
            "splitllama.model.ParallelCustomSplitLLamaForCausalLMRmPad",
        ),
    }


    class ModelRegistry:
        pass
''')

INIT_PY = "_LAZY = {\n" + "".join(
    f"    {name!r}: {module!r},\n" for name, module in
    [*rules.CLASS_MODULES.items(), ("ModelRegistry", "splitllama.registry")]) + "}\n"


def production(model: str = MODEL_PY, pipeline: str | None = PIPELINE_DIRECT,
               **extra: str) -> dict[str, str]:
    files = {"splitllama/__init__.py": INIT_PY, "splitllama/model.py": model,
             "splitllama/registry.py": REGISTRY_PY}
    if pipeline is not None:
        files["splitllama/pipeline.py"] = pipeline
    files.update({f"splitllama/{name}.py": text for name, text in extra.items()})
    return files


# The empty subclass of the earlier implementation (SPEC 4.3).
EMPTY_VALUE_PP = variant(
    PIPELINE_DIRECT,
    "(ParallelCustomSplitLLamaForCausalLMRmPadPP,\n"
    "                                               ParallelCustomSplitLLamaForValueRmPad)",
    "(ParallelCustomSplitLLamaForValueRmPad)",
)
# A CausalLM PP that returns vocab-parallel logits through its own head ...
CAUSAL_PP_OWN_HEAD = variant(
    PIPELINE_DIRECT, "        self.input_tensor = input_tensor\n",
    "        self.input_tensor = input_tensor\n\n"
    "    def _forward_head(self, hidden):\n"
    "        return hidden\n",
)


@dataclass
class Case:
    rule: str
    id: str
    files: dict[str, str]
    line: int | None = None  # expected line of the first violation
    path: str | None = None  # expected file of the first violation
    says: str = ""  # expected words in the first violation's message


def one(path: str, text: str) -> dict[str, str]:
    return {path: src(text)}


BAD: list[Case] = [
    # -- SL001 ----------------------------------------------------------------------------
    Case("SL001", "syntax-error", one("splitllama/heads.py", "x = 1\ny = = 2\nz = 3\n"),
         line=2, says="syntax error"),
    # -- SL101 ----------------------------------------------------------------------------
    Case("SL101", "pipeline-module-missing", production(pipeline=None),
         path="splitllama/pipeline.py", line=1, says="does not exist"),
    Case("SL101", "class-renamed", production(model=variant(
        MODEL_PY, "class ParallelCustomSplitLLamaModelRmPad(", "class SplitModelRmPad(")),
        path="splitllama/model.py", says="ParallelCustomSplitLLamaModelRmPad is not defined"),
    Case("SL101", "class-in-wrong-module", production(
        pipeline=variant(PIPELINE_DIRECT, "class ParallelCustomSplitLLamaForValueRmPadPP(",
                         "class Unrelated("),
        heads="class ParallelCustomSplitLLamaForValueRmPadPP:\n    pass\n"),
        says="defined in splitllama/heads.py instead"),
    Case("SL101", "class-nested-in-function", production(model=variant(
        MODEL_PY, "class ParallelCustomSplitLLamaModelRmPad(ParallelCustomSplitLLamaModel):\n"
                  "    pass\n",
        "def make():\n"
        "    class ParallelCustomSplitLLamaModelRmPad(ParallelCustomSplitLLamaModel):\n"
        "        pass\n")), says="is not defined (at top level)"),
    # -- SL102 ----------------------------------------------------------------------------
    Case("SL102", "value-defines-init", production(model=variant(
        MODEL_PY, '    """Critic: the LM head replaced by a 1 x h_hi value head."""\n',
        "    def __init__(self, config, megatron_config):\n"
        "        super().__init__(config, megatron_config)\n")),
        line=32, says="defines __init__"),
    Case("SL102", "value-defines-forward", production(model=variant(
        MODEL_PY, "        return hidden[..., 0]\n",
        "        return hidden[..., 0]\n\n"
        "    def forward(self, input_ids, attention_mask, position_ids=None):\n"
        "        return input_ids\n")), says="defines forward"),
    Case("SL102", "value-defines-attribute", production(model=variant(
        MODEL_PY, '    """Critic: the LM head replaced by a 1 x h_hi value head."""\n',
        "    sequence_parallel = False\n")), says="has a statement other than"),
    Case("SL102", "value-misses-forward-head", production(model=variant(
        MODEL_PY, "    def _forward_head(self, hidden):\n        return hidden[..., 0]\n", "")),
        says="does not define _forward_head"),
    Case("SL102", "value-not-a-causal-lm", production(model=variant(
        MODEL_PY,
        "class ParallelCustomSplitLLamaForValueRmPad(ParallelCustomSplitLLamaForCausalLMRmPad):",
        "class ParallelCustomSplitLLamaForValueRmPad(torch.nn.Module):")),
        says="must inherit directly from ParallelCustomSplitLLamaForCausalLMRmPad"),
    Case("SL102", "causal-has-no-head-methods", production(model=variant(
        MODEL_PY, "    def _init_head(self, config):\n        self.lm_head = None\n", "")),
        says="overrides nothing"),
    # -- SL103 ----------------------------------------------------------------------------
    Case("SL103", "empty-value-pp-subclass", production(pipeline=EMPTY_VALUE_PP),
         path="splitllama/pipeline.py", line=16,
         says="ParallelCustomSplitLLamaForValueRmPadPP.__init__ comes from "
              "ParallelCustomSplitLLamaForCausalLM"),
    Case("SL103", "empty-value-pp-one-line", production(pipeline=variant(
        EMPTY_VALUE_PP, "(ParallelCustomSplitLLamaForValueRmPad):\n    pass",
        "(ParallelCustomSplitLLamaForValueRmPad): pass")), says="empty subclass"),
    Case("SL103", "empty-causal-pp-subclass", production(pipeline=variant(
        PIPELINE_DIRECT, textwrap.indent(textwrap.dedent(PP_INIT), "    "), "    pass\n")),
        says="ParallelCustomSplitLLamaForCausalLMRmPadPP.__init__ comes from"),
    Case("SL103", "no-set-input-tensor", production(pipeline=variant(
        PIPELINE_DIRECT, "    def set_input_tensor(self, input_tensor):\n"
                         "        self.input_tensor = input_tensor\n", "")),
        says="set_input_tensor is not defined"),
    Case("SL103", "set-input-tensor-takes-nothing", production(pipeline=variant(
        PIPELINE_DIRECT, "set_input_tensor(self, input_tensor)", "set_input_tensor(self)")),
        says="does not take the input tensor"),
    Case("SL103", "share-defaults-true", production(pipeline=variant(
        PIPELINE_DIRECT, "share_embeddings_and_output_weights=False",
        "share_embeddings_and_output_weights=True")),
        line=8, says="does not default share_embeddings_and_output_weights to False"),
    Case("SL103", "share-parameter-missing", production(pipeline=variant(
        PIPELINE_DIRECT, ",\n                 share_embeddings_and_output_weights=False", "")),
        says="has parameters (self, config, megatron_config, pre_process, post_process)"),
    Case("SL103", "parameters-reordered", production(pipeline=variant(
        PIPELINE_DIRECT, "pre_process, post_process,", "post_process, pre_process,")),
        says="has parameters"),
    Case("SL103", "extra-required-parameter", production(pipeline=variant(
        PIPELINE_DIRECT, "share_embeddings_and_output_weights=False)",
        "share_embeddings_and_output_weights=False, *, vpp_rank)")),
        says="extra required parameters (vpp_rank)"),
    Case("SL103", "init-hides-signature", production(pipeline=variant(
        PIPELINE_MIXIN, "(self, config, megatron_config, pre_process, post_process,\n"
                        "                 share_embeddings_and_output_weights=False)",
        "(self, *args, **kwargs)")), says="has parameters (self)"),
    Case("SL103", "causal-pp-not-a-causal-lm", production(pipeline=variant(
        PIPELINE_DIRECT,
        "PP(ParallelCustomSplitLLamaForCausalLMRmPad)", "PP(object)")),
        says="does not inherit from ParallelCustomSplitLLamaForCausalLMRmPad"),
    Case("SL103", "inconsistent-mro", production(pipeline=variant(
        PIPELINE_DIRECT,
        "(ParallelCustomSplitLLamaForCausalLMRmPadPP,\n"
        "                                               ParallelCustomSplitLLamaForValueRmPad)",
        "(ParallelCustomSplitLLamaForCausalLMRmPad, ParallelCustomSplitLLamaForValueRmPad)")),
        says="no consistent method resolution order"),
    # -- SL104 ----------------------------------------------------------------------------
    Case("SL104", "value-pp-runs-lm-head", production(pipeline=CAUSAL_PP_OWN_HEAD),
         says="ParallelCustomSplitLLamaForValueRmPadPP._forward_head resolves to "
              "ParallelCustomSplitLLamaForCausalLMRmPadPP, which computes the LM head"),
    Case("SL104", "causal-pp-runs-value-head", production(pipeline=variant(
        PIPELINE_MIXIN, "PipelineMixin, model.ParallelCustomSplitLLamaForCausalLMRmPad)",
        "PipelineMixin, model.ParallelCustomSplitLLamaForValueRmPad)")),
        says="which computes the value head"),
    # -- SL201 ----------------------------------------------------------------------------
    Case("SL201", "imports-megatron", one("oracle/modeling.py", '''
        import torch
        from megatron.core import tensor_parallel
    '''), line=2, says="imports megatron.core"),
    Case("SL201", "imports-megatron-module", one("oracle/modeling.py", "import megatron.core\n"),
         line=1),
    Case("SL201", "imports-production-module", one("oracle/modeling.py", '''
        from splitllama.config import CustomSplitLlamaConfig
        from splitllama.layers import RMSNorm
    '''), line=2, says="imports splitllama.layers"),
    Case("SL201", "imports-package-alone", one("oracle/modeling.py", "import splitllama\n"),
         says="imports splitllama;"),
    Case("SL201", "imports-lazy-export", one(
        "oracle/modeling.py", "from splitllama import ModelRegistry\n"),
        says="imports splitllama.ModelRegistry"),
    Case("SL201", "imports-dynamically", one("oracle/modeling.py", '''
        import importlib


        def load():
            return importlib.import_module("splitllama.model")
    '''), line=5),
    # -- SL202 ----------------------------------------------------------------------------
    Case("SL202", "model-imports-oracle", one("splitllama/model.py", '''
        from oracle.modeling import CustomSplitLlamaForCausalLM
    '''), line=1, says="production imports the oracle"),
    Case("SL202", "lazy-import-of-oracle", one("splitllama/checkpoints.py", '''
        def compare():
            import oracle
    '''), line=2),
    Case("SL202", "parity-imports-tests", one("splitllama/parity.py", '''
        from oracle import modeling
        from tests.cases import mask_rows
    '''), line=2, says="not installed with the package"),
    # -- SL203 ----------------------------------------------------------------------------
    Case("SL203", "outside-attention-module", one("splitllama/layers.py", '''
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
    '''), line=2, says="outside the attention dispatch point"),
    Case("SL203", "unguarded", one("splitllama/attention.py", '''
        import torch
        from flash_attn.bert_padding import unpad_input
    '''), line=2, says="unguarded import of flash_attn.bert_padding"),
    Case("SL203", "guard-catches-wrong-error", one("splitllama/attention.py", '''
        try:
            import flash_attn
        except AttributeError:
            flash_attn = None
    '''), line=2),
    Case("SL203", "import-in-handler", one("splitllama/attention.py", '''
        try:
            import flash_attn_3 as flash_attn
        except ImportError:
            import flash_attn
    '''), line=4),
    Case("SL203", "unguarded-in-tests", one("tests/unit/test_attention.py", '''
        import flash_attn
    '''), line=1),
    # -- SL204 ----------------------------------------------------------------------------
    Case("SL204", "torch-distributed-attribute", one("splitllama/layers.py", '''
        import torch


        def norm(x):
            torch.distributed.all_reduce(x)
            return x
    '''), line=5, says="torch.distributed.all_reduce called in model code"),
    Case("SL204", "dist-alias", one("splitllama/model.py", '''
        import torch.distributed as dist


        def gather(out, x):
            dist.all_gather_into_tensor(out, x)
    '''), line=5, says="torch.distributed.all_gather_into_tensor"),
    Case("SL204", "from-import", one("splitllama/heads.py", '''
        from torch.distributed import all_reduce as reduce_all

        reduce_all(x)
    '''), line=3),
    Case("SL204", "from-torch-import-distributed", one("splitllama/pipeline.py", '''
        from torch import distributed

        distributed.barrier()
    '''), line=3),
    Case("SL204", "autograd-collective", one("splitllama/layers.py", '''
        import torch.distributed.nn.functional as dnn

        y = dnn.all_reduce(x)
    '''), line=3),
    Case("SL204", "oracle", one("oracle/modeling.py", '''
        import torch.distributed as dist

        dist.broadcast(x, 0)
    '''), line=3),
    # -- SL301 ----------------------------------------------------------------------------
    Case("SL301", "no-weights-only", one("splitllama/checkpoints.py", '''
        import torch

        adapter = torch.load(path)
    '''), line=3, says="torch.load without weights_only=True can execute pickled code; "
                       "pass weights_only=True or use safetensors"),
    Case("SL301", "weights-only-false", one("splitllama/assemble.py", '''
        import torch

        adapter = torch.load(path, map_location="cpu", weights_only=False)
    '''), line=3, says="with weights_only=False"),
    Case("SL301", "hidden-in-kwargs", one("oracle/modeling.py", '''
        from torch import load

        state = load(path, **options)
    '''), line=3),
    Case("SL301", "in-tests", one("tests/unit/test_checkpoints.py", '''
        import torch

        def test_x(tmp_path):
            torch.load(tmp_path / "a.pt")
    '''), line=4),
    # -- SL302 ----------------------------------------------------------------------------
    Case("SL302", "keyword", one("oracle/hf.py", '''
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    '''), line=3, says="trust_remote_code enabled"),
    Case("SL302", "dict-entry", one("splitllama/assemble.py", '''
        options = {"torch_dtype": "auto", "trust_remote_code": True}
    '''), line=1),
    Case("SL302", "variable", one("tests/unit/test_oracle.py", '''
        AutoConfig.from_pretrained(path, trust_remote_code=allow)
    '''), line=1),
    # -- SL303 ----------------------------------------------------------------------------
    Case("SL303", "library", one("splitllama/attention.py", '''
        try:
            import flash_attn
        except:
            flash_attn = None
    '''), line=3, says="bare `except:`"),
    Case("SL303", "tests", one("tests/integration/test_tp.py", '''
        def test_x():
            try:
                run()
            except:
                pass
    '''), line=4),
    # -- SL304 ----------------------------------------------------------------------------
    Case("SL304", "production", one("splitllama/checkpoints.py", '''
        def load(names):
            for name in names:
                print(f"missing tensor {name}, using random init")
    '''), line=3, says="splitllama.cli.emit"),
    Case("SL304", "oracle", one("oracle/modeling.py", "print('loaded')\n"), line=1,
         says="the oracle may not import splitllama.cli"),
    Case("SL304", "builtins-print", one("splitllama/parity.py", '''
        import builtins

        builtins.print("table")
    '''), line=3),
    # -- SL401 ----------------------------------------------------------------------------
    Case("SL401", "module-missing", production(pipeline=None), path="splitllama/registry.py",
         line=5, says="module splitllama.pipeline is missing"),
    Case("SL401", "class-missing", production(pipeline=variant(
        PIPELINE_DIRECT, "class ParallelCustomSplitLLamaForValueRmPadPP(", "class ValuePP(")),
        line=6, says="does not define class ParallelCustomSplitLLamaForValueRmPadPP"),
    Case("SL401", "only-re-exported", production(pipeline=variant(
        PIPELINE_DIRECT, "class ParallelCustomSplitLLamaForCausalLMRmPadPP(",
        "from splitllama.pp import ParallelCustomSplitLLamaForCausalLMRmPadPP\n\n\nclass X(")),
        line=5, says="does not define class ParallelCustomSplitLLamaForCausalLMRmPadPP"),
    Case("SL401", "not-a-literal", {"splitllama/registry.py": "_MODELS = build_models()\n"},
         line=1, says="not a literal dict"),
    Case("SL401", "registry-missing", {"splitllama/model.py": MODEL_PY},
         path="splitllama/registry.py", says="is missing"),
    # -- SL402 ----------------------------------------------------------------------------
    Case("SL402", "roles-swapped", {"splitllama/registry.py": variant(
        REGISTRY_PY, '"splitllama.pipeline.ParallelCustomSplitLLamaForCausalLMRmPadPP",\n'
                     '        "splitllama.pipeline.ParallelCustomSplitLLamaForValueRmPadPP",',
        '"splitllama.pipeline.ParallelCustomSplitLLamaForValueRmPadPP",\n'
        '        "splitllama.pipeline.ParallelCustomSplitLLamaForCausalLMRmPadPP",')},
        line=4, says="the trainer expects"),
    Case("SL402", "arch-missing", {"splitllama/registry.py": variant(
        REGISTRY_PY, '"CustomSplitLLamaForCausalLM"', '"CustomSplitLlamaForCausalLM"')},
        says="'CustomSplitLLamaForCausalLM' is not registered"),
    # -- SL403 ----------------------------------------------------------------------------
    Case("SL403", "module-missing", {"splitllama/__init__.py": src('''
        _LAZY = {
            "use_cpu": "splitllama.cpu_support",
        }
    ''')}, path="splitllama/__init__.py", line=2, says="splitllama.use_cpu would fail"),
    Case("SL403", "name-missing", {
        "splitllama/__init__.py": '_LAZY = {"use_cpu": "splitllama.cpu_support"}\n',
        "splitllama/cpu_support.py": "def use_gpu():\n    pass\n",
    }, line=1, says="does not define use_cpu"),
]


GOOD: list[Case] = [
    Case("SL001", "parses", one("splitllama/heads.py", "x = 1\n")),
    *(Case(rule, design, files)
      for rule in ("SL101", "SL102", "SL103", "SL104", "SL401", "SL402", "SL403")
      for design, files in (
          ("direct", production()),
          ("mixin", production(pipeline=PIPELINE_MIXIN)),
          ("mixin-elsewhere", production(pipeline=PIPELINE_MIXIN_ELSEWHERE, stages=STAGES_PY)),
          ("value-first", production(pipeline=PIPELINE_VALUE_FIRST)),
      )),
    Case("SL201", "shared-data-modules", one("oracle/modeling.py", '''
        import torch
        import splitllama.config
        from splitllama import weight_names
        from splitllama.config import CustomSplitLlamaConfig
        from splitllama.weight_names import EMBED
        from . import hf
        from .hf import register
    ''')),
    Case("SL201", "production-may-import-megatron", one(
        "splitllama/model.py", "from megatron.core import tensor_parallel\n")),
    Case("SL202", "parity-and-bench", {
        "splitllama/parity.py": "from oracle import modeling\n",
        "splitllama/bench.py": "import oracle.modeling\n",
        "splitllama/model.py": "from splitllama.config import CustomSplitLlamaConfig\n",
    }),
    Case("SL202", "tests-may-import-both", one("tests/unit/test_parity.py", '''
        import oracle
        from tests.cases import mask_rows
    ''')),
    Case("SL203", "guarded", one("splitllama/attention.py", '''
        try:
            from flash_attn import flash_attn_varlen_func
            from flash_attn.bert_padding import pad_input, unpad_input
        except ImportError:
            flash_attn_varlen_func = None
        try:
            import flash_attn
        except (OSError, ModuleNotFoundError):
            flash_attn = None


        def backend():
            import flash_attn.flash_attn_interface
            return flash_attn.flash_attn_interface
    ''')),
    Case("SL203", "tests-use-importorskip", one("tests/unit/test_attention.py", '''
        import pytest

        flash_attn = pytest.importorskip("flash_attn")


        def test_x():
            from flash_attn import flash_attn_varlen_func
    ''')),
    Case("SL204", "allowed-modules-and-megatron-mappings", {
        "splitllama/grads.py": "import torch.distributed as dist\ndist.all_reduce(g)\n",
        "splitllama/checkpoints.py": "from torch.distributed import all_gather_object\n"
                                     "all_gather_object(out, x)\n",
        "splitllama/layers.py": src('''
            import torch.distributed as dist
            from megatron.core import tensor_parallel

            rank = dist.get_rank()
            y = tensor_parallel.reduce_from_tensor_model_parallel_region(x)
            self.group.all_reduce(x)
        '''),
    }),
    Case("SL204", "tests-may-communicate", one("tests/integration/test_tp.py", '''
        import torch.distributed as dist

        dist.all_reduce(x)
    ''')),
    Case("SL301", "weights-only", one("splitllama/checkpoints.py", '''
        import json
        import torch
        from safetensors.torch import load_file

        a = torch.load(path, map_location="cpu", weights_only=True)
        b = load_file(path)
        c = json.load(f)
    ''')),
    Case("SL302", "disabled-or-absent", one("oracle/hf.py", '''
        AutoConfig.from_pretrained(path, trust_remote_code=False)
        AutoConfig.from_pretrained(path)
        options = {"trust_remote_code": False}
    ''')),
    Case("SL303", "typed-handlers", one("splitllama/checkpoints.py", '''
        try:
            run()
        except (KeyError, ValueError) as error:
            raise RuntimeError("bad checkpoint") from error
        except Exception:
            raise
    ''')),
    Case("SL304", "cli-emit-logging-and-tests", {
        "splitllama/cli.py": "def emit(text):\n    print(text)\n",
        "splitllama/parity.py": "from splitllama.cli import emit\n\nemit('table')\n",
        "oracle/modeling.py": "import logging\n\nlogging.getLogger(__name__).info('x')\n",
        "tests/unit/test_x.py": "print('debug output is fine in tests')\n",
        "splitllama/heads.py": "from splitllama.cli import emit as print\n\nprint('x')\n",
    }),
    Case("SL403", "defined-imported-or-conditional", {
        "splitllama/__init__.py": src('''
            _LAZY = {
                "use_cpu": "splitllama.cpu_support",
                "load_checkpoint": "splitllama.checkpoints",
                "Attention": "splitllama.attention",
                "ModelRegistry": "splitllama.registry",
            }
        '''),
        "splitllama/cpu_support.py": "def use_cpu():\n    pass\n",
        "splitllama/checkpoints.py": "from splitllama.io import load_checkpoint\n",
        "splitllama/attention.py": "try:\n    import x\nexcept ImportError:\n"
                                   "    Attention = None\nelse:\n    Attention = x.A\n",
        "splitllama/registry.py": "class ModelRegistry:\n    pass\n",
    }),
]


def _case_id(case: Case) -> str:
    return f"{case.rule}-{case.id}"


@pytest.mark.parametrize("case", BAD, ids=_case_id)
def test_rule_flags_violation(case: Case) -> None:
    violations = check_sources(case.rule, case.files)
    assert violations, f"{case.rule} accepted a violating snippet ({case.id})"
    assert {v.rule for v in violations} == {case.rule}
    first = violations[0] if case.path is None else next(
        (v for v in violations if v.path == case.path), None)
    assert first is not None, f"no violation in {case.path}: {violations}"
    if case.line is not None:
        assert first.line == case.line, "\n".join(map(str, violations))
    assert case.says in first.message, "\n".join(map(str, violations))


@pytest.mark.parametrize("case", GOOD, ids=_case_id)
def test_rule_accepts_compliant_code(case: Case) -> None:
    violations = check_sources(case.rule, case.files)
    assert not violations, "\n".join(map(str, violations))


def test_every_rule_has_cases() -> None:
    for rule in RULES:
        assert any(c.rule == rule.id for c in BAD), f"{rule.id} has no violating snippet"
        assert any(c.rule == rule.id for c in GOOD), f"{rule.id} has no compliant snippet"


def test_rules_have_unique_ids_names_and_purposes() -> None:
    assert len(RULES_BY_ID) == len(RULES)
    assert len({r.name for r in RULES}) == len(RULES)
    for rule in RULES:
        assert rule.id[:2] == "SL" and rule.id[2:].isdigit(), rule.id
        assert rule.purpose and "\n" not in rule.purpose, rule.id


def test_violation_names_file_line_rule_problem_and_fix() -> None:
    text = "import torch\n" + "\n" * 40 + "state = torch.load(f)\n"
    (violation,) = rules.check_source("SL301", text, path="splitllama/model.py")
    assert str(violation) == (
        "splitllama/model.py:42: [SL301 torch-load-weights-only] torch.load without "
        "weights_only=True can execute pickled code; pass weights_only=True or use safetensors"
    )


def _write(root, files: dict[str, str]) -> None:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


def test_cli_reports_violations_and_exit_code(tmp_path, capsys) -> None:
    _write(tmp_path, {"splitllama/cli.py": "print('ok')\n",
                      "splitllama/checkpoints.py": "x = 1\nprint('missing tensor')\n"})
    assert rules.main([str(tmp_path / "splitllama")], root=tmp_path) == 1
    out = capsys.readouterr().out
    assert "splitllama/checkpoints.py:2: [SL304 no-print-in-library]" in out
    assert "cli.py" not in out
    assert rules.main([str(tmp_path / "splitllama/cli.py")], root=tmp_path) == 0


def test_cli_without_paths_runs_project_rules(tmp_path, capsys) -> None:
    _write(tmp_path, production())
    assert rules.main([], root=tmp_path) == 0
    (tmp_path / "splitllama/pipeline.py").write_text(EMPTY_VALUE_PP)
    assert rules.main([], root=tmp_path) == 1
    assert "[SL103 pp-pipeline-api]" in capsys.readouterr().out


def test_cli_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "tests.static.rules", "--list"], check=False,
                            cwd=rules.REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == [r.id for r in RULES]
