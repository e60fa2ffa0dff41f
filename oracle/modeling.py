"""The reference Custom Split LLaMA: padded, unoptimised, written out plainly.

Every tensor is ``[batch, seq, ...]`` with padding in place; nothing is packed, fused or
cached beyond transformers' ``DynamicCache``. The math (RMSNorm, SwiGLU, rotary positions,
GQA attention with an explicit boolean mask) is written here from scratch and shares no
code with the production package: only the data modules ``splitllama.config`` and
``splitllama.weight_names`` are imported. The module tree reproduces the split checkpoint
names of ``splitllama.weight_names`` exactly, so ``from_pretrained`` / ``save_pretrained``
read and write split checkpoints as they are.

Precision: runs in float64 or float32 (CPU) and bfloat16 (CUDA). Norms and softmax run in
at least float32 (float64 for a float64 model); rotary angles are always computed in
float64 and then cast to the compute dtype.

Hugging Face behaviour (docs/huggingface.md): sdpa attention is the default, as in
Hugging Face models; eager is the reference (what the verification harness asks for);
both, and gradient checkpointing, compute the same math. ``labels`` give the shifted cross-entropy; forward reads ``use_cache``,
``output_*`` and ``return_dict`` defaults from the config; ``hidden_states`` has
``num_hidden_layers + 1 = N + M + 1`` entries.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from splitllama import weight_names
from splitllama.config import CustomSplitLlamaConfig, rope_parameters

logger = logging.getLogger(__name__)

# transformers 5.24 renamed the cache argument and output field `past_key_values` to
# `cache` (5.17, on the GPU machines, still says `past_key_values`). Both spellings are
# accepted as forward arguments (the old one with transformers' deprecation warning where
# it is deprecated); outputs use the field this transformers version has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _with_cache(output_cls: type, cache: Cache | None, **fields: Any):
    return output_cls(**fields, **{CACHE_FIELD: cache})


def _cache_argument(forward):
    """Where transformers calls the cache ``cache``, ``past_key_values`` is taken with its own
    deprecation warning, as its Llama's forward does (the same decorator and version)."""
    if CACHE_FIELD != "cache":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


# Attention implementations: "eager" (the reference) and "sdpa" (transformers' default)
# (torch.nn.functional.scaled_dot_product_attention on the same boolean mask).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def unsupported_attention(name: str) -> str:
    """transformers' refusal of an attention implementation (PreTrainedModel.
    get_correct_attn_implementation), for the two this model has."""
    return (f'Specified `attn_implementation="{name}"` is not supported. The only possible arguments are '
            '`attn_implementation="eager"`, `"attn_implementation=sdpa"`.')
# Keyword arguments CausalLM.forward takes beyond its named ones: those of the loss
# (transformers' Trainer passes num_items_in_batch). Anything else is refused, so that
# e.g. packed-sequence arguments (cu_seq_lens_*) are never silently ignored.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: float64 for float64 models, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear(in_features: int, out_features: int, init_std: float) -> nn.Linear:
    """A bias-free linear layer that remembers the std ``_init_weights`` draws it with."""
    layer = nn.Linear(in_features, out_features, bias=False)
    layer.init_std = init_std
    return layer


# ---- building blocks -----------------------------------------------------------------------


class OracleRMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 (float64 for float64
    input) and cast back before the weight multiplies, as Hugging Face Llama does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(_wide_dtype(x.dtype))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class OracleMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, ``[B, S, h] -> [B, S, ffn] -> [B, S, h]``."""

    def __init__(self, sub: LlamaConfig) -> None:
        super().__init__()
        std = sub.initializer_range
        self.gate_proj = _linear(sub.hidden_size, sub.intermediate_size, std)
        self.up_proj = _linear(sub.hidden_size, sub.intermediate_size, std)
        self.down_proj = _linear(sub.intermediate_size, sub.hidden_size, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inverse_frequencies(sub: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim / 2]`` (float32, as transformers and megatron define
    them) and the cos/sin scaling factor of one Llama stack's rope settings."""
    params = rope_parameters(sub)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        # transformers keeps the default rope inside each model file, not in
        # modeling_rope_utils; this is the same formula (LlamaRotaryEmbedding).
        dim = sub.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type={rope_type!r} is not supported (allowed: 'default', 'llama3')")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](sub, None)
    return inv_freq, float(scaling)


