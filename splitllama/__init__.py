"""splitllama: a Custom Split LLaMA (Llama-3-8B lower layers + adapter + Llama-3-70B upper
layers) for Megatron-core, with tensor, sequence and pipeline parallelism and packed inputs.

Reading path (each file says what is inside):

1. ``config.py``        the split config, its validation, named shape presets
   ``parallel_sizes.py`` the rules parallel sizes obey (standard library only)
   ``options.py``       ModelOptions: recompute, log-prob path, vocabulary padding; one
                        frozen object every entry point takes
   ``weight_names.py``  names and shapes of a split checkpoint's tensors
   ``layout.py``        ParallelLayout (the one owner of the pipeline split), TP
                        requirements, vocabulary padding, the stage placement function
   ``megatron_configs.py`` megatron's configurations, made in one place
2. ``elementwise.py``   the compiled element-wise pieces: RMSNorm, SwiGLU, rotary rotation
   ``attention.py``     the ONE attention dispatch point (rotary, then torch varlen /
                        FlexAttention / SDPA; flash-attn when forced), planned once per batch
   ``layers.py``        RMSNorm, SwiGLU, rotary positions, megatron layer spec and block, the adapter
3. ``batches.py``       the batch record, the model's one input, made once at the edge
   ``model.py``         the production model classes: trunk(batch), head, restore
4. ``heads.py``         LM head and value head: the one head contract
   ``logprobs.py``      vocab-parallel log-probs and entropy (never gather the vocabulary)
   ``pipeline.py``      pipeline-parallel classes, a rank's chunks, the schedule runner
5. ``checkpoint/``     everything about checkpoints (its ``__init__`` lists the modules):
                        the sharding declaration, safetensors I/O, directory checks, assembly
                        of a split checkpoint from two Llama checkpoints, split checkpoints
                        (sharded load, gathered save, export), megatron distributed
                        checkpoints (the models' sharded_state_dict)
   ``registry.py``      the older trainer registry's entry; ``bridge.py`` verl's (mbridge)
``distributed.py`` sets up process groups and megatron's parallel state for a layout;
``cpu_support.py`` runs megatron-core on CPU (gloo); ``grads.py`` wraps chunks in megatron's
DDP and all-reduces the gradients of weights replicated over the SP region for plain
modules; ``bench.py`` times the model on GPUs (its workload and FLOP model in
``bench_workload.py``, its report in ``bench_report.py``); ``cli.py`` is the
``splitllama`` command (the only module that prints). ``verify/`` is the verification
machinery behind ``splitllama check`` and the tests (the built-in tiny model included); no
product module imports it at module level: only ``cli.py``'s ``check`` command does,
inside that command's function, so importing the package never loads it.

Heavy modules (megatron) are imported lazily, so ``splitllama.config`` stays light.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__version__ = "0.1.0"

# megatron-core's notices about itself, which a user of this package cannot act on: that it
# falls back to plain torch kernels without Transformer Engine or Apex (four of them when
# it is imported) and that a default it sets itself (cuda_graph_scope) is deprecated. Only
# warnings issued by megatron's own modules are filtered, so library calls are as quiet as
# the command line.
for _notice in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_notice, module="megatron")

_LAZY = {
    "CustomSplitLlamaConfig": "splitllama.config",
    "ParallelLayout": "splitllama.layout",
    "ModelOptions": "splitllama.options",
    "use_cpu": "splitllama.cpu_support",
    "init_distributed": "splitllama.distributed",
    "setup_parallel": "splitllama.distributed",
    "megatron_config": "splitllama.megatron_configs",
    "shutdown": "splitllama.distributed",
    "read_split_config": "splitllama.checkpoint.directory",
    "validate_checkpoint_dir": "splitllama.checkpoint.directory",
    "load_checkpoint": "splitllama.checkpoint.split",
    "save_checkpoint": "splitllama.checkpoint.split",
    "assemble_split_checkpoint": "splitllama.checkpoint.assemble",
    "ModelRegistry": "splitllama.registry",
    "ParallelCustomSplitLLamaModel": "splitllama.model",
    "ParallelCustomSplitLLamaForCausalLM": "splitllama.model",
    "ParallelCustomSplitLLamaModelRmPad": "splitllama.model",
    "ParallelCustomSplitLLamaForCausalLMRmPad": "splitllama.model",
    "ParallelCustomSplitLLamaForValueRmPad": "splitllama.model",
    "ParallelCustomSplitLLamaForCausalLMRmPadPP": "splitllama.pipeline",
    "ParallelCustomSplitLLamaForValueRmPadPP": "splitllama.pipeline",
    "vocab_parallel_log_probs": "splitllama.logprobs",
    "vocab_parallel_entropy": "splitllama.logprobs",
    "fused_log_probs_entropy": "splitllama.logprobs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splitllama' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
