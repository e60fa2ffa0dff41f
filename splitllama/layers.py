"""Building blocks of the production model, on megatron-core.

* ``RMSNorm``: Llama's norm, usable under sequence parallelism (its weight is marked
  ``sequence_parallel`` so its gradient gets all-reduced over TP, see ``grads.py``);
* ``SwiGLU``: the MLP's activation, one compiled kernel each way;
* ``layer_spec``: megatron's local layer spec with ``RMSNorm``, ``SwiGLU`` and the ONE
  attention dispatch point (``attention.SplitCoreAttention``) in the ``core_attention`` slot;
* ``decoder_stack``: megatron's ``TransformerBlock`` over the layers of one stack that a
  pipeline stage holds (so megatron's activation recompute applies, ``megatron_configs.RECOMPUTE``);
* ``RotaryPositions``: per-token rotary angles (and their cos/sin) from position ids
  (inverse frequencies from the stack's rope settings by transformers' rope functions,
  llama3 scaling included);
* ``Adapter``: ``h_lo -> h_hi``, one projection (``mlp=false``) or linear-ReLU-linear.

Tensor layout is megatron's ``[seq, batch, hidden]``; packed sequences are a batch of one
(``[T, 1, hidden]``), and under sequence parallelism each TP rank holds ``T / tp`` rows.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from splitllama import elementwise
from splitllama.attention import SplitCoreAttention
from splitllama.config import SUPPORTED_ROPE_TYPES, rope_parameters


def param_device(config: ModelParallelConfig) -> torch.device:
    if config.use_cpu_initialization:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class RMSNorm(torch.nn.Module):
    """Llama RMSNorm (normalise in >= float32, cast back, scale), SP-capable.

    Megatron builds it as ``RMSNorm(config=..., hidden_size=..., eps=...)``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=param_device(config))
        )
        # Under SP each rank normalises different tokens, so the gradient is partial.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elementwise.rms_norm(x, self.weight, self.eps)


class SwiGLU(torch.nn.Module):
    """``silu(gate) * up`` of fc1's output ``[S, B, 2 ffn/tp]`` (gate first, as megatron's
    fc1 lays it out per TP rank) -> ``[S, B, ffn/tp]``, in megatron's MLP
    ``activation_func`` slot; one kernel each way (``elementwise.swiglu``), and only fc1's
    output is kept for backward. Megatron's own fused SwiGLU (``bias_activation_fusion``)
    does the same math, but compiled with one shape policy for both stacks, which made its
    kernels slow here (see elementwise.py)."""

    def __init__(self, config: TransformerConfig | None = None):  # megatron passes its config
        super().__init__()

    def forward(self, fc1_SBF: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(fc1_SBF)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fc1):
        ctx.save_for_backward(fc1)
        return elementwise.swiglu(fc1)

    @staticmethod
    def backward(ctx, grad_out):
        (fc1,) = ctx.saved_tensors
        return elementwise.swiglu_back(grad_out, fc1)


