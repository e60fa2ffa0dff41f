"""Tensor names and shapes of a split checkpoint (Hugging Face layout, safetensors).

Data shared by the oracle, the assembler, the loader/saver and the tests. No math here.
"""

from __future__ import annotations

from typing import Literal

from transformers import LlamaConfig

from splitllama.config import CustomSplitLlamaConfig

Head = Literal["lm", "value"]
HEADS: tuple[str, ...] = ("lm", "value")

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
VALUE_HEAD = "score.weight"
ADAPTER_LINEAR = "model.adapter.weight"
ADAPTER_MLP_1 = "model.adapter_linear_1.weight"
ADAPTER_MLP_2 = "model.adapter_linear_2.weight"

LOWER_PREFIX = "model.layers_first"
UPPER_PREFIX = "model.layers_last"
# A plain Hugging Face Llama checkpoint names its layers like this.
LLAMA_LAYER_PREFIX = "model.layers"

# Suffixes of one HF Llama decoder layer, in a fixed order.
LAYER_SUFFIXES: tuple[str, ...] = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def lower_layer(i: int, suffix: str) -> str:
    return f"{LOWER_PREFIX}.{i}.{suffix}"


def upper_layer(j: int, suffix: str) -> str:
    return f"{UPPER_PREFIX}.{j}.{suffix}"


def llama_layer(index: int, suffix: str) -> str:
    return f"{LLAMA_LAYER_PREFIX}.{index}.{suffix}"


def head_name(head: Head) -> str:
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not one of {HEADS}")
    return LM_HEAD if head == "lm" else VALUE_HEAD


def layer_shapes(sub: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each tensor of one decoder layer, keyed by suffix."""
    h, d, ffn = sub.hidden_size, sub.head_dim, sub.intermediate_size
    q, kv = sub.num_attention_heads * d, sub.num_key_value_heads * d
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }


def adapter_shapes(config: CustomSplitLlamaConfig) -> dict[str, tuple[int, ...]]:
    if config.mlp:
        return {ADAPTER_MLP_1: (config.h_hi, config.h_lo), ADAPTER_MLP_2: (config.h_hi, config.h_hi)}
    return {ADAPTER_LINEAR: (config.h_hi, config.h_lo)}


def split_checkpoint_shapes(config: CustomSplitLlamaConfig, head: Head = "lm") -> dict[str, tuple[int, ...]]:
    """Every tensor a split checkpoint with this head must hold, in model order."""
    shapes: dict[str, tuple[int, ...]] = {EMBED: (config.vocab_size, config.h_lo)}
    lower, upper = layer_shapes(config.lower), layer_shapes(config.upper)
    for i in range(config.num_lower):
        shapes.update({lower_layer(i, s): shape for s, shape in lower.items()})
    shapes.update(adapter_shapes(config))
    for j in range(config.num_upper):
        shapes.update({upper_layer(j, s): shape for s, shape in upper.items()})
    shapes[FINAL_NORM] = (config.h_hi,)
    shapes[head_name(head)] = (config.vocab_size, config.h_hi) if head == "lm" else (1, config.h_hi)
    return shapes
