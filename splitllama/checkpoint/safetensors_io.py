"""Reading and writing (split) safetensors checkpoints in the Hugging Face layout: one
``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards and a
``model.safetensors.index.json`` whose ``weight_map`` names each tensor's shard.

``parse_size``: the one grammar of ``max_shard_size``. ``SafetensorsReader``: names, shapes,
dtypes and (sliced) reads of a single-file or sharded checkpoint, from the headers only
until a tensor is read. ``ShardWriter`` + ``finish``: streaming sharded writes.

The writer streams: tensors are added one at a time and a shard is written as soon as the
next tensor would exceed the limit, so peak memory is one shard, not the whole model.
``huggingface_hub.split_torch_state_dict_into_shards`` plans shards for a whole state dict
held in memory, so it does not fit; its file-name constants and its sharding rule (a
tensor larger than the limit gets a shard of its own) are used here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE_FILE = SAFETENSORS_SINGLE_FILE  # "model.safetensors"
INDEX_FILE = SAFETENSORS_INDEX_FILE  # "model.safetensors.index.json"
SHARD_FILE = "model-{number:05d}-of-{count:05d}.safetensors"  # number counts from 1
# What save_file writes into every header; transformers reads "pt" as a PyTorch checkpoint.
METADATA = {"format": "pt"}
# The floating dtypes a checkpoint's weights may have, by the name safetensors' headers use.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# ---- sizes ---------------------------------------------------------------------------------

# Decimal units are powers of 10 and binary ones powers of 2, as in Hugging Face's
# ``max_shard_size``; huggingface_hub's ``parse_size_to_int`` knows only the decimal ones.
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_FORMS = "an int of bytes, or a number with a unit: 5GB, 500MB, 64KB, 1.5GB (powers of 10), 500MiB, 2GiB (powers of 2)"


def parse_size(size: int | str, argument: str = "max_shard_size") -> int:
    """Bytes in ``size``: a positive int, or a string such as ``"5GB"`` (5 * 10^9),
    ``"500MiB"`` (500 * 2^20) or ``"1.5 GB"``; units are case-insensitive."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", size)) \
            and match.group(2).upper() in _SIZE_UNITS:
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    else:
        raise ValueError(f"{argument}={size!r} is not a size (allowed: {_SIZE_FORMS})")
    if value <= 0:
        raise ValueError(f"{argument}={size!r} must be a positive size (allowed: {_SIZE_FORMS})")
    return value


# ---- reading -------------------------------------------------------------------------------