def layer_spec() -> ModuleSpec:
    """Megatron's local GPT layer spec with Llama's norm, SwiGLU and our attention dispatch."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=tensor_parallel.ColumnParallelLinear,
                    core_attention=SplitCoreAttention,
                    linear_proj=tensor_parallel.RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=tensor_parallel.ColumnParallelLinear,
                    activation_func=SwiGLU,
                    linear_fc2=tensor_parallel.RowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_stack(config: TransformerConfig, count: int, last_layer_kept: bool = False) -> TransformerBlock:
    """``count`` consecutive layers of one Llama stack as a megatron ``TransformerBlock``
    (no final norm: the split model's final norm follows the upper stack only). Its
    ``layers[k]`` is the stage's k-th layer of that stack; ``checkpoint/sharding.py`` maps it to its
    checkpoint index.

    ``last_layer_kept``: under full recompute, keep the last layer's activations instead
    of recomputing it (megatron's ``block`` method over the others). For the model's last
    layer when each micro-batch's backward follows its forward at once (the stage with
    the head, no interleaved pipeline): backward starts by recomputing that layer anyway,
    so holding its activations through the head saves its forward and leaves the peak
    about where that layer's own backward puts it."""
    fields = {"num_layers": count}
    if last_layer_kept and config.recompute_granularity == "full":
        if count > 1:  # megatron's block method: the first count - 1 layers recomputed
            fields.update(recompute_method="block", recompute_num_layers=count - 1)
        else:
            fields.update(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    spec = TransformerBlockSubmodules(layer_specs=[layer_spec()] * count, layer_norm=None)
    config = dataclasses.replace(config, **fields)
    return TransformerBlock(config=config, spec=spec, post_layer_norm=False, pre_process=True, post_process=False)


class RotaryPositions(torch.nn.Module):
    """Rotary angles for explicit position ids (caller-given or default), per token.

    The inverse frequencies are those of transformers for the stack's own rope settings
    (theta, and for llama3 the factor, low/high frequency factors and original context
    length, whatever their values): the default rope from ``LlamaRotaryEmbedding`` (which
    transformers keeps in the model file), the others from ``ROPE_INIT_FUNCTIONS``."""

    def __init__(self, sub: LlamaConfig, config: TransformerConfig):
        super().__init__()
        rope_type = rope_parameters(sub).get("rope_type", "default")
        if rope_type == "default":
            inv_freq, attention_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(sub)
        elif rope_type in SUPPORTED_ROPE_TYPES:
            inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](sub, None)
        else:
            raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported "
                             f"(allowed: {list(SUPPORTED_ROPE_TYPES)})")
        # Megatron's rotary application scales cos/sin by nothing; both supported types
        # leave them unscaled (transformers returns attention_factor 1.0 for them).
        if float(attention_factor) != 1.0:
            raise ValueError(f"rope_type={rope_type!r} scales cos/sin by {attention_factor}, "
                             "which this model does not apply")
        # float32, as transformers defines them; widened only when forming angles
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)

    def cos_sin(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, S]`` positions -> cos and sin of ``forward``'s angles, ``[S, B, 1, head_dim]``
        each, in the angles' dtype (``elementwise.rotate`` rounds once, to the activations')."""
        angles = self(position_ids_BS, dtype)
        return angles.cos(), angles.sin()

    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, S]`` positions -> angles ``[S, B, 1, head_dim]``.

        Angles are formed in float64 for float32/float64 compute: in float32 an angle near
        position 4096 is off by up to 2.4e-4 rad, which would dominate a float64 check.
        Half-precision compute takes float32 angles (far below bf16 resolution)."""
        angle_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
        inv_freq = self.inv_freq.to(position_ids_BS.device, angle_dtype)
        freqs = position_ids_BS.to(angle_dtype)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.transpose(0, 1)[:, :, None, :]


class Adapter(torch.nn.Module):
    """``h_lo -> h_hi``: ONE bias-free projection (``mlp=false``, as Hugging Face applies)
    or linear -> ReLU -> linear (``mlp=true``), tensor-parallel.

    Linear: column-parallel over ``h_hi``; without SP the output is gathered over the
    hidden dim, with SP it is exchanged (all-to-all) back to sequence shards.
    MLP: column-parallel then row-parallel, megatron's MLP pattern."""

    def __init__(self, config: TransformerConfig, h_lo: int, h_hi: int, mlp: bool):
        super().__init__()
        self.mlp = mlp
        self.sequence_parallel = config.sequence_parallel
        common = dict(config=config, init_method=config.init_method, bias=False)
        if mlp:
            self.linear_1 = tensor_parallel.ColumnParallelLinear(h_lo, h_hi, gather_output=False, **common)
            self.linear_2 = tensor_parallel.RowParallelLinear(
                h_hi, h_hi, input_is_parallel=True, skip_bias_add=True,
                init_method=config.output_layer_init_method, config=config, bias=False,
            )
        else:
            self.proj = tensor_parallel.ColumnParallelLinear(
                h_lo, h_hi, gather_output=not self.sequence_parallel, **common
            )

    def forward(self, hidden_SBH: torch.Tensor) -> torch.Tensor:
        if self.mlp:
            inner, _ = self.linear_1(hidden_SBH)
            out, _ = self.linear_2(F.relu(inner))
            return out
        out, _ = self.proj(hidden_SBH)
        if self.sequence_parallel:
            seq, batch = out.shape[0], out.shape[1]
            # [T, B, h_hi/tp] -> [T/tp, B, h_hi]
            out = tensor_parallel.all_to_all_hp2sp(out)
            tp = parallel_state.get_tensor_model_parallel_world_size()
            out = out.reshape(seq // tp, batch, -1)
        return out
