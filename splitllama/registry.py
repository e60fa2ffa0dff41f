"""The model registry entry, shaped like the RL trainer's (veRL) Megatron registry.

``_MODELS`` maps a Hugging Face architecture name to fully qualified class names of
(CausalLM with pipeline support, value model with pipeline support, CausalLM without).

verl 0.9.1 no longer calls such a registry: its Megatron engine builds models through a
bridge, ``splitllama.bridge`` (docs/verl.md). This entry serves trainers written against
the older registry.
"""

from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str, str]] = {
    "CustomSplitLLamaForCausalLM": (
        "splitllama.pipeline.ParallelCustomSplitLLamaForCausalLMRmPadPP",
        "splitllama.pipeline.ParallelCustomSplitLLamaForValueRmPadPP",
        "splitllama.model.ParallelCustomSplitLLamaForCausalLMRmPad",
    ),
}


def _resolve(qualified_name: str) -> type:
    module_name, _, class_name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


class ModelRegistry:
    @staticmethod
    def load_model_cls(model_arch: str, value: bool = False) -> type | None:
        """The pipeline-capable CausalLM class (``value=False``) or value class
        (``value=True``) for ``model_arch``; None for an architecture not served here."""
        entry = _MODELS.get(model_arch)
        if entry is None:
            return None
        return _resolve(entry[1] if value else entry[0])

    @staticmethod
    def get_supported_archs() -> list[str]:
        return list(_MODELS)
