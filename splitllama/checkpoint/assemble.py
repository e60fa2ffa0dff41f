"""Build a split checkpoint from two Hugging Face Llama checkpoints.

Output (HF format, safetensors): the lower model's embedding and layers ``0..N-1``
(renamed ``model.layers_first.{i}``), an adapter (``identity``, a seeded fresh init, or
tensors from a safetensors file), the upper model's LAST ``M`` layers (global index
``L_upper - M + j`` renamed ``model.layers_last.{j}``), its final norm and LM head, and a
self-contained ``config.json`` (both Llama configs embedded).

Memory: source tensors are read one at a time (only the ones kept) and the output is
written shard by shard (``safetensors_io``'s reader and streaming writer), so peak memory is about one output
shard (``max_shard_size``) plus one tensor, whatever the size of the sources. Every source
tensor's presence, shape and dtype is checked from the safetensors headers before anything
is written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig

from splitllama import weight_names as names
from splitllama.config import MODEL_TYPE, VALUE_ARCH, CustomSplitLlamaConfig, llama_config_errors
from splitllama.checkpoint.safetensors_io import FLOAT_DTYPES, SafetensorsReader, parse_size, write_sharded

logger = logging.getLogger(__name__)

ADAPTER_CHOICES = "'identity', 'init' or a path to a .safetensors file"

# ---- reading a Hugging Face Llama checkpoint -----------------------------------------------


class LlamaCheckpoint:
    """One HF Llama checkpoint directory: its config and its tensors' headers (data is read
    by ``read``, one tensor at a time)."""

    def __init__(self, directory: str | Path, role: str) -> None:
        self.directory = Path(directory)
        self.role = role  # "lower" or "upper", for error messages
        path = self.directory / "config.json"
        if not path.is_file():
            raise ValueError(f"--{role} {self.directory} does not hold a config.json")
        try:
            fields = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--{role} {path} is not valid JSON ({err})") from None
        model_type = fields.get("model_type") if isinstance(fields, dict) else None
        if model_type != "llama":
            what = ("it is a split checkpoint already; pass the Llama checkpoints it is made from"
                    if model_type == MODEL_TYPE else "a Hugging Face Llama checkpoint")
            raise ValueError(f"--{role} {path} has model_type={model_type!r}, expected 'llama' ({what})")
        with llama_config_errors(role, in_file=f"--{role} {path}"):
            self.config = LlamaConfig.from_pretrained(self.directory)
        self.tensors = SafetensorsReader(self.directory, label=f"the {role} checkpoint")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def file_of(self, name: str, needed_for: str) -> Path:
        if name not in self.tensors:
            raise ValueError(
                f"tensor {name!r} is missing from the {self.role} checkpoint {self.directory} "
                f"(needed for {needed_for!r})"
            )
        return self.tensors.file_of(name)

    def header(self, name: str, needed_for: str) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype string of one tensor, without reading its data."""
        self.file_of(name, needed_for)
        return self.tensors.shape(name), self.tensors.dtype(name)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors.read(name)


# ---- what to write -----------------------------------------------------------------------


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape, and how to produce it (called once, at write)."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def _source_plan(config: CustomSplitLlamaConfig, lower: LlamaCheckpoint,
                 upper: LlamaCheckpoint, value_head: bool = False) -> list[tuple[str, LlamaCheckpoint, str]]:
    """(output name, source checkpoint, source name) of every copied tensor, in model order
    with the adapter (and, for ``value_head``, the fresh value head) left out."""
    plan = [(names.EMBED, lower, names.EMBED)]
    for i in range(config.num_lower):
        plan += [(names.lower_layer(i, s), lower, names.llama_layer(i, s)) for s in names.LAYER_SUFFIXES]
    offset = config.upper_layer_offset  # upper layer j is global layer L_upper - M + j
    for j in range(config.num_upper):
        plan += [(names.upper_layer(j, s), upper, names.llama_layer(offset + j, s))
                 for s in names.LAYER_SUFFIXES]
    plan.append((names.FINAL_NORM, upper, names.FINAL_NORM))
    if value_head:
        return plan
    plan.append((names.LM_HEAD, upper, lm_head_source(upper)))
    return plan


