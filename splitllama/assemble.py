"""Build a split checkpoint from two Hugging Face Llama checkpoints.

Output (HF format, safetensors): the lower model's embedding and layers ``0..N-1``
(renamed ``model.layers_first.{i}``), an adapter (``identity``, a seeded fresh init, or
tensors from a safetensors file), the upper model's LAST ``M`` layers (global index
``L_upper - M + j`` renamed ``model.layers_last.{j}``), its final norm and LM head, and a
self-contained ``config.json`` (both Llama configs embedded).

Memory: source tensors are read one at a time with ``safetensors.safe_open`` (only the
ones kept), and the output is written shard by shard, so peak memory is about one output
shard (``max_shard_size``) plus one tensor, whatever the size of the sources. Every source
tensor's presence, shape and dtype is checked from the safetensors headers before anything
is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import LlamaConfig

from splitllama import weight_names as names
from splitllama.config import CustomSplitLlamaConfig

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CHOICES = "'identity', 'init' or a path to a .safetensors file"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10^9) or ``"500MiB"``
    (2^20), the units Hugging Face's ``max_shard_size`` accepts."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise ValueError(
                f"max_shard_size={size!r} is not a size (allowed: bytes as an int, or a number "
                f"with one of the units {sorted(u for u in _SIZE_UNITS if u)})"
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


# ---- reading a Hugging Face Llama checkpoint -----------------------------------------------


class LlamaCheckpoint:
    """One HF Llama checkpoint directory: its config and which file holds each tensor.

    Only headers are read here; tensor data is read by ``read``, one tensor at a time."""

    def __init__(self, directory: str | Path, role: str) -> None:
        self.directory = Path(directory)
        self.role = role  # "lower" or "upper", for error messages
        if not (self.directory / "config.json").is_file():
            raise ValueError(f"--{role} {self.directory} does not hold a config.json")
        self.config = LlamaConfig.from_pretrained(self.directory)
        self.files = self._tensor_files()

    def _tensor_files(self) -> dict[str, Path]:
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.directory / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise ValueError(f"{index} names the shard {file.name}, which does not exist")
            return files
        if single.is_file():
            with safe_open(single, framework="pt") as handle:
                return {name: single for name in handle.keys()}
        raise ValueError(
            f"the {self.role} checkpoint {self.directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}"
        )

    def file_of(self, name: str, needed_for: str) -> Path:
        if name not in self.files:
            raise ValueError(
                f"tensor {name!r} is missing from the {self.role} checkpoint {self.directory} "
                f"(needed for {needed_for!r})"
            )
        return self.files[name]

    def header(self, name: str, needed_for: str) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype string of one tensor, without reading its data."""
        file = self.file_of(name, needed_for)
        with safe_open(file, framework="pt") as handle:
            if name not in handle.keys():
                raise ValueError(f"tensor {name!r} is missing from {file} although the index names it")
            tensor_slice = handle.get_slice(name)
            return tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()

    def read(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


# ---- what to write -----------------------------------------------------------------------


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape, and how to produce it (called once, at write)."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def _source_plan(config: CustomSplitLlamaConfig, lower: LlamaCheckpoint,
                 upper: LlamaCheckpoint) -> list[tuple[str, LlamaCheckpoint, str]]:
    """(output name, source checkpoint, source name) of every copied tensor, in model order
    with the adapter left out."""
    plan = [(names.EMBED, lower, names.EMBED)]
    for i in range(config.num_lower):
        plan += [(names.lower_layer(i, s), lower, names.llama_layer(i, s)) for s in names.LAYER_SUFFIXES]
    offset = config.upper_layer_offset  # upper layer j is global layer L_upper - M + j
    for j in range(config.num_upper):
        plan += [(names.upper_layer(j, s), upper, names.llama_layer(offset + j, s))
                 for s in names.LAYER_SUFFIXES]
    plan.append((names.FINAL_NORM, upper, names.FINAL_NORM))
    head_source = names.LM_HEAD
    if names.LM_HEAD not in upper.files and upper.config.tie_word_embeddings:
        # A tied upper model stores no lm_head: its head IS its input embedding.
        head_source = names.EMBED
    plan.append((names.LM_HEAD, upper, head_source))
    return plan


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
                f"tensor {src_name!r} in {source.files[src_name]} has shape {shape}, but the "
                f"{source.role} config ({source.directory / 'config.json'}) implies "
                f"{expected[out_name]}"
            )
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"tensor {src_name!r} in {source.files[src_name]} has dtype {dtype} "
                f"(allowed: {sorted(_SAFETENSORS_DTYPES)})"
            )
        dtypes.setdefault(dtype, f"{src_name!r} in {source.files[src_name]}")
    if len(dtypes) > 1:
        found = ", ".join(f"{dtype} (e.g. {where})" for dtype, where in dtypes.items())
        raise ValueError(f"the source tensors do not share one dtype: {found}")
    return _SAFETENSORS_DTYPES[next(iter(dtypes))]


