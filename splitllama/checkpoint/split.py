"""Split checkpoints <-> production models of any TP x PP layout.

``load_checkpoint``: every rank reads only its slices (safetensors ``get_slice``), after
checking the checkpoint's config and every tensor's name and shape: a missing,
unexpected or mis-shaped tensor is an error that names it, and no parameter is ever left
with its initial values. ``save_checkpoint``: gathers TP shards and writes one file set
per pipeline stage, then rank 0 names the shards and writes the index and a
self-contained config; load -> save is bitwise identical. ``iter_stage_tensors`` yields
this pipeline rank's full tensors (parameters or gradients) under the checkpoint names;
``iter_full_state`` streams every parameter to every rank one tensor at a time (the
bridge's weight export to a rollout engine).

All of them read ``sharding.weight_specs``, the one declaration of how every weight is sharded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from splitllama import weight_names as wn
from splitllama.config import CustomSplitLlamaConfig
from splitllama.checkpoint.directory import check_config, check_tensors
from splitllama.checkpoint.safetensors_io import Part, SafetensorsReader, ShardWriter, finish, parse_size
from splitllama.checkpoint import model_chunks
from splitllama.checkpoint import assemble
from splitllama.checkpoint.sharding import fuse, local_slices, unshard, weight_specs

logger = logging.getLogger(__name__)

def _specs(chunk: torch.nn.Module, config: CustomSplitLlamaConfig, head: wn.Head):
    """The chunk's weight specs, with its padded vocabulary (embedding and LM head rows)."""
    return weight_specs(config, chunk.stage, head, chunk.padded_vocab_size)


def _tp() -> tuple[int, int]:
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def load_checkpoint(model_or_chunks, checkpoint_dir: str | os.PathLike, *,
                    fresh_value_head: bool = False, seed: int = 0, progress: bool = False) -> None:
    """Load a split checkpoint into a production model (or its list of VPP chunks).

    Strict: the checkpoint's config must match the model's, and every tensor must be
    present with its exact shape. A value model may start from a CausalLM checkpoint only
    with ``fresh_value_head=True`` (head initialised from ``seed``). ``progress``: a
    progress bar on rank 0 (off by default: library calls are quiet)."""
    chunks = model_chunks(model_or_chunks)
    config, head = chunks[0].hf_config, chunks[0].head_kind
    directory = Path(checkpoint_dir)
    check_config(config, directory)
    reader = SafetensorsReader(directory)
    check_tensors(reader, config, head, fresh_value_head)
    tp_rank, tp = _tp()
    todo = [(chunk, spec) for chunk in chunks for spec in _specs(chunk, config, head)]
    for chunk, spec in tqdm(todo, desc="load", unit="tensor", disable=not (progress and _is_rank0())):
        param = chunk.get_parameter(spec.param)
        if head == "value" and fresh_value_head and spec.names == (wn.VALUE_HEAD,):
            local = assemble.fresh_value_head(config, seed)
        else:
            slices = local_slices(spec, [reader.shape(n) for n in spec.names], tp_rank, tp)
            local = fuse(spec, [reader.read(n, s) for n, s in zip(spec.names, slices, strict=True)], tp)
        assert local.shape == param.shape, f"{spec.param}: local {tuple(local.shape)} vs param {tuple(param.shape)}"
        with torch.no_grad():
            param.copy_(local.to(param.dtype))
    for chunk in chunks:
        declared = {spec.param for spec in _specs(chunk, config, head)}
        actual = {name for name, _ in chunk.named_parameters()}
        assert declared == actual, f"sharding declaration and model differ: {declared ^ actual}"


# ---- gathering -------------------------------------------------------------------------------
def tp_all_gather(local: torch.Tensor) -> list[torch.Tensor]:
    """Every TP rank's ``local`` (collective over TP), in rank order."""
    rank, tp = _tp()
    if tp == 1:
        return [local]
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return parts