def rotary_cos_sin(sub: LlamaConfig, position_ids: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[B, S, head_dim]`` for integer positions ``[B, S]``.

    The angles ``position * inv_freq`` and their cos/sin are computed in float64 (exact
    positions, no float32 rounding of large angles) and only then cast to ``dtype``."""
    inv_freq, scaling = rope_inverse_frequencies(sub)
    inv_freq = inv_freq.to(device=position_ids.device, dtype=torch.float64)
    angles = position_ids.to(torch.float64)[..., None] * inv_freq  # [B, S, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, S, head_dim], HF's half-split layout
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, S, d]`` by ``cos``/``sin [B, S, d]``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class OracleAttention(nn.Module):
    """Multi-head attention with grouped K/V heads and an explicit boolean mask."""

    def __init__(self, sub: LlamaConfig, cache_layer: int) -> None:
        super().__init__()
        # The sub-config, read at call time for its attention implementation (transformers
        # sets `_attn_implementation` on the declared sub-configs).
        self.config = sub
        self.num_heads = sub.num_attention_heads
        self.num_kv_heads = sub.num_key_value_heads
        self.head_dim = sub.head_dim
        self.cache_layer = cache_layer
        std = sub.initializer_range
        self.q_proj = _linear(sub.hidden_size, self.num_heads * self.head_dim, std)
        self.k_proj = _linear(sub.hidden_size, self.num_kv_heads * self.head_dim, std)
        self.v_proj = _linear(sub.hidden_size, self.num_kv_heads * self.head_dim, std)
        self.o_proj = _linear(self.num_heads * self.head_dim, sub.hidden_size, std)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, count, self.head_dim).transpose(1, 2)  # [B, count, S, d]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, cache: Cache | None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, Q, h]``; ``allowed [B, 1, Q, K]`` (K = cached + new keys) says which key
        each query may attend. Returns the output ``[B, Q, h]`` and, when asked (computed
        the eager way whatever the implementation), the attention probabilities ``[B, H, Q, K]``."""
        implementation = self.config._attn_implementation or "eager"
        if implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(unsupported_attention(implementation))
        if output_attentions:
            # the probabilities exist on the eager path only: it runs for this call, as
            # Hugging Face models fall back to eager when attentions are asked for
            implementation = "eager"
        batch, q_len, _ = x.shape
        q = apply_rotary(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rotary(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_layer)  # [B, kv_heads, K, d]
        if k.shape[2] > allowed.shape[-1]:
            # A static cache returns all its max_cache_len slots; those past the cached and
            # new tokens hold nothing and are never attended.
            allowed = nn.functional.pad(allowed, (0, k.shape[2] - allowed.shape[-1]), value=False)
        assert k.shape[2] == allowed.shape[-1], (k.shape, allowed.shape)
        # GQA: query head i reads K/V head i // group (Hugging Face's repeat_kv order).
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        if implementation == "sdpa":
            return self._sdpa(q, k, v, allowed), None

        wide = _wide_dtype(x.dtype)
        scores = (q @ k.transpose(-1, -2)).to(wide) * self.head_dim ** -0.5  # [B, H, Q, K]
        # A query with no key to attend (padding before a row's first token, empty rows)
        # gets an all-zero attention output instead of softmax([-inf, ...]) = NaN.
        has_key = allowed.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1) * allowed
        out = probs.to(x.dtype) @ v  # [B, H, Q, d]
        out = self.o_proj(out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim))
        return out, (probs.to(x.dtype) if output_attentions else None)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              allowed: torch.Tensor) -> torch.Tensor:
        """The same attention through ``scaled_dot_product_attention``: same scale, same
        boolean mask; a query with no key to attend gets the same all-zero output (it
        attends every key, finitely, and is then zeroed)."""
        batch, _, q_len, _ = q.shape
        has_key = allowed.any(dim=-1, keepdim=True)  # [B, 1, Q, 1]
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed | ~has_key, scale=self.head_dim ** -0.5
        )
        out = out * has_key.to(out.dtype)  # [B, H, Q, d]
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim))


class OracleDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm Llama layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Under gradient checkpointing (transformers' GradientCheckpointingLayer) ``x`` must stay
    positional: a reentrant checkpoint only propagates gradients of positional inputs."""

    def __init__(self, sub: LlamaConfig, cache_layer: int) -> None:
        super().__init__()
        self.input_layernorm = OracleRMSNorm(sub.hidden_size, sub.rms_norm_eps)
        self.self_attn = OracleAttention(sub, cache_layer)
        self.post_attention_layernorm = OracleRMSNorm(sub.hidden_size, sub.rms_norm_eps)
        self.mlp = OracleMLP(sub)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, cache: Cache | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, probs = self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache, output_attentions)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), probs


# ---- masks and positions -------------------------------------------------------------------


def attention_allowed(key_valid: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """``[B, 1, Q, K]`` bool: query q may attend key k iff k is a valid token of the same row
    and ``k <= query_index[q]`` (causal by sequence index, padding anywhere).

    ``key_valid [B, K]`` marks the valid keys (cached and new); ``query_index [Q]`` is each
    query's own index among those K keys."""
    key_index = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = key_index[None, :] <= query_index[:, None]  # [Q, K]
    return (key_valid[:, None, :] & causal[None])[:, None]


def default_position_ids(key_valid: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0, over the FULL mask (cached + new tokens), read
    at the queries' columns: ``[B, Q]``."""
    positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, query_index]


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the KV cache once: as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _default(value: bool | None, config: CustomSplitLlamaConfig, field: str) -> bool:
    """A forward flag, or the config's default for it when not passed."""
    return bool(getattr(config, field)) if value is None else bool(value)


def _refuse_unknown(kwargs: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{where} got unsupported arguments {unknown} (allowed extra arguments: "
                         f"{list(allowed)}); the oracle never ignores an argument silently")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face's causal-LM loss (``ForCausalLMLoss``): position t predicts label t+1,
    ``ignore_index`` labels count for nothing, the mean over counted tokens, or the sum
    divided by ``num_items_in_batch`` when given (transformers' ``fixed_cross_entropy``).
    ``ForCausalLMLoss`` itself casts the logits to float32, which would round a float64
    model's logits; here they keep their dtype (float32, or float64)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return fixed_cross_entropy(
        logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
        num_items_in_batch, ignore_index,
    )


# ---- Hugging Face models -------------------------------------------------------------------


class CustomSplitLLamaPreTrainedModel(PreTrainedModel):
    """Shared Hugging Face plumbing: config class, weight init, strict loading, the
    attention implementations (sdpa by default, as transformers chooses; eager on request)."""

    config_class = CustomSplitLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["OracleDecoderLayer"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # forward is captured as one graph by torch.compile(fullgraph=True), StaticCache
    # included (prefill and decode; tests/unit/test_hf_conventions.py): transformers'
    # tests read this flag as "supports the static cache"
    _can_compile_fullgraph = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # Head tensors of a full checkpoint that this class may drop when loading it (the trunk
    # drops them); they are still named in an error when something else is wrong.
    _droppable_on_load: tuple[str, ...] = ()

    def get_correct_attn_implementation(self, requested_attention: str | None,
                                        is_init_check: bool = False) -> str:
        """transformers' choice (sdpa unless another implementation is asked for; the
        verification harness asks for eager, the reference), refusing what this class
        does not have."""
        # flash and flex attention: transformers' own refusal (this class does not declare
        # them); any other name but eager and sdpa (unknown, paged, kernels from the Hub) in
        # transformers' words, listing the two this class has
        if requested_attention is not None and requested_attention not in ATTN_IMPLEMENTATIONS \
                and not requested_attention.startswith(("flash_attention", "flex_attention")):
            raise ValueError(unsupported_attention(requested_attention))
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from the module source (an `*Attention(nn.Module)` class must
        # call its AttentionInterface); the oracle reads `_attn_implementation` from its
        # sub-configs at every call, so set_attn_implementation takes effect.
        return True

    def _init_weights(self, module: nn.Module) -> None:
        # normal(0, std) with std = the initializer_range of the sub-config the module belongs
        # to (attached as `init_std` when it was built); ones for RMSNorm weights. Modules
        # made by resize_token_embeddings carry no `init_std`: the embedding is the lower
        # stack's, the LM head the upper stack's.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            fallback = (self.config.lower if isinstance(module, nn.Embedding) else self.config.upper).initializer_range
            init.normal_(module.weight, mean=0.0, std=getattr(module, "init_std", fallback))
        elif isinstance(module, OracleRMSNorm):
            init.ones_(module.weight)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        fresh_value_head: bool = False, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that refuses any missing, unexpected or
        mis-shaped tensor (ValueError naming them) instead of leaving random weights.

        ``fresh_value_head=True`` (value model only) loads a CausalLM checkpoint: its
        ``lm_head.weight`` is dropped and ``score.weight`` is freshly initialised."""
        if fresh_value_head and not issubclass(cls, CustomSplitLLamaForTokenClassification):
            raise ValueError(
                f"fresh_value_head=True is only for CustomSplitLLamaForTokenClassification, "
                f"not {cls.__name__}"
            )
        return_info = kwargs.pop("output_loading_info", False)
        # Mis-shaped tensors are refused below, by name, whatever the caller passed here:
        # transformers' own refusal names them only in a log table, not in the exception.
        kwargs.pop("ignore_mismatched_sizes", None)
        # transformers logs a table of missing / unexpected tensors; here those are either
        # asked for (fresh_value_head, the heads a trunk drops) or refused below by name,
        # so the table is shown only when transformers itself fails after it.
        held = _HeldRecords(lambda record: "LOAD REPORT" in record.getMessage())
        report_logger = logging.getLogger("transformers.modeling_utils")
        report_logger.addFilter(held)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True,
                ignore_mismatched_sizes=True, **kwargs
            )
        except Exception:
            held.release(report_logger)
            raise
        finally:
            report_logger.removeFilter(held)
        _check_loading_info(cls, pretrained_model_name_or_path, info, fresh_value_head)
        return (model, info) if return_info else model


class _HeldRecords(logging.Filter):
    """Holds back the log records ``matches`` selects; ``release`` logs them after all."""

    def __init__(self, matches) -> None:
        super().__init__()
        self.matches, self.records = matches, []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.matches(record):
            self.records.append(record)
            return False
        return True

    def release(self, target: logging.Logger) -> None:
        target.removeFilter(self)
        for record in self.records:
            target.handle(record)


def _check_loading_info(cls: type, source: Any, info: dict, fresh_value_head: bool) -> None:
    missing = set(info.get("missing_keys", ()))
    unexpected = set(info.get("unexpected_keys", ())) - set(cls._droppable_on_load)
    mismatched = [f"{name} (checkpoint {tuple(got)}, model {tuple(want)})"
                  for name, got, want in info.get("mismatched_keys", ())]
    if fresh_value_head:
        if weight_names.VALUE_HEAD not in missing:
            raise ValueError(
                f"fresh_value_head=True, but {source} already holds {weight_names.VALUE_HEAD}: "
                "drop fresh_value_head to load it"
            )
        missing.discard(weight_names.VALUE_HEAD)
        unexpected.discard(weight_names.LM_HEAD)
        logger.info("%s: %s freshly initialised (fresh_value_head=True)", source, weight_names.VALUE_HEAD)
    problems = []
    if missing:
        hint = ""
        if missing == {weight_names.VALUE_HEAD}:
            hint = " (to start a value model from a CausalLM checkpoint pass fresh_value_head=True)"
        problems.append(f"missing tensors {sorted(missing)}{hint}")
    if unexpected:
        problems.append(f"unexpected tensors {sorted(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped tensors {sorted(mismatched)}")
    errors = list(info.get("error_msgs", ()))
    if errors:
        problems.append(f"load errors {errors}")
    if problems:
        raise ValueError(f"{cls.__name__}.from_pretrained({source!s}): " + "; ".join(problems))


class CustomSplitLLamaModel(CustomSplitLLamaPreTrainedModel):
    """The trunk: embedding -> N lower layers -> adapter -> M upper layers -> final norm.

    Returns the final hidden states ``[B, S, h_hi]``. Lower layers are KV-cache layers
    ``0..N-1``, upper layers ``N..N+M-1``."""

    _droppable_on_load = (weight_names.LM_HEAD, weight_names.VALUE_HEAD)

    def __init__(self, config: CustomSplitLlamaConfig) -> None:
        super().__init__(config)
        config.check_split()
        lower, upper = config.lower, config.upper
        for sub in (lower, upper):
            # transformers resolves the default implementation on the top config only; the
            # stacks read theirs from the sub-configs (None would mean eager too).
            if sub._attn_implementation is None:
                sub._attn_implementation = config._attn_implementation
        self.embed_tokens = nn.Embedding(config.vocab_size, lower.hidden_size)
        self.embed_tokens.init_std = lower.initializer_range
        self.layers_first = nn.ModuleList(
            [OracleDecoderLayer(lower, cache_layer=i) for i in range(config.num_lower)]
        )
        if config.mlp:
            self.adapter_linear_1 = _linear(lower.hidden_size, upper.hidden_size, upper.initializer_range)
            self.adapter_linear_2 = _linear(upper.hidden_size, upper.hidden_size, upper.initializer_range)
        else:
            self.adapter = _linear(lower.hidden_size, upper.hidden_size, upper.initializer_range)
        self.layers_last = nn.ModuleList(
            [OracleDecoderLayer(upper, cache_layer=config.num_lower + j) for j in range(config.num_upper)]
        )
        self.norm = OracleRMSNorm(upper.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, h_lo] -> [B, S, h_hi]``: one linear, or linear -> ReLU -> linear."""
        if self.config.mlp:
            return self.adapter_linear_2(torch.relu(self.adapter_linear_1(x)))
        return self.adapter(x)

    @_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        cache: Cache | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """``attention_mask [B, K]`` (1 = valid; None = all valid) covers the cached AND the
        new tokens, K = cached + S. ``position_ids [B, S]`` default to ``cumsum(mask) - 1``
        clamped at 0. ``cache_position [S]`` (default: the last S of the K columns) is each
        new token's column. Flags left at None take the config's defaults (``use_cache``,
        ``output_attentions``, ``output_hidden_states``, ``return_dict``).

        ``hidden_states`` (when asked) follows Hugging Face: ``num_hidden_layers + 1 =
        N + M + 1`` tensors, the embeddings then each decoder layer's output (lower layers,
        then upper layers), the last one after the final norm. The adapter's output is not
        one of them (it is the first upper layer's input; a forward hook on the adapter
        reads it). ``attentions``: ``[B, H, S, K]`` per decoder layer (computed the eager way)."""
        use_cache = _default(use_cache, self.config, "use_cache")
        output_attentions = _default(output_attentions, self.config, "output_attentions")
        output_hidden_states = _default(output_hidden_states, self.config, "output_hidden_states")
        return_dict = _default(return_dict, self.config, "return_dict")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, q_len = hidden.shape[:2]
        device = hidden.device

        cache = _one_cache(past_key_values, cache)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() \
                and (use_cache or cache is not None):
            # The backward pass re-runs each layer, which would write its keys twice.
            logger.warning("gradient checkpointing: the KV cache is not used in training (use_cache=False)")
            use_cache, cache = False, None
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            past = int(past)  # a static cache counts in a tensor
            key_valid = torch.ones(batch, past + q_len, dtype=torch.bool, device=device)
        else:
            key_valid = attention_mask.to(device=device, dtype=torch.bool)
            # Under torch.compile the mask's width says how many tokens are cached: reading
            # a static cache's count (a tensor in some transformers versions) would be a
            # data-dependent branch, which a full-graph capture refuses.
            if not torch.compiler.is_compiling():
                past = int(past)
                if key_valid.shape != (batch, past + q_len):
                    raise ValueError(
                        f"attention_mask has shape {tuple(key_valid.shape)}; expected "
                        f"({batch}, {past + q_len}) = (batch, cached {past} + new {q_len} tokens)"
                    )
            past = key_valid.shape[1] - q_len
        if cache_position is None:
            cache_position = torch.arange(past, past + q_len, device=device)
        if position_ids is None:
            position_ids = default_position_ids(key_valid, cache_position)
        position_ids = position_ids.to(device).expand(batch, q_len)
        allowed = attention_allowed(key_valid, cache_position)

        states, attentions = [hidden], []
        cos, sin = rotary_cos_sin(self.config.lower, position_ids, hidden.dtype)
        for layer in self.layers_first:
            hidden, probs = layer(hidden, cos, sin, allowed, cache=cache, output_attentions=output_attentions)
            states.append(hidden)
            attentions.append(probs)
        hidden = self._adapt(hidden)
        cos, sin = rotary_cos_sin(self.config.upper, position_ids, hidden.dtype)
        for layer in self.layers_last:
            hidden, probs = layer(hidden, cos, sin, allowed, cache=cache, output_attentions=output_attentions)
            states.append(hidden)
            attentions.append(probs)
        hidden = self.norm(hidden)
        states[-1] = hidden  # Hugging Face's convention: the last state is after the final norm

        output = _with_cache(
            BaseModelOutputWithPast, cache, last_hidden_state=hidden,
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


def _logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits are float32, or float64 for a float64 model."""
    return _wide_dtype(dtype)


class CustomSplitLLamaForCausalLM(CustomSplitLLamaPreTrainedModel, GenerationMixin):
    """Trunk + ``lm_head`` ``[V, h_hi]`` (not tied to the embedding)."""

    # transformers' Trainer passes num_items_in_batch to forward (see LOSS_KWARGS).
    accepts_loss_kwargs = True

    def __init__(self, config: CustomSplitLlamaConfig) -> None:
        super().__init__(config)
        self.model = CustomSplitLLamaModel(config)
        self.lm_head = _linear(config.h_hi, config.vocab_size, config.upper.initializer_range)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **loss_kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``[B, S, V]`` (float32; float64 for a float64 model) at every position;
        those at padding positions are meaningless. ``logits_to_keep``: an int k keeps the
        last k positions (0 = all), a tensor the positions it lists. ``labels [B, S]``: the
        loss is ``causal_lm_loss`` (shifted cross-entropy, -100 ignored), given
        ``num_items_in_batch`` / ``ignore_index`` / ``shift_labels`` as keyword arguments.
        Other arguments as ``CustomSplitLLamaModel``."""
        _refuse_unknown(loss_kwargs, LOSS_KWARGS, f"{type(self).__name__}.forward")
        return_dict = _default(return_dict, self.config, "return_dict")
        trunk = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, cache_position=cache_position,
            cache=_one_cache(past_key_values, cache),
        )
        hidden = trunk.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden).to(_logits_dtype(hidden.dtype))
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.vocab_size, **loss_kwargs)
        output = _with_cache(
            CausalLMOutputWithPast, getattr(trunk, CACHE_FIELD), loss=loss, logits=logits,
            hidden_states=trunk.hidden_states, attentions=trunk.attentions,
        )
        return output if return_dict else output.to_tuple()

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None,
                                  **kwargs: Any) -> torch.Tensor | None:
        """``generate`` turns the 2D padding mask into a 4D mask of transformers' own format
        when the cache is static; forward takes the 2D mask (cached + new tokens) and builds
        its boolean mask itself, static cache included, so the 2D mask is kept."""
        return attention_mask


class CustomSplitLLamaForTokenClassification(CustomSplitLLamaPreTrainedModel):
    """The value (critic) model: trunk + ``score`` ``[1, h_hi]``; one value per token."""

    def __init__(self, config: CustomSplitLlamaConfig) -> None:
        if config.num_labels != 1:
            raise ValueError(
                f"num_labels={config.num_labels}: the value model has one output per token "
                "(allowed: num_labels=1; pass num_labels=1 to from_pretrained or the config)"
            )
        super().__init__(config)
        self.num_labels = 1
        self.model = CustomSplitLLamaModel(config)
        self.score = _linear(config.h_hi, 1, config.upper.initializer_range)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TokenClassifierOutput | tuple:
        """Values ``[B, S, 1]`` (float32; float64 for a float64 model). ``labels [B, S]``
        (target values, any real numbers): the loss is ``value_regression_loss``, the mean
        squared error over the positions ``attention_mask`` marks valid (transformers'
        regression convention for one output). ``output_attentions``,
        ``output_hidden_states`` and ``return_dict`` as on the CausalLM; no KV cache (the
        value of every token is computed at once)."""
        return_dict = _default(return_dict, self.config, "return_dict")
        trunk = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=False, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden = trunk.last_hidden_state
        values = self.score(hidden).to(_logits_dtype(hidden.dtype))
        loss = None if labels is None else value_regression_loss(values, labels, attention_mask)
        output = TokenClassifierOutput(loss=loss, logits=values, hidden_states=trunk.hidden_states,
                                       attentions=trunk.attentions)
        return output if return_dict else output.to_tuple()


def value_regression_loss(values: torch.Tensor, labels: torch.Tensor,
                          attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(values[..., 0] - labels)^2`` over the valid positions of
    ``attention_mask [B, S]`` (all positions when it is None), in the values' dtype."""
    values = values[..., 0]
    if labels.shape != values.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(values.shape)} = (batch, "
                         "sequence), one target value per token")
    squared = (values - labels.to(device=values.device, dtype=values.dtype)) ** 2
    if attention_mask is None:
        return squared.mean()
    valid = attention_mask.to(device=values.device, dtype=torch.bool)
    return squared[valid].sum() / valid.sum().clamp(min=1)
