"""The reference Custom Split LLaMA as Hugging Face models (see ``oracle.modeling``).

Importing this package registers the models with the Auto classes for
``model_type: custom_split_llama`` (the config is registered by ``splitllama.config``):
``AutoModel`` -> trunk, ``AutoModelForCausalLM`` -> CausalLM,
``AutoModelForTokenClassification`` -> value model.
"""

from __future__ import annotations

from transformers import AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

from oracle.modeling import (
    CustomSplitLLamaForCausalLM,
    CustomSplitLLamaForTokenClassification,
    CustomSplitLLamaModel,
    CustomSplitLLamaPreTrainedModel,
)
from splitllama.config import CustomSplitLlamaConfig

AutoModel.register(CustomSplitLlamaConfig, CustomSplitLLamaModel, exist_ok=True)
AutoModelForCausalLM.register(CustomSplitLlamaConfig, CustomSplitLLamaForCausalLM, exist_ok=True)
AutoModelForTokenClassification.register(
    CustomSplitLlamaConfig, CustomSplitLLamaForTokenClassification, exist_ok=True
)

__all__ = [
    "CustomSplitLLamaForCausalLM",
    "CustomSplitLLamaForTokenClassification",
    "CustomSplitLLamaModel",
    "CustomSplitLLamaPreTrainedModel",
]
