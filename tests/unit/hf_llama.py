"""Random tiny Hugging Face Llama checkpoints, HF reference models and random oracles for
the unit tests.

Weights are drawn with a large std (0.15) and norm weights around 1 (not exactly 1), so
that attention, rotary positions and every norm visibly change the logits: a planted bug
such as swapped rotary halves or swapped norms moves logits by O(1), far beyond the
tolerances of the tests.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from oracle import CustomSplitLLamaForCausalLM
from splitllama.checkpoint.assemble import assemble_split_checkpoint
from splitllama.config import CustomSplitLlamaConfig, llama_preset

WEIGHT_STD = 0.15
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def tiny_llama_config(rope: str = "llama3", **overrides) -> LlamaConfig:
    """The tiny 8B-shaped Llama (hidden 64, 8 heads, 2 KV heads, head_dim 8) with the
    Llama-3.1 ``llama3`` rope scaling, or default rope when ``rope="default"``."""
    if rope == "default":
        overrides.setdefault("rope_parameters", dict(DEFAULT_ROPE))
    elif rope != "llama3":
        raise ValueError(f"rope={rope!r} (allowed: 'llama3', 'default')")
    return llama_preset("tiny-llama3.1-8b", **overrides)


def randomize_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Matrices normal(0, 0.15), norm weights 1 + normal(0, 0.2), drawn in float64 in
    parameter order (the same values whatever the model dtype)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(WEIGHT_STD * noise)
    return model.eval()


def random_llama(config: LlamaConfig, seed: int, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    """An HF ``LlamaForCausalLM`` with random weights (``randomize_weights``)."""
    return randomize_weights(LlamaForCausalLM(config).to(dtype), seed)


def random_oracle(config: CustomSplitLlamaConfig, seed: int,
                  dtype: torch.dtype = torch.float64) -> CustomSplitLLamaForCausalLM:
    """An oracle CausalLM with random weights (``randomize_weights``), eager attention (the
    reference)."""
    return randomize_weights(CustomSplitLLamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").to(dtype),
                             seed)


def save_llama(model: LlamaForCausalLM, directory: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return directory


def stacked_llama(lower: LlamaForCausalLM, upper: LlamaForCausalLM, num_lower: int,
                  num_upper: int) -> LlamaForCausalLM:
    """The HF Llama a split model of these two checkpoints (identity adapter) must equal:
    ``lower``'s embedding and first N layers, then ``upper``'s last M layers, norm and head.
    Both must share layer shapes and rope settings (one HF Llama has one of each)."""
    upper_config = upper.config
    config = LlamaConfig(**{**upper_config.to_dict(), "num_hidden_layers": num_lower + num_upper})
    model = LlamaForCausalLM(config).to(upper.dtype).eval()
    offset = upper_config.num_hidden_layers - num_upper
    with torch.no_grad():
        model.model.embed_tokens.load_state_dict(lower.model.embed_tokens.state_dict())
        for i in range(num_lower):
            model.model.layers[i].load_state_dict(lower.model.layers[i].state_dict())
        for j in range(num_upper):
            model.model.layers[num_lower + j].load_state_dict(upper.model.layers[offset + j].state_dict())
        model.model.norm.load_state_dict(upper.model.norm.state_dict())
        model.lm_head.load_state_dict(upper.lm_head.state_dict())
    return model


def assembled_oracle(lower_dir: Path, upper_dir: Path, num_lower: int, num_upper: int, out_dir: Path,
                     dtype: torch.dtype = torch.float64, **kwargs) -> CustomSplitLLamaForCausalLM:
    """Assemble a split checkpoint (identity adapter unless given) and load the oracle."""
    kwargs.setdefault("adapter", "identity")
    assemble_split_checkpoint(lower_dir, upper_dir, num_lower, num_upper, out_dir, progress=False, **kwargs)
    return CustomSplitLLamaForCausalLM.from_pretrained(out_dir, dtype=dtype, attn_implementation="eager").eval()


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: what the split model uses by default. HF Llama
    counts padding in its default positions, so it is always given these explicitly."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