def adapter_tensors(config: CustomSplitLlamaConfig, adapter: str | Path, seed: int,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter's tensors (names of ``weight_names.adapter_shapes``) in ``dtype``."""
    shapes = names.adapter_shapes(config)
    if str(adapter) == "identity":
        if config.mlp or config.h_lo != config.h_hi:
            raise ValueError(
                f"adapter='identity' needs the linear adapter (mlp=False; got mlp={config.mlp}) "
                f"and equal hidden sizes (lower {config.h_lo}, upper {config.h_hi})"
            )
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
    with safe_open(path, framework="pt") as handle:
        present = set(handle.keys())
        missing, unexpected = sorted(set(shapes) - present), sorted(present - set(shapes))
        if missing or unexpected:
            raise ValueError(
                f"adapter file {path}: missing tensors {missing}, unexpected tensors {unexpected} "
                f"(expected exactly {sorted(shapes)})"
            )
        tensors = {}
        for name, shape in shapes.items():
            got = tuple(handle.get_slice(name).get_shape())
            if got != shape:
                raise ValueError(f"adapter file {path}: tensor {name!r} has shape {got}, expected {shape}")
            tensors[name] = handle.get_tensor(name).to(dtype)
    return tensors


# ---- writing shards -----------------------------------------------------------------------


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (a larger tensor gets
    a shard of its own), holding only the current shard in memory; ``finish`` names the
    shards HF-style and writes the index when there is more than one."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"tmp-shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self.pending:
            self._flush()
        count = len(self.shards)
        if count == 1:
            final = [self.out_dir / SINGLE_FILE]
        else:
            final = [self.out_dir / f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        weight_map = {}
        for (tmp, tensor_names), path in zip(self.shards, final):
            tmp.rename(path)
            weight_map.update({name: path.name for name in tensor_names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final


# ---- the assembler ------------------------------------------------------------------------


def _prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"out_dir {out} exists and is not empty; choose a new or empty directory")
    return out


def plan_split_checkpoint(config: CustomSplitLlamaConfig, lower: LlamaCheckpoint, upper: LlamaCheckpoint,
                          adapter: str | Path, seed: int) -> tuple[list[PlannedTensor], torch.dtype]:
    """Validate every input and list the output tensors in model order (nothing written)."""
    sources = _source_plan(config, lower, upper)
    dtype = _checked_dtype(config, sources)
    adapter_values = adapter_tensors(config, adapter, seed, dtype)
    shapes = names.split_checkpoint_shapes(config, "lm")

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
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> Path:
    """Write a split checkpoint to ``out_dir`` (which must not exist or be empty) and return
    its path. ``adapter``: ``"identity"`` (mlp=False, equal hidden sizes), ``"init"``
    (normal(0, upper initializer_range) seeded by ``seed``) or a ``.safetensors`` file with
    exactly the adapter tensors. The adapter takes the dtype of the source checkpoints."""
    max_bytes = parse_size(max_shard_size)
    lower = LlamaCheckpoint(lower_dir, "lower")
    upper = LlamaCheckpoint(upper_dir, "upper")
    # Validates N and M against the layer counts and the two vocabularies (names the field).
    config = CustomSplitLlamaConfig.from_llama_configs(lower.config, upper.config, num_lower, num_upper, mlp=mlp)
    out = _prepare_out_dir(out_dir)
    planned, dtype = plan_split_checkpoint(config, lower, upper, adapter, seed)
    config.dtype = dtype

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_bytes)
    for item in tqdm(planned, desc="assemble", unit="tensor", disable=not progress):
        writer.add(item.name, item.load())
    files = writer.finish()
    config.save_pretrained(out)
    logger.info("wrote %s: %d tensors, %d bytes in %d file(s)", out, len(planned), writer.total_bytes, len(files))
    return out


def iter_checkpoint_files(out_dir: Path) -> Iterator[Path]:
    """The safetensors files of a checkpoint directory (single or sharded)."""
    index = out_dir / INDEX_FILE
    if index.is_file():
        yield from (out_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values())))
    else:
        yield out_dir / SINGLE_FILE