def lm_head_source(upper: LlamaCheckpoint) -> str:
    """The upper checkpoint's tensor the split LM head is copied from: its ``lm_head``, or
    the input embedding of a model with tied embeddings that stores no ``lm_head`` (its head
    IS its embedding)."""
    if names.LM_HEAD not in upper and upper.config.tie_word_embeddings:
        return names.EMBED
    return names.LM_HEAD


def _checked_dtype(config: CustomSplitLlamaConfig,
                   plan: list[tuple[str, LlamaCheckpoint, str]]) -> torch.dtype:
    """Check every source tensor's presence and shape from the headers; return the one dtype
    they share."""
    expected = names.split_checkpoint_shapes(config, "lm")
    dtypes: dict[str, str] = {}
    for out_name, source, src_name in plan:
        shape, dtype = source.header(src_name, out_name)
        if shape != expected[out_name]:
            raise ValueError(
                f"tensor {src_name!r} in {source.tensors.file_of(src_name)} has shape {shape}, but the "
                f"{source.role} config ({source.directory / 'config.json'}) implies "
                f"{expected[out_name]}"
            )
        if dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"tensor {src_name!r} in {source.tensors.file_of(src_name)} has dtype {dtype} "
                f"(allowed: {sorted(FLOAT_DTYPES)})"
            )
        dtypes.setdefault(dtype, f"{src_name!r} in {source.tensors.file_of(src_name)}")
    if len(dtypes) > 1:
        found = ", ".join(f"{dtype} (e.g. {where})" for dtype, where in dtypes.items())
        raise ValueError(f"the source tensors do not share one dtype: {found}")
    return FLOAT_DTYPES[next(iter(dtypes))]