def iter_stage_tensors(chunks, source: str = "param"):
    """Yield ``(checkpoint name, full tensor)`` for what this pipeline rank owns, on every
    TP rank (collective over TP: all TP ranks must iterate together). ``source`` is
    "param", "grad" or "main_grad" (megatron DDP's gradient buffer; a missing gradient
    reads as zeros)."""
    if source not in ("param", "grad", "main_grad"):
        raise ValueError(f"source must be 'param', 'grad' or 'main_grad', got {source!r}")
    config, head = chunks[0].hf_config, chunks[0].head_kind
    for chunk in chunks:
        for spec in _specs(chunk, config, head):
            param = chunk.get_parameter(spec.param)
            local = param.detach() if source == "param" else getattr(param, source, None)
            if local is None:
                local = torch.zeros_like(param)
            yield from zip(spec.names, unshard(spec, tp_all_gather(local.detach())), strict=True)


def _stage_listing(chunks) -> list[tuple[str, tuple[int, ...], str]]:
    """``(checkpoint name, full shape, dtype name)`` of what this pipeline rank owns, in the
    order ``iter_stage_tensors`` yields it, without gathering anything."""
    config, head = chunks[0].hf_config, chunks[0].head_kind
    shapes = wn.split_checkpoint_shapes(config, head)
    return [(name, tuple(shapes[name]), str(chunk.get_parameter(spec.param).dtype).removeprefix("torch."))
            for chunk in chunks for spec in _specs(chunk, config, head) for name in spec.names]


def iter_full_state(model_or_chunks):
    """Yield ``(checkpoint name, full tensor)`` for EVERY tensor of the model on every rank,
    each once, in model order (pipeline stage by stage): TP shards gathered, then broadcast
    from the pipeline rank that owns it, one tensor at a time, so memory holds one full
    tensor rather than the model. Collective: all ranks iterate together."""
    chunks = model_chunks(model_or_chunks)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        yield from iter_stage_tensors(chunks, "param")
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    # every stage's names, shapes and dtypes first, so a rank can receive what it does not own
    listings: list = [None] * pp
    dist.all_gather_object(listings, _stage_listing(chunks), group=group)
    mine = iter_stage_tensors(chunks, "param")
    device = next(chunks[0].parameters()).device
    for stage, listing in enumerate(listings):
        source = dist.get_global_rank(group, stage)
        for name, shape, dtype in listing:
            if stage == pp_rank:
                own, tensor = next(mine)
                assert own == name, f"stage order: {own} vs {name}"
                tensor = tensor.contiguous()
            else:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.broadcast(tensor, src=source, group=group)
            yield name, tensor


# ---- saving ----------------------------------------------------------------------------------
def save_checkpoint(model_or_chunks, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    progress: bool = False) -> None:
    """Gather TP/PP shards into a split checkpoint (HF layout, safetensors, index when
    sharded, self-contained config). Collective: every rank of the model must call it.
    ``progress``: a progress bar on rank 0 (off by default)."""
    chunks = model_chunks(model_or_chunks)
    limit = parse_size(max_shard_size)
    out = Path(out_dir)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank, _ = _tp()
    writer = tp_rank == 0 and parallel_state.get_data_parallel_rank() == 0
    if _is_rank0():
        out.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()

    # Stage files are named ".stageSSS-partKKKKK": sorting them gives model order.
    shards = ShardWriter(out, limit, prefix=f".stage{pp_rank:03d}-part") if writer else None
    for name, tensor in tqdm(iter_stage_tensors(chunks, "param"), desc="save", unit="tensor",
                             disable=not (progress and _is_rank0())):
        if shards is not None:
            shards.add(name, tensor)
    files = shards.close() if shards is not None else []

    gathered = [files]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)
    if _is_rank0():
        _finish(out, [f for part in gathered for f in part], chunks[0].hf_config)
    if dist.is_initialized():
        dist.barrier()


def _finish(out: Path, parts: list[Part], config: CustomSplitLlamaConfig) -> None:
    finish(out, sorted(parts, key=lambda part: part.file))
    saved = CustomSplitLlamaConfig.from_dict(config.to_dict())
    saved.path8b = saved.path70b = None
    saved.save_pretrained(out)