def _open(path: Path):
    """``safe_open(path)``, with a truncated, corrupted or unreadable file reported as a
    ValueError that names it (safetensors checks the header against the file size here)."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read the safetensors file {path}: {err}") from err


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "BF16", ...


class SafetensorsReader:
    """Tensors of a checkpoint directory (``model.safetensors``, or shards and their index)
    or of one ``.safetensors`` file.

    Every file's header is read when the reader is made, so a missing shard, a corrupted or
    truncated file, or an index naming a tensor its shard lacks is an error before any data
    is read. Data is read one tensor (or slice) at a time, each read opening its file
    afresh, so memory holds only what was asked for. ``label`` says which checkpoint this
    is in error messages (e.g. "the upper checkpoint")."""

    def __init__(self, path: str | os.PathLike, label: str = "checkpoint") -> None:
        self.path = Path(path)
        self.label = label
        self.directory = self.path if self.path.is_dir() else self.path.parent
        self.index_file: Path | None = None
        self.tensors: dict[str, TensorInfo] = {}
        self._files: list[Path] = []
        if self.path.is_file():
            self._read_headers({self.path: None})
        elif (self.path / INDEX_FILE).is_file():
            self.index_file = self.path / INDEX_FILE
            weight_map = self._weight_map(self.index_file)
            shards: dict[Path, list[str]] = {}
            for name, file in weight_map.items():
                shards.setdefault(self.path / file, []).append(name)
            self._read_headers(shards)
            self.tensors = {name: self.tensors[name] for name in weight_map}
        elif (self.path / SINGLE_FILE).is_file():
            self._read_headers({self.path / SINGLE_FILE: None})
        else:
            raise ValueError(f"{label} {self.path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")

    def _weight_map(self, index: Path) -> dict[str, str]:
        """The index's map from tensor name to shard file, every shard checked present."""
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError) as err:  # not JSON, or JSON but not an object
            weight_map, cause = None, err
        else:
            cause = None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} is not a safetensors index (a JSON object whose 'weight_map' "
                             f"maps tensor names to shard files)") from cause
        for file in dict.fromkeys(weight_map.values()):
            if not (self.path / file).is_file():
                raise ValueError(f"{index} names the shard {file}, which does not exist in {self.path}")
        return weight_map

    def _read_headers(self, files: dict[Path, list[str] | None]) -> None:
        """Shapes and dtypes of ``files``' tensors (all of them when the list is None)."""
        self._files = sorted(files)
        for file, wanted in files.items():
            with _open(file) as handle:
                present = set(handle.keys())
                for name in wanted if wanted is not None else handle.keys():
                    if name not in present:
                        raise ValueError(f"{self.index_file} maps tensor {name!r} to {file.name}, which "
                                         f"does not hold it")
                    tensor_slice = handle.get_slice(name)
                    self.tensors[name] = TensorInfo(file, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        """Tensor names, in index (or file) order."""
        return list(self.tensors)

    def files(self) -> list[Path]:
        """The safetensors files, sorted (shards in order)."""
        return list(self._files)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ValueError(f"tensor {name!r} is missing from {self.label} {self.path}")
        return self.tensors[name]

    def file_of(self, name: str) -> Path:
        return self.info(name).file

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """safetensors' dtype name ("F32", "BF16", ...), from the header."""
        return self.info(name).dtype

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor ``name``, or only ``tensor[index]`` (read with ``get_slice``: the
        rest of the tensor is never loaded)."""
        file = self.file_of(name)
        with _open(file) as handle:
            if index is None or all(s == slice(None) for s in index):
                return handle.get_tensor(name)
            return handle.get_slice(name)[index]


# ---- writing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One written shard under its temporary name: ``finish`` gives it its final name."""

    file: str  # relative to the output directory
    names: tuple[str, ...]
    nbytes: int


class ShardWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_size`` bytes of data
    (a larger tensor gets a shard of its own), holding only the current shard in memory.

    Shards are written under temporary names ``{prefix}{k:05d}.safetensors`` in
    ``directory``; ``close`` returns them as ``Part``s, and ``finish`` (given the parts of
    every writer, in model order) renames them and writes the index. Several writers (one
    per pipeline stage, on different ranks) may write into one directory with different
    prefixes, and one process calls ``finish`` with all their parts."""

    def __init__(self, directory: str | os.PathLike, max_shard_size: int | str,
                 prefix: str = ".tmp-part-") -> None:
        self.directory = Path(directory)
        self.max_bytes = parse_size(max_shard_size)
        self.prefix = prefix
        self.parts: list[Part] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        # Pending tensors wait on the CPU: a device tensor would hold device memory until flushed.
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        file = f"{self.prefix}{len(self.parts):05d}.safetensors"
        save_file(self._pending, str(self.directory / file), metadata=METADATA)
        self.parts.append(Part(file, tuple(self._pending), self._pending_bytes))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Part]:
        """Write the last shard; the parts this writer wrote, in order."""
        if self._pending:
            self._flush()
        return list(self.parts)


def finish(directory: str | os.PathLike, parts: list[Part]) -> list[Path]:
    """Rename ``parts`` (in model order) to their final names: ``model.safetensors`` when
    there is one, else ``model-0000k-of-0000n.safetensors`` and the index (weight map in
    model order, ``metadata.total_size`` = bytes of tensor data). Returns the files."""
    if not parts:
        raise ValueError(f"no tensors were written to {directory}: a checkpoint needs at least one")
    out = Path(directory)
    if len(parts) == 1:
        os.replace(out / parts[0].file, out / SINGLE_FILE)
        return [out / SINGLE_FILE]
    finals, weight_map = [], {}
    for number, part in enumerate(parts, start=1):
        final = out / SHARD_FILE.format(number=number, count=len(parts))
        os.replace(out / part.file, final)
        finals.append(final)
        weight_map.update(dict.fromkeys(part.names, final.name))
    index = {"metadata": {"total_size": sum(p.nbytes for p in parts)}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return finals


def write_sharded(directory: str | os.PathLike, tensors, max_shard_size: int | str) -> list[Path]:
    """Write ``(name, tensor)`` pairs (an iterable, consumed one at a time) as a checkpoint
    in ``directory`` (which must exist); one shard at a time is held in memory."""
    writer = ShardWriter(directory, max_shard_size)
    for name, tensor in tensors:
        writer.add(name, tensor)
    return finish(directory, writer.close())
