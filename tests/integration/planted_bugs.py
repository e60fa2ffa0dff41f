"""Planted bugs: each equivalence check must FAIL when one of these is applied.

The first five are defects of the earlier implementation or public bugs of the same
family (docs/verification.md); the others guard the pipeline, log-prob and saving code. Each bug is a
monkeypatch of production code (production itself carries no bug switches) plus the check
that must catch it and the layouts where the bug can show. ``test_planted_bugs.py`` runs
``PLANTED`` in the gate; run them alone with ``pytest tests/integration -k planted`` (and under
``torchrun --nproc-per-node 2`` / ``4`` for the layouts that need more processes).
``ROLLOUT_PLANTED`` (the RL loop's data path: the trainer, the export and the rollout
engine, which is the oracle) runs in ``test_rollout.py``, beside the checks it must fail.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from collections.abc import Callable

import torch
from megatron.core import tensor_parallel

from splitllama import batches, heads, layers, layout as layout_module, logprobs, model
from splitllama.checkpoint import sharding
from splitllama.config import CustomSplitLlamaConfig, rope_parameters
from splitllama.verify.tiny import tiny_split_config
from splitllama.options import ModelOptions


@dataclass(frozen=True)
class PlantedBug:
    name: str
    why: str
    layouts: tuple[str, ...]  # names in tests/integration/layouts.LAYOUTS
    plant: Callable  # (monkeypatch) -> None
    head: str = "lm"
    mlp: bool = False
    config: Callable[[], CustomSplitLlamaConfig] | None = None
    check: str = "parity"  # or a kind of test_planted_bugs.CHECKS
    options: ModelOptions = ModelOptions()  # the production model's (recompute, log-prob path)
    padded: bool = False  # parity of the padded ParallelCustomSplitLLamaForCausalLM
    # the attention backend the bug lives in: its cases run only where the dispatch point
    # chooses that backend (flash-attn 4: Hopper GPUs with the package)
    backend: str | None = None


def _two_projection_adapter(mp):
    forward = layers.Adapter.forward

    def two_projections(self, hidden):
        out = forward(self, hidden)
        gen = torch.Generator().manual_seed(0)
        width = out.shape[-1]
        second = torch.eye(width, dtype=torch.float64) + 0.05 * torch.randn(width, width, generator=gen, dtype=torch.float64)
        return out @ second.to(out.device, out.dtype).T

    mp.setattr(layers.Adapter, "forward", two_projections)


def _adapter_gelu(mp):
    def gelu_between(self, hidden):
        inner, _ = self.linear_1(hidden)
        out, _ = self.linear_2(torch.nn.functional.gelu(inner))
        return out

    mp.setattr(layers.Adapter, "forward", gelu_between)


def _weight_left_unmarked(mp, cls):
    """``cls``'s weight built without its ``sequence_parallel`` mark: no TP all-reduce of
    its partial gradient under SP."""
    init = cls.__init__

    def unmarked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.weight.sequence_parallel = False

    mp.setattr(cls, "__init__", unmarked)


def _sp_norm_grads_not_reduced(mp):
    _weight_left_unmarked(mp, layers.RMSNorm)


def _qkv_concatenated(mp):
    fuse, unfuse = sharding.fuse, sharding.unfuse

    def plain_fuse(spec, pieces, tp=1):
        return torch.cat(pieces, 0) if isinstance(spec.sharding, sharding.FusedQKV) else fuse(spec, pieces, tp)

    def plain_unfuse(spec, local):
        if not isinstance(spec.sharding, sharding.FusedQKV):
            return unfuse(spec, local)
        q_rows = local.shape[0] * spec.sharding.heads // (spec.sharding.heads + 2 * spec.sharding.groups)
        kv_rows = (local.shape[0] - q_rows) // 2
        return list(local.split([q_rows, kv_rows, kv_rows], 0))

    mp.setattr(sharding, "fuse", plain_fuse)
    mp.setattr(sharding, "unfuse", plain_unfuse)
    # checkpoint/split.py imported the names directly
    from splitllama.checkpoint import split as split_checkpoint

    mp.setattr(split_checkpoint, "fuse", plain_fuse)


def _value_head_gathered_twice(mp):
    def gathered_twice(self, hidden, request=batches.OUTPUTS):
        values = torch.nn.Linear.forward(self, hidden)
        if self.sequence_parallel:
            values = tensor_parallel.gather_from_sequence_parallel_region(values, tensor_parallel_output_grad=False)
            values = tensor_parallel.gather_from_sequence_parallel_region(values, tensor_parallel_output_grad=False)
        return values[..., 0].to(heads.output_dtype(values.dtype))

    mp.setattr(heads.ValueHead, "forward", gathered_twice)


def _temperature_not_in_entropy(mp):
    token_scores = heads.LMHead.token_scores

    def entropy_at_temperature_one(self, hidden, request):
        scaled = token_scores(self, hidden, request)
        unscaled = token_scores(self, hidden, dataclasses.replace(request, temperature=None))
        return torch.stack([scaled[..., 0], unscaled[..., 1]], dim=-1)

    mp.setattr(heads.LMHead, "token_scores", entropy_at_temperature_one)


def _thd_temperature_dropped(mp):
    thd_batch = batches.thd_batch

    def at_temperature_one(*args, **kwargs):
        return thd_batch(*args, **{**kwargs, "temperature": None})

    mp.setattr(batches, "thd_batch", at_temperature_one)


def _position_ids_ignored(mp):
    pack = batches.pack_batch

    def ignoring(input_ids, attention_mask, position_ids, labels, **kwargs):
        return pack(input_ids, attention_mask, None, labels, **kwargs)

    mp.setattr(batches, "pack_batch", ignoring)


def _stage_boundary_drops_adapter(mp):
    stage_layouts = layout_module.stage_layouts

    def dropping(config, pp=1, vpp=None, layers_per_stage=None):
        out = stage_layouts(config, pp, vpp, layers_per_stage)
        return [
            s if not (s.has_adapter and s.virtual_stage > 0 and len(s.lower_layers) == 0)
            else layout_module.StageLayout(**{**s.__dict__, "has_adapter": False})
            for s in out
        ]

    mp.setattr(layout_module, "stage_layouts", dropping)


def _upper_layer_misoffset(mp):
    weight_specs = sharding.weight_specs
    upper = re.compile(r"model\.layers_last\.(\d+)\.")

    def misoffset(config, stage, head, padded_vocab=None):
        # a stage's upper layers numbered from 0 instead of from its first global index
        start = stage.upper_layers.start
        return [
            sharding.WeightSpec(s.param, tuple(upper.sub(lambda m: f"model.layers_last.{int(m.group(1)) - start}.", n)
                                         for n in s.names), s.sharding)
            for s in weight_specs(config, stage, head, padded_vocab)
        ]

    from splitllama.checkpoint import split as split_checkpoint

    mp.setattr(split_checkpoint, "weight_specs", misoffset)


def _gate_up_saved_without_stride(mp):
    unshard = sharding.unshard

    def plain(spec, locals_by_rank):
        # ranks' [gate_r; up_r] joined as if [gate; up] were split plainly over TP
        if isinstance(spec.sharding, sharding.FusedGateUp):
            return list(torch.cat(locals_by_rank, 0).chunk(2, 0))
        return unshard(spec, locals_by_rank)

    from splitllama.checkpoint import split as split_checkpoint

    mp.setattr(sharding, "unshard", plain)
    mp.setattr(split_checkpoint, "unshard", plain)


def _logsumexp_without_max(mp):
    def naive(logits_local, vocab_size=None):
        logits = logits_local.to(torch.promote_types(logits_local.dtype, torch.float32))
        total = tensor_parallel.reduce_from_tensor_model_parallel_region(logits.exp().sum(dim=-1))
        return logits, total.log(), logits

    mp.setattr(logprobs, "_logsumexp", naive)


def _fused_stats_not_exchanged(mp):
    # each rank's log-sum-exp, entropy and label logit from its own vocabulary shard only
    mp.setattr(logprobs, "_gather_stats", lambda stats, group: stats[None])


def _fused_blocks_merged_without_rescale(mp):
    def unscaled(stats):
        m, s, t, label = stats.unbind(1)
        return torch.stack([m.amax(0), s.sum(0), t.sum(0), label.sum(0)])

    mp.setattr(logprobs, "_merge_stats", unscaled)


def _fused_kept_probs_unnormalised(mp):
    # backward takes the kept exp(l - m) as the probability: normalised by the tile's max,
    # never by the log-sum-exp
    kept_grad = logprobs._tile_grad_kept

    def unnormalised(kept, label_col, m, lse, *rest):
        return kept_grad(kept, label_col, m, m, *rest)

    mp.setattr(logprobs, "_tile_grad_kept", unnormalised)


def _fused_label_offset_dropped(mp):
    mp.setattr(logprobs, "_label_columns", lambda labels, first_row: labels)


def _recompute_detaches_input(mp):
    from megatron.core import tensor_parallel as tp

    checkpoint = tp.random.checkpoint

    def detached(function, distribute_saved_activations, hidden, *args):
        # the recomputed region's input gradient is lost: nothing below it learns
        return checkpoint(function, distribute_saved_activations, hidden.detach(), *args)

    mp.setattr(tp, "checkpoint", detached)


def _swiglu_gate_derivative_dropped(mp):
    from splitllama import elementwise

    def without_gate_derivative(grad_out, fc1):
        # d silu(a)/da taken as sigmoid(a): right forward, wrong gate gradient
        gate, up = torch.chunk(fc1, 2, -1)
        return torch.cat((grad_out * torch.sigmoid(gate) * up, grad_out * torch.nn.functional.silu(gate)), -1)

    mp.setattr(elementwise, "swiglu_back", without_gate_derivative)


def _rotary_pairs_interleaved(mp):
    from splitllama import elementwise

    def interleaved(x, cos, sin):
        # GPT-J's pairing (dims 2i, 2i+1) with Llama's half-split cos/sin layout
        wide = x.to(torch.promote_types(x.dtype, cos.dtype))
        rotated = torch.stack((-wide[..., 1::2], wide[..., ::2]), -1).flatten(-2)
        return (wide * cos + rotated * sin).to(x.dtype)

    mp.setattr(elementwise, "rotate", interleaved)


def _padded_attention_ignores_padding(mp):
    def causal_only(mask_BS):
        seq = mask_BS.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=mask_BS.device).tril()
        return causal[None, None].expand(mask_BS.shape[0], 1, seq, seq)

    # batches.py imported the name
    mp.setattr(batches, "plan_padded", causal_only)


def _flash_attn_4_groups_swapped(mp):
    from splitllama import attention

    flash_attn_4 = attention._BACKEND_FNS["flash_attn_4"]

    def swapped(q, k, v, plan, scale):
        # K/V groups handed over in reverse order: query heads read another group's keys
        return flash_attn_4(q, k.flip(1), v.flip(1), plan, scale)

    mp.setitem(attention._BACKEND_FNS, "flash_attn_4", swapped)


def _flash_attn_4_sp_tail_joined(mp):
    import dataclasses

    from splitllama import attention

    flash_attn_4 = attention._BACKEND_FNS["flash_attn_4"]

    def joined(q, k, v, plan, scale):
        # the last boundary dropped: the SP-padding tail attends into the last document
        cu = torch.cat([plan.cu_seqlens_q[:-2], plan.cu_seqlens_q[-1:]])
        plan = dataclasses.replace(plan, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=q.shape[0],
                                   max_seqlen_kv=q.shape[0])
        return flash_attn_4(q, k, v, plan, scale)

    mp.setitem(attention._BACKEND_FNS, "flash_attn_4", joined)


def _after_trunk_init(mp, change):
    """Patch the trunk (every class's, pipeline stages included) to apply ``change(trunk,
    config)`` after its own constructor."""
    init = model.ParallelCustomSplitLLamaModel.__init__

    def patched(self, config, megatron_config, layout, *args, **kwargs):
        init(self, config, megatron_config, layout, *args, **kwargs)
        change(self, config)

    mp.setattr(model.ParallelCustomSplitLLamaModel, "__init__", patched)


def _rotary_with(sub, stack_config, **rope):
    sub = copy.deepcopy(sub)
    sub.rope_parameters = rope
    return layers.RotaryPositions(sub, stack_config)


def _lower_rope_theta_from_upper(mp):
    def change(trunk, config):
        if trunk.rotary_lower is not None:
            trunk.rotary_lower = _rotary_with(config.lower, trunk.lower_config, **{
                **config.lower.rope_parameters, "rope_theta": config.upper.rope_parameters["rope_theta"]})

    _after_trunk_init(mp, change)


def _upper_rope_scaling_from_lower(mp):
    def change(trunk, config):
        if trunk.rotary_upper is not None:  # the lower's rope type (default), the upper's theta
            trunk.rotary_upper = _rotary_with(config.upper, trunk.upper_config, **{
                **config.lower.rope_parameters, "rope_theta": config.upper.rope_parameters["rope_theta"]})

    _after_trunk_init(mp, change)


def _upper_norm_eps_from_lower(mp):
    def change(trunk, config):
        for module in trunk.upper.modules() if trunk.upper is not None else ():
            if isinstance(module, layers.RMSNorm):
                module.eps = config.lower.rms_norm_eps

    _after_trunk_init(mp, change)


def _final_norm_eps_from_upper(mp):
    def change(trunk, config):
        if trunk.norm is not None:
            trunk.norm.eps = config.upper.rms_norm_eps

    _after_trunk_init(mp, change)


def _loader_skips_eps(mp):
    from splitllama.checkpoint import directory

    mp.setattr(directory, "_SUB_FIELDS", tuple(f for f in directory._SUB_FIELDS if f != "rms_norm_eps"))


def _input_range_check_removed(mp):
    mp.setattr(batches, "_check_range", lambda name, low, high, vocab: None)


def _fused_head_input_grad_not_reduced(mp):
    # the wired head hands the fused op its input without megatron's TP marking: under SP
    # gathered with a backward that takes this rank's slice of a PARTIAL gradient (no
    # reduce-scatter), without SP not all-reduced; each rank's trunk then learns only
    # from its own vocabulary shard
    def unreduced(hidden, sequence_parallel):
        if sequence_parallel:
            return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden

    mp.setattr(heads, "lm_head_input", unreduced)


def _fused_head_vocab_start_zero(mp):
    fused = heads.fused_log_probs_entropy

    def every_rank_first(*args, **kwargs):
        return fused(*args, **{**kwargs, "vocab_start": 0})

    mp.setattr(heads, "fused_log_probs_entropy", every_rank_first)


def _fused_head_not_given_main_grad(mp):
    # the head's weight gradient returned in bf16 and added by DDP's hook: every
    # micro-batch's float32 sum rounded to 16 bits once more
    fused = heads.fused_log_probs_entropy

    def returning(*args, grad_weight_into=None, **kwargs):
        return fused(*args, **kwargs)

    mp.setattr(heads, "fused_log_probs_entropy", returning)


def _fused_head_weight_grad_written(mp):
    backward = logprobs._FusedLogProbsEntropy.backward

    def writing(ctx, *grads):
        if ctx.grad_weight_into is not None:
            ctx.grad_weight_into.zero_()  # earlier micro-batches' gradient overwritten
        return backward(ctx, *grads)

    mp.setattr(logprobs._FusedLogProbsEntropy, "backward", staticmethod(writing))


def _value_head_unmarked(mp):
    _weight_left_unmarked(mp, heads.ValueHead)


def _microbatch_gradient_dropped(mp):
    from megatron.core.distributed import DistributedDataParallel

    forward = DistributedDataParallel.forward
    seen: dict[int, int] = {}

    def zeroing(self, *args, **kwargs):
        # the gradient buffers cleared inside the accumulation loop: the first
        # micro-batch's gradient is lost
        if torch.is_grad_enabled():
            seen[id(self)] = seen.get(id(self), 0) + 1
            if seen[id(self)] == 2:
                self.zero_grad_buffer()
        return forward(self, *args, **kwargs)

    mp.setattr(DistributedDataParallel, "forward", zeroing)


def _tensor_parallel_weights_unmarked(mp):
    # as megatron leaves them when it does not initialise the weights: its gradient norm
    # then takes TP-split weights for replicas and counts only rank 0's shards
    mp.setattr(model, "mark_tensor_parallel", lambda module, specs: None)


def _rope_band_factors_swapped(stack: str):
    """llama3 rope's low and high frequency factors swapped in production's rotary of one
    stack (``stack``: "lower", "upper" or "both"; told apart by the rope-bands test
    configuration's rope theta); the oracle and transformers keep them."""
    from tests.integration.test_rope_bands import LOWER_ROPE, UPPER_ROPE

    thetas = {"lower": {LOWER_ROPE["rope_theta"]}, "upper": {UPPER_ROPE["rope_theta"]},
              "both": {LOWER_ROPE["rope_theta"], UPPER_ROPE["rope_theta"]}}[stack]

    def plant(mp):
        original = layers.ROPE_INIT_FUNCTIONS["llama3"]

        def swapped(config, device=None, *args, **kwargs):
            rope = rope_parameters(config)
            if rope.get("rope_theta") in thetas:
                config = copy.deepcopy(config)
                config.rope_parameters = {**rope, "low_freq_factor": rope["high_freq_factor"],
                                          "high_freq_factor": rope["low_freq_factor"]}
            return original(config, device, *args, **kwargs)

        # layers' own reference to the table: the oracle's (transformers') is untouched
        mp.setattr(layers, "ROPE_INIT_FUNCTIONS", {**layers.ROPE_INIT_FUNCTIONS, "llama3": swapped})

    return plant


def equal_width_config() -> CustomSplitLlamaConfig:
    """h_lo == h_hi, so a stage that skips the adapter still runs (and must be caught by
    its numbers, not by a shape error)."""
    return tiny_split_config(lower=dict(hidden_size=128, num_attention_heads=16,
                                        num_key_value_heads=4, intermediate_size=448))


def head_dim_128_config() -> CustomSplitLlamaConfig:
    """The tiny model with the Llama-3 head dim (128), the one flash-attn 4 is given: 4 query
    heads in 2 K/V groups in each stack."""
    heads = dict(hidden_size=512, head_dim=128, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=1024)
    return tiny_split_config(lower=heads, upper=heads)


def _padded_vocab_not_masked(mp):
    from splitllama import heads, logprobs

    def everything_valid(width, vocab_size, device):
        return None

    mp.setattr(logprobs, "valid_vocab_columns", everything_valid)
    mp.setattr(heads, "valid_vocab_columns", everything_valid)


def _fused_head_counts_padded_rows(mp):
    fused = heads.fused_log_probs_entropy

    def all_rows(*args, vocab_size=None, **kwargs):
        return fused(*args, **kwargs)  # every row of the padded shard taken as vocabulary

    mp.setattr(heads, "fused_log_probs_entropy", all_rows)


def _padded_vocab_saved(mp):
    unshard = sharding.unshard

    def keeping_padding(spec, locals_by_rank):
        if isinstance(spec.sharding, sharding.VocabSplit):
            return [torch.cat(locals_by_rank, 0)]
        return unshard(spec, locals_by_rank)

    from splitllama.checkpoint import split as split_checkpoint

    mp.setattr(split_checkpoint, "unshard", keeping_padding)


def _tp_weight_declared_replicated(mp):
    from megatron.core.transformer.utils import make_sharded_tensor_for_checkpoint

    from splitllama.checkpoint import megatron_dist

    sharded_weight = megatron_dist._sharded_weight

    def replicated(spec, param, *args):
        if spec.param.endswith("linear_proj.weight"):
            # megatron's default for a module without a sharded_state_dict of its own: the
            # local block declared as the whole tensor, replicated over TP
            return make_sharded_tensor_for_checkpoint(param, spec.names[0])
        return sharded_weight(spec, param, *args)

    mp.setattr(megatron_dist, "_sharded_weight", replicated)


def _fused_weight_block_copied(mp):
    """The gate/up blocks of ``linear_fc1`` handed to megatron as copies: a load into them
    leaves the parameter at its init unless the caller loads the returned state dict."""
    from splitllama.checkpoint import megatron_dist

    local_blocks = sharding.local_blocks

    def copied(spec, local, *args):
        blocks = local_blocks(spec, local, *args)
        if isinstance(spec.sharding, sharding.FusedGateUp):
            return [(name, view.clone(), index) for name, view, index in blocks]
        return blocks

    mp.setattr(megatron_dist, "local_blocks", copied)


def _layers_numbered_per_stage(weight_specs):
    """``weight_specs`` with every stage's layers named from 0 in each stack (as the
    modules' own paths are) instead of from the stage's first global layer index."""
    layer = re.compile(r"model\.(layers_first|layers_last)\.(\d+)\.")

    def stage_local(config, stage, head, padded_vocab=None):
        starts = {"layers_first": stage.lower_layers.start, "layers_last": stage.upper_layers.start}

        def renumber(m):
            return f"model.{m.group(1)}.{int(m.group(2)) - starts[m.group(1)]}."

        return [sharding.WeightSpec(s.param, tuple(layer.sub(renumber, n) for n in s.names), s.sharding)
                for s in weight_specs(config, stage, head, padded_vocab)]

    return stage_local


def _dist_layer_offset_dropped(mp):
    from splitllama.checkpoint import megatron_dist

    mp.setattr(megatron_dist, "weight_specs", _layers_numbered_per_stage(sharding.weight_specs))


def _export_layer_offset_dropped(mp):
    # the checkpoint names a rollout engine loads; the loader then reads the same wrong
    # names, so only the exported names show it
    from splitllama.checkpoint import split as split_checkpoint

    mp.setattr(split_checkpoint, "weight_specs", _layers_numbered_per_stage(split_checkpoint.weight_specs))


def _export_skips_stage(mp):
    from megatron.core import parallel_state

    from splitllama.checkpoint import split as split_checkpoint

    listing = split_checkpoint._stage_listing

    def first_stage_only(chunks):
        return listing(chunks) if parallel_state.get_pipeline_model_parallel_rank() == 0 else []

    mp.setattr(split_checkpoint, "_stage_listing", first_stage_only)


def _padded_vocab_minus_inf(mp):
    mp.setattr(heads, "PADDED_VOCAB_LOGIT", float("-inf"))


def _padded_vocab_float32_min(mp):
    # the common idiom: finite in float32, -inf once divided by a temperature below 1
    mp.setattr(heads, "PADDED_VOCAB_LOGIT", torch.finfo(torch.float32).min)


def _recompute_keeps_every_stage_last_layer(mp):
    init = model.ParallelCustomSplitLLamaModel.__init__

    def every_stage(self, config, megatron_config, stage, *args, **kwargs):
        init(self, config, megatron_config, stage, *args, **kwargs)
        if self.upper is not None and (megatron_config.virtual_pipeline_model_parallel_size or 1) == 1:
            # the upper stack's last layer kept on every stage, not only on the head's
            self.upper = layers.decoder_stack(self.upper_config, len(stage.upper_layers), last_layer_kept=True)

    mp.setattr(model.ParallelCustomSplitLLamaModel, "__init__", every_stage)


def _row_parallel_marked_dim_0(mp):
    attributes = sharding.tensor_parallel_attributes

    def dim_0(spec):
        split, _, stride = attributes(spec)
        return split, 0, stride  # row-parallel weights (split along their input, dim 1) marked as rows

    mp.setattr(sharding, "tensor_parallel_attributes", dim_0)


PLANTED = [
    # not at a pipeline layout: a stage whose input gets no gradient sends none back, and
    # the previous stage waits for it until the collective timeout
    PlantedBug("recompute_detaches_input", "full activation recompute drops the gradient of its input",
               ("tp1", "tp2_sp"), _recompute_detaches_input, options=ModelOptions(recompute="full")),
    PlantedBug("two_projection_adapter", "defect 1: mlp=false applied two projections",
               ("tp1", "tp2"), _two_projection_adapter),
    # megatron's MLP defaults to GELU; near 0 GELU and ReLU differ by a few percent, where
    # the bf16 rule lets production pick either ReLU branch (adapter_ties)
    PlantedBug("adapter_gelu", "mlp adapter activated by GELU (megatron MLP's default), not ReLU",
               ("tp1", "tp2_sp"), _adapter_gelu, mlp=True),
    PlantedBug("sp_norm_grads_not_reduced", "norm-weight gradients not all-reduced over TP under SP",
               ("tp2_sp",), _sp_norm_grads_not_reduced),
    # tp1 only: at TP=2 each rank of the tiny model holds ONE query group, for which the
    # two layouts coincide (real shapes have 8 groups; the tp1 case guards them).
    PlantedBug("qkv_concatenated", "fused QKV as [Q;K;V] instead of interleaved per query group",
               ("tp1",), _qkv_concatenated),
    PlantedBug("value_head_gathered_twice", "defect 2: value head output gathered twice under SP",
               ("tp2_sp",), _value_head_gathered_twice, head="value"),
    PlantedBug("position_ids_ignored", "defect 6: packed path ignored the caller's position_ids",
               ("tp1", "tp2_sp"), _position_ids_ignored),
    PlantedBug("stage_boundary_drops_adapter", "a stage starting at the adapter does not apply it",
               ("pp2_cut_adapter",), _stage_boundary_drops_adapter, config=equal_width_config),
    PlantedBug("upper_layer_misoffset", "a stage's upper layers loaded from the wrong checkpoint index",
               ("pp2_cut_upper",), _upper_layer_misoffset),
    PlantedBug("logsumexp_without_max", "vocab-parallel log-sum-exp without subtracting the max",
               ("tp1", "tp2"), _logsumexp_without_max, check="large_logits"),
    PlantedBug("gate_up_saved_without_stride", "saver joins gate/up shards without stride 2",
               ("tp2", "tp2_sp_pp2"), _gate_up_saved_without_stride, check="round_trip"),
    PlantedBug("fused_stats_not_exchanged", "fused head: max/sum-exp/label logit not combined over TP",
               ("tp2",), _fused_stats_not_exchanged, check="fused_head"),
    PlantedBug("fused_blocks_merged_without_rescale", "fused head: vocab blocks' sum-exp merged without "
               "rescaling to the common max", ("tp1", "tp2"), _fused_blocks_merged_without_rescale, check="fused_head"),
    # the block offset inside a rank shows at tp1 (several blocks), the shard offset at tp2
    # forward unchanged: only the gradients below each MLP can show it
    PlantedBug("swiglu_gate_derivative_dropped", "the SwiGLU backward without the "
               "gate's derivative", ("tp1", "tp2_sp"), _swiglu_gate_derivative_dropped),
    PlantedBug("rotary_pairs_interleaved", "q/k rotated in GPT-J's interleaved pairs, not Llama's "
               "half split", ("tp1", "tp2_sp"), _rotary_pairs_interleaved),
    PlantedBug("padded_attention_ignores_padding", "padded class: queries attend to padded keys",
               ("tp1", "tp2_sp"), _padded_attention_ignores_padding, padded=True),
    PlantedBug("flash_attn_4_groups_swapped", "flash-attn 4 given the K/V groups in reverse order",
               ("tp1",), _flash_attn_4_groups_swapped, config=head_dim_128_config, backend="flash_attn_4"),
    PlantedBug("flash_attn_4_sp_tail_joined", "flash-attn 4 told the SP-padding tail belongs to the last "
               "document", ("tp1",), _flash_attn_4_sp_tail_joined, check="attention_backends",
               backend="flash_attn_4"),
    # The tiny model's stacks differ in every non-shape setting (verify.tiny.TINY_*_SETTINGS), so
    # reading one from the wrong place moves the outputs.
    PlantedBug("lower_rope_theta_from_upper", "lower stack's rotary built with the upper's rope theta",
               ("tp1", "pp2_cut_lower"), _lower_rope_theta_from_upper),
    PlantedBug("upper_rope_scaling_from_lower", "upper stack's rotary without its llama3 scaling "
               "(the lower's default rope type)", ("tp1", "tp2_sp"), _upper_rope_scaling_from_lower),
    PlantedBug("upper_norm_eps_from_lower", "upper stack's RMSNorms use the lower's eps",
               ("tp1", "tp2_sp"), _upper_norm_eps_from_lower),
    PlantedBug("final_norm_eps_from_upper", "final RMSNorm uses the upper stack's eps, not rms_norm_eps",
               ("tp1", "pp2_cut_upper"), _final_norm_eps_from_upper),
    PlantedBug("loader_skips_eps", "loader does not compare the stacks' eps: a checkpoint whose eps "
               "differs from the model's loads", ("tp1", "tp2"), _loader_skips_eps, check="loader_config"),
    # tp2 only: at tp1 the embedding itself raises IndexError on an out-of-range id; at tp2
    # the vocab-parallel embedding zeroes it and the logits are finite and wrong
    PlantedBug("input_range_check_removed", "out-of-range token ids and labels are not refused",
               ("tp2",), _input_range_check_removed, check="input_range"),
    PlantedBug("fused_label_offset_dropped", "fused head: label column not shifted by the tile's first row",
               ("tp1", "tp2"), _fused_label_offset_dropped, check="fused_head"),
    # without recompute the head keeps each tile's probabilities for backward (forward unchanged)
    PlantedBug("fused_kept_probs_unnormalised", "fused head without recompute: the kept probabilities "
               "used unnormalised", ("tp1", "tp2"), _fused_kept_probs_unnormalised, check="fused_head"),
    PlantedBug("fused_kept_probs_unnormalised_in_model", "the same, in the model (recompute none)",
               ("tp1", "tp2_sp"), _fused_kept_probs_unnormalised, check="log_probs"),
    # the wiring of the fused head into the models, caught by the models' parity check
    PlantedBug("fused_head_input_grad_not_reduced", "fused head in the model: hidden-state gradient "
               "not reduced over TP", ("tp2", "tp2_sp"), _fused_head_input_grad_not_reduced, check="log_probs"),
    PlantedBug("temperature_not_in_entropy", "the head's temperature applied to log-probs but not to "
               "entropy", ("tp1", "tp2_sp"), _temperature_not_in_entropy, check="log_probs"),
    PlantedBug("verl_fused_temperature_not_in_entropy", "through verl's actor with use_fused_kernels: the "
               "head's temperature applied to log-probs but not to entropy", ("tp1",), _temperature_not_in_entropy,
               check="verl_fused"),
    PlantedBug("thd_temperature_dropped", "verl's thd call with labels scored at temperature 1, not the "
               "temperature it passed", ("tp1",), _thd_temperature_dropped, check="thd"),
    PlantedBug("fused_head_vocab_start_zero", "fused head in the model: every TP rank's shard taken as "
               "vocabulary rows from 0", ("tp2", "tp2_sp"), _fused_head_vocab_start_zero, check="log_probs"),
    PlantedBug("padded_vocab_not_masked", "padded vocabulary columns (vocab 301 at TP=2) left in the "
               "log-sum-exp and entropy", ("tp2",), _padded_vocab_not_masked, check="odd_vocab",
               options=ModelOptions(log_probs="materialise")),
    PlantedBug("fused_head_counts_padded_rows", "fused head: padded vocabulary rows (vocab 301 at TP=2) "
               "inside its tiles", ("tp2",), _fused_head_counts_padded_rows, check="odd_vocab"),
    PlantedBug("padded_vocab_saved", "saver writes the padded vocabulary rows", ("tp2",), _padded_vocab_saved,
               check="odd_vocab_round_trip"),
    # distributed checkpoints: the round trip loads at TP=2 + SP first, where the replicated
    # declaration loads TP rank 0's block on both ranks (at another TP it fails on shapes)
    PlantedBug("dist_tp_weight_declared_replicated", "distributed checkpoint declares a row-parallel "
               "weight replicated over TP", ("tp2",), _tp_weight_declared_replicated, check="dist_round_trip"),
    PlantedBug("dist_tp_weight_declared_replicated_shapes", "distributed checkpoint declares a row-parallel "
               "weight replicated over TP (declaration check)", ("tp2_sp_pp2",), _tp_weight_declared_replicated,
               check="dist_declaration"),
    PlantedBug("dist_fused_weight_not_loaded_in_place", "distributed checkpoint: linear_fc1's gate/up blocks "
               "are copies, so a load that ignores the returned state dict leaves it at its init", ("tp1",),
               _fused_weight_block_copied, check="dist_round_trip"),
    # the declaration check, not the round trip: megatron's save validates on global rank 0
    # alone, and the other ranks would wait for it
    PlantedBug("dist_layer_offset_dropped", "distributed checkpoint keys number each pipeline stage's layers "
               "from 0", ("pp2_vpp2", "tp2_sp_pp2"), _dist_layer_offset_dropped, check="dist_declaration"),
    # the training step (megatron DDP, finalize_model_grads, Adam) and the fused head under DDP
    PlantedBug("fused_head_not_given_main_grad", "fused head under DDP: bf16 weight gradient per micro-batch "
               "added to main_grad by DDP's hook", ("tp1", "tp2_sp"), _fused_head_not_given_main_grad,
               check="main_grad"),
    PlantedBug("fused_head_weight_grad_written", "fused head: weight gradient written into main_grad instead "
               "of added", ("tp1", "tp2_sp"), _fused_head_weight_grad_written, check="training"),
    PlantedBug("value_head_unmarked_in_training", "sequence-parallel value head weight left unmarked: "
               "finalize_model_grads does not all-reduce it", ("tp2_sp",), _value_head_unmarked, head="value",
               check="training"),
    PlantedBug("microbatch_gradient_dropped", "gradient buffers cleared inside the accumulation loop: one "
               "micro-batch's gradient lost", ("tp1", "tp2_sp"), _microbatch_gradient_dropped, check="training"),
    PlantedBug("tensor_parallel_weights_unmarked", "TP-split weights not marked tensor_model_parallel: the "
               "clipping norm counts rank 0's shards only", ("tp2",), _tensor_parallel_weights_unmarked,
               check="training"),
    # llama3 rope with a frequency in each band of each stack (test_rope_bands): the
    # smoothing band is where swapped factors differ
    PlantedBug("rope_band_factors_swapped_lower", "lower stack's llama3 low/high frequency factors swapped",
               ("tp1",), _rope_band_factors_swapped("lower"), check="rope_parity"),
    PlantedBug("rope_band_factors_swapped_upper", "upper stack's llama3 low/high frequency factors swapped",
               ("tp1",), _rope_band_factors_swapped("upper"), check="rope_parity"),
    PlantedBug("rope_band_factors_swapped", "llama3 low/high frequency factors swapped (against "
               "transformers' rope)", ("tp1",), _rope_band_factors_swapped("both"), check="rope_transformers"),
    # verl's engine on the bridge's model (tests/integration/test_verl.py)
    PlantedBug("export_layer_offset_dropped", "bridge export: a pipeline stage's layers named from index 0",
               ("tp2_pp2_vpp2",), _export_layer_offset_dropped, check="verl_export"),
    PlantedBug("export_skips_stage", "bridge export: the tensors of pipeline stages after the first left out",
               ("pp2_cut_adapter",), _export_skips_stage, check="verl_export"),
    PlantedBug("padded_vocab_minus_inf", "padded vocabulary columns of the logits verl reads are -inf "
               "(verl's entropy: 0 * -inf = NaN)", ("tp2_sp",), _padded_vocab_minus_inf, check="verl_odd_vocab"),
    PlantedBug("padded_vocab_float32_min", "padded vocabulary columns hold float32's most negative value: "
               "-inf after verl's in-place division by a temperature below 1", ("tp2",),
               _padded_vocab_float32_min, check="verl_float32_temperature"),
    # placement only: every stage of every STAGE_PLACEMENTS layout is built in one process
    PlantedBug("recompute_keeps_every_stage_last_layer", "full recompute keeps the last upper layer of "
               "every pipeline stage, not only the model's last (the head's stage)", ("tp1",),
               _recompute_keeps_every_stage_last_layer, check="recompute_placement"),
    # megatron marks split weights at any TP size, so TP=1 shows it
    PlantedBug("row_parallel_marked_dim_0", "row-parallel weights (o_proj, down_proj, the mlp adapter's second "
               "linear) marked partition_dim 0", ("tp1",), _row_parallel_marked_dim_0, check="tensor_parallel_marks"),
]


# ---- the RL loop's data path (tests/integration/test_rollout.py) --------------------------------
def _thd_temperature_twice(mp):
    thd_batch = batches.thd_batch

    def at_temperature_squared(*args, **kwargs):
        temperature = kwargs.get("temperature")
        return thd_batch(*args, **{**kwargs, "temperature": None if temperature is None else temperature ** 2})

    mp.setattr(batches, "thd_batch", at_temperature_squared)


def _export_qkv_concatenated(mp):
    # the export alone: the model keeps its (right) interleaved q/k/v, what leaves it is cut
    # as [Q; K; V]. The tests' gradient gathering reads the same function, so only the
    # engine's outputs can show it
    from splitllama.checkpoint import split as split_checkpoint

    unshard = split_checkpoint.unshard

    def concatenated(spec, locals_by_rank):
        if not isinstance(spec.sharding, sharding.FusedQKV):
            return unshard(spec, locals_by_rank)
        kind = spec.sharding
        q_rows = locals_by_rank[0].shape[0] * kind.heads // (kind.heads + 2 * kind.groups)
        kv_rows = (locals_by_rank[0].shape[0] - q_rows) // 2
        per_rank = [local.split([q_rows, kv_rows, kv_rows], 0) for local in locals_by_rank]
        return [torch.cat([pieces[i] for pieces in per_rank], 0) for i in range(3)]

    mp.setattr(split_checkpoint, "unshard", concatenated)


def _export_kv_names_swapped(mp):
    # k_proj and v_proj have the same shape, so a strict loader takes them
    from splitllama import bridge

    iter_full_state = bridge.iter_full_state
    swap = {"k_proj": "v_proj", "v_proj": "k_proj"}

    def swapped(chunks):
        for name, tensor in iter_full_state(chunks):
            parts = name.split(".")
            yield ".".join(swap.get(part, part) for part in parts), tensor

    mp.setattr(bridge, "iter_full_state", swapped)


def _export_final_norm_renamed(mp):
    # a name the engine has no parameter for: its strict loader refuses it, on every rank
    from splitllama import bridge

    iter_full_state = bridge.iter_full_state

    def renamed(chunks):
        for name, tensor in iter_full_state(chunks):
            yield name.replace("model.norm.", "model.final_norm."), tensor

    mp.setattr(bridge, "iter_full_state", renamed)


def _decode_rotary_off_by_one(mp):
    # the rollout engine's bug (the oracle as the engine): a decode step (keys already
    # cached) rotates a left-padded row's new token one position too far
    from oracle import modeling

    forward = modeling.CustomSplitLLamaModel.forward

    def shifted(self, **kwargs):
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if cache is not None and cache.get_seq_length() > 0 and mask is not None and positions is not None:
            kwargs["position_ids"] = positions + (mask[:, :1] == 0).to(positions.dtype)
        return forward(self, **kwargs)

    mp.setattr(modeling.CustomSplitLLamaModel, "forward", shifted)


# Run by test_rollout.py beside the checks they must fail (check: "rollout", the
# engine-vs-trainer comparison or the engine's strict load, or "weight_sync"), with the verl
# workers that test built for its layout: building them again per bug would cost a
# process-group set-up and two workers each. Not in PLANTED, which test_planted_bugs.py runs.
ROLLOUT_PLANTED = [
    PlantedBug("trainer_temperature_dropped", "the engine samples and reports at the temperature, the "
               "trainer scores at 1", ("tp1", "tp2_sp"), _thd_temperature_dropped, check="rollout"),
    PlantedBug("trainer_temperature_twice", "the trainer divides the logits by the temperature twice",
               ("tp1", "tp2_pp2_vpp2"), _thd_temperature_twice, check="rollout"),
    # tp1: at TP=2 each rank of the tiny model holds one query group, where the two orders agree
    PlantedBug("export_qkv_concatenated", "export cuts the fused QKV as [Q; K; V] instead of per query "
               "group", ("tp1",), _export_qkv_concatenated, check="rollout"),
    PlantedBug("export_kv_names_swapped", "export names k_proj's tensor v_proj and v_proj's k_proj",
               ("tp1", "pp2_cut_adapter"), _export_kv_names_swapped, check="rollout"),
    PlantedBug("export_kv_names_swapped_sync", "the same, after the optimizer step",
               ("tp1", "tp2_pp2_vpp2"), _export_kv_names_swapped, check="weight_sync"),
    PlantedBug("export_final_norm_renamed", "export names the final norm model.final_norm.weight",
               ("tp1", "tp2_sp"), _export_final_norm_renamed, check="rollout"),
    PlantedBug("decode_rotary_off_by_one", "the engine's decode steps rotate left-padded rows one position "
               "too far", ("tp1", "tp2_sp"), _decode_rotary_off_by_one, check="rollout"),
]
