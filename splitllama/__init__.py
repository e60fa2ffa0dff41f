"""splitllama: a Custom Split LLaMA (Llama-3-8B lower layers + adapter + Llama-3-70B upper
layers) for Megatron-core, with tensor, sequence and pipeline parallelism and packed inputs.

Reading path (each file says what is inside):

1. ``config.py``        the split config, its validation, named shape presets
   ``weight_names.py``  names and shapes of a split checkpoint's tensors
   ``layout.py``        TP requirements and the pipeline stage layout function
2. ``attention.py``     the ONE attention dispatch point (flash-attn / torch varlen /
                        FlexAttention / SDPA) and the packing helpers it needs
   ``layers.py``        RMSNorm, rotary positions, megatron layer spec, the adapter
3. ``model.py``         the production model classes (padded and packed)
4. ``heads.py``         vocab-parallel LM head, replicated value head
   ``logprobs.py``      vocab-parallel log-probs and entropy (never gather the vocabulary)
   ``pipeline.py``      pipeline-parallel classes and the schedule runner
5. ``sharding.py``      how every weight is sharded (declared once)
   ``checkpoints.py``   sharded load / gathered save of split checkpoints
   ``assemble.py``      build a split checkpoint from two Llama checkpoints
   ``registry.py``      the RL trainer's model registry entry
``cpu_support.py`` runs megatron-core on CPU (gloo); ``grads.py`` all-reduces the gradients
of weights replicated over the SP region; ``parity.py`` compares production with the
oracle (``adapter_ties.py``: the bf16 rule at the adapter's ReLU); ``bench.py`` times it
on GPUs; ``cli.py`` is the ``splitllama`` command.

Heavy modules (megatron) are imported lazily, so ``splitllama.config`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CustomSplitLlamaConfig": "splitllama.config",
    "use_cpu": "splitllama.cpu_support",
    "load_checkpoint": "splitllama.checkpoints",
    "save_checkpoint": "splitllama.checkpoints",
    "assemble_split_checkpoint": "splitllama.assemble",
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
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splitllama' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