def adapter_tensors(config: CustomSplitLlamaConfig, adapter: str | Path, seed: int,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter's tensors (names of ``weight_names.adapter_shapes``) in ``dtype``."""
    shapes = names.adapter_shapes(config)
    if str(adapter) == "identity":
        if config.mlp:
            raise ValueError("adapter='identity' needs the linear adapter (mlp=False; got mlp=True)")
        if config.h_lo != config.h_hi:
            raise ValueError(f"adapter='identity' needs equal hidden sizes, got lower {config.h_lo} and upper "
                             f"{config.h_hi} (use adapter='init' or a safetensors file)")
        return {names.ADAPTER_LINEAR: torch.eye(config.h_hi, dtype=dtype)}
    if str(adapter) == "init":
        # Seeded normal(0, upper initializer_range), drawn in float32 so that the values do
        # not depend on the checkpoint dtype beyond the final cast.
        generator = torch.Generator().manual_seed(seed)
        std = config.upper.initializer_range
        return {
            name: (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(dtype)
            for name, shape in shapes.items()
        }
    path = Path(adapter)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ValueError(f"adapter={str(adapter)!r} is not a safetensors file (allowed: {ADAPTER_CHOICES})")
    return _adapter_from_file(path, shapes, dtype)


def _adapter_from_file(path: Path, shapes: dict[str, tuple[int, ...]],
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    reader = SafetensorsReader(path, label="adapter file")
    present = set(reader.names())
    missing, unexpected = sorted(set(shapes) - present), sorted(present - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"adapter file {path}: missing tensors {missing}, unexpected tensors {unexpected} "
            f"(expected exactly {sorted(shapes)})"
        )
    for name, shape in shapes.items():
        if reader.shape(name) != shape:
            raise ValueError(f"adapter file {path}: tensor {name!r} has shape {reader.shape(name)}, expected {shape}")
    return {name: reader.read(name).to(dtype) for name in shapes}


# ---- the assembler ------------------------------------------------------------------------


def _prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"out_dir {out} exists and is not empty; choose a new or empty directory")
    return out


def fresh_value_head(config: CustomSplitLlamaConfig, seed: int) -> torch.Tensor:
    """A fresh value head ``[1, h_hi]`` in float64 (callers cast it): normal(0, upper
    initializer_range), drawn from a generator of ``seed`` (its own, so it does not depend on
    the adapter's draws). The one draw behind ``assemble --value``, a value model loaded from
    a CausalLM checkpoint (``load_checkpoint(fresh_value_head=True)``) and the oracle given
    production's fresh head: the same seed gives the same head on every path and every rank
    (the value head is replicated over TP)."""
    generator = torch.Generator().manual_seed(seed)
    shape = names.split_checkpoint_shapes(config, "value")[names.VALUE_HEAD]
    return torch.randn(shape, generator=generator, dtype=torch.float64) * config.upper.initializer_range


def plan_split_checkpoint(config: CustomSplitLlamaConfig, lower: LlamaCheckpoint, upper: LlamaCheckpoint,
                          adapter: str | Path, seed: int,
                          value_head: bool = False) -> tuple[list[PlannedTensor], torch.dtype]:
    """Validate every input and list the output tensors in model order (nothing written).
    ``value_head``: a fresh value head (``fresh_value_head``) instead of the LM head."""
    sources = _source_plan(config, lower, upper, value_head)
    dtype = _checked_dtype(config, sources)
    adapter_values = adapter_tensors(config, adapter, seed, dtype)
    if value_head:
        adapter_values[names.VALUE_HEAD] = fresh_value_head(config, seed).to(dtype)
    shapes = names.split_checkpoint_shapes(config, "value" if value_head else "lm")

    def copy_of(source: LlamaCheckpoint, src_name: str) -> Callable[[], torch.Tensor]:
        return lambda: source.read(src_name)

    def adapter_of(name: str) -> Callable[[], torch.Tensor]:
        return lambda: adapter_values.pop(name)

    loaders = {out_name: copy_of(source, src_name) for out_name, source, src_name in sources}
    loaders.update({name: adapter_of(name) for name in adapter_values})
    return [PlannedTensor(name, shape, loaders[name]) for name, shape in shapes.items()], dtype


def assemble_split_checkpoint(
    lower_dir: str | Path,
    upper_dir: str | Path,
    num_lower: int,
    num_upper: int,
    out_dir: str | Path,
    *,
    mlp: bool = False,
    adapter: str | Path = "init",
    seed: int = 0,
    value_head: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool = False,
) -> Path:
    """Write a split checkpoint to ``out_dir`` (which must not exist or be empty) and return
    its path. ``adapter``: ``"identity"`` (mlp=False, equal hidden sizes), ``"init"``
    (normal(0, upper initializer_range) seeded by ``seed``) or a ``.safetensors`` file with
    exactly the adapter tensors. The adapter takes the dtype of the source checkpoints.
    ``value_head``: a value (critic) checkpoint, ``score.weight [1, h_hi]`` drawn from
    ``seed`` in place of the upper model's LM head (config: ``num_labels=1``). ``progress``:
    a progress bar (off by default; the command line shows it on a terminal)."""
    max_bytes = parse_size(max_shard_size)
    lower = LlamaCheckpoint(lower_dir, "lower")
    upper = LlamaCheckpoint(upper_dir, "upper")
    # Validates N and M against the layer counts and the two vocabularies (names the field).
    config = CustomSplitLlamaConfig.from_llama_configs(lower.config, upper.config, num_lower, num_upper, mlp=mlp)
    out = _prepare_out_dir(out_dir)
    planned, dtype = plan_split_checkpoint(config, lower, upper, adapter, seed, value_head)
    config.dtype = dtype
    if value_head:
        config.num_labels = 1
        config.architectures = [VALUE_ARCH]

    out.mkdir(parents=True, exist_ok=True)
    items = tqdm(planned, desc="assemble", unit="tensor", disable=not progress)
    files = write_sharded(out, ((item.name, item.load()) for item in items), max_bytes)
    config.save_pretrained(out)
    logger.info("wrote %s: %d tensors in %d file(s)", out, len(planned), len(files))
    return out
