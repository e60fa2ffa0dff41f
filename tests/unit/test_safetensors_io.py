"""``splitllama.checkpoint.safetensors_io``: the size grammar, the reader on single-file and sharded
checkpoints (and every broken input naming the file), and the streaming sharded writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from splitllama.checkpoint.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsReader,
    ShardWriter,
    finish,
    parse_size,
    write_sharded,
)

# ---- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), [
    (1234, 1234),
    ("1234", 1234),
    ("10B", 10),
    ("64KB", 64 * 10**3),
    ("500MB", 500 * 10**6),
    ("5GB", 5 * 10**9),
    ("1.5GB", 1_500_000_000),
    ("1.5 GB", 1_500_000_000),
    (" 5gb ", 5 * 10**9),
    ("2TB", 2 * 10**12),
    ("64KiB", 64 * 2**10),
    ("500MiB", 500 * 2**20),
    ("2GiB", 2 * 2**30),
    ("1TiB", 2**40),
])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "", "5 G B", "-5GB", "1e9", "5GBB", 1.5, None, True])
def test_parse_size_refuses_what_is_not_a_size(size):
    with pytest.raises(ValueError, match=r"max_shard_size=.* is not a size \(allowed: an int of bytes, .*500MiB"):
        parse_size(size)


@pytest.mark.parametrize("size", [0, -1, "0", "0.0001KB"])
def test_parse_size_refuses_sizes_below_one_byte(size):
    with pytest.raises(ValueError, match=r"max_shard_size=.* must be a positive size"):
        parse_size(size)


# ---- writing and reading -------------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    """Model order; 4000 + 400 + 4000 + 2 + 40000 + 4000 bytes of data."""
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 100, generator=gen),
        "layers.0.norm": torch.randn(100, generator=gen),
        "layers.0.proj": torch.randn(100, 10, generator=gen),
        "layers.0.scale": torch.randn(1, generator=gen, dtype=torch.bfloat16),
        "layers.1.big": torch.randn(100, 100, generator=gen),  # larger than the limit below
        "head.weight": torch.randn(10, 100, generator=gen, dtype=torch.float64)[:, ::2],  # non-contiguous
    }


def test_writer_shards_at_the_limit_and_round_trips(tmp_path):
    tensors = _tensors()
    files = write_sharded(tmp_path, iter(tensors.items()), "5KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    # Greedy in model order: a tensor that would overflow the shard starts a new one, and one
    # larger than the limit gets a shard of its own.
    expected_shards = [["embed.weight", "layers.0.norm"], ["layers.0.proj", "layers.0.scale"],
                       ["layers.1.big"], ["head.weight"]]
    names = [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    assert [f.name for f in files] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, INDEX_FILE])  # no temporary files
    assert list(index["weight_map"]) == list(tensors)  # model order
    assert index["weight_map"] == {n: names[k] for k, shard in enumerate(expected_shards) for n in shard}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, shard in zip(names, expected_shards):
        with safe_open(tmp_path / name, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"} and sorted(handle.keys()) == sorted(shard)
    reader = SafetensorsReader(tmp_path)
    assert reader.names() == list(tensors) and reader.files() == files
    for name, tensor in tensors.items():
        got = reader.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert reader.shape(name) == tuple(tensor.shape)
    assert reader.dtype("layers.0.scale") == "BF16" and reader.file_of("layers.1.big") == tmp_path / names[2]


def test_one_shard_is_a_single_file_without_index(tmp_path):
    tensors = _tensors()
    assert write_sharded(tmp_path, tensors.items(), "1GB") == [tmp_path / SINGLE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    reader = SafetensorsReader(tmp_path)
    assert sorted(reader.names()) == sorted(tensors) and reader.files() == [tmp_path / SINGLE_FILE]
    assert all(torch.equal(reader.read(n), t) for n, t in tensors.items())
    # A file path reads the same as its directory.
    assert SafetensorsReader(tmp_path / SINGLE_FILE).names() == reader.names()


def test_reader_reads_slices(tmp_path):
    tensors = _tensors()
    write_sharded(tmp_path, tensors.items(), "5KB")
    reader = SafetensorsReader(tmp_path)
    big = tensors["layers.1.big"]
    assert torch.equal(reader.read("layers.1.big", (slice(20, 40),)), big[20:40])
    assert torch.equal(reader.read("layers.1.big", (slice(None), slice(50, 100))), big[:, 50:])
    assert torch.equal(reader.read("layers.1.big", (slice(None), slice(None))), big)


def test_writers_of_several_stages_finish_together(tmp_path):
    """Each pipeline stage's writer (another rank, in production) writes its parts under its
    own temporary prefix; one process then names them all in model order."""
    tensors = list(_tensors().items())
    stage0 = ShardWriter(tmp_path, "5KB", prefix=".stage000-part")
    stage1 = ShardWriter(tmp_path, "5KB", prefix=".stage001-part")
    for name, tensor in tensors[:3]:
        stage0.add(name, tensor)
    for name, tensor in tensors[3:]:
        stage1.add(name, tensor)
    parts = stage1.close() + stage0.close()
    assert all((tmp_path / p.file).is_file() for p in parts)
    files = finish(tmp_path, sorted(parts, key=lambda p: p.file))
    assert len(files) == 5 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reader = SafetensorsReader(tmp_path)
    assert reader.names() == [name for name, _ in tensors]
    assert all(torch.equal(reader.read(n), t) for n, t in tensors)


def test_finish_without_parts_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no tensors were written"):
        finish(tmp_path, ShardWriter(tmp_path, "1GB").close())


# ---- broken checkpoints --------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A 4-shard checkpoint of ``_tensors``."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    write_sharded(directory, _tensors().items(), "5KB")
    return directory


def test_no_checkpoint_in_directory(tmp_path):
    with pytest.raises(ValueError, match=rf"the upper checkpoint {tmp_path} holds neither model.safetensors nor "
                                         r"model.safetensors.index.json"):
        SafetensorsReader(tmp_path, label="the upper checkpoint")


def test_missing_shard_names_the_shard(sharded):
    (sharded / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(ValueError, match=r"index.json names the shard model-00002-of-00004.safetensors, "
                                         r"which does not exist"):
        SafetensorsReader(sharded)


def test_index_naming_a_tensor_its_shard_lacks(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["weight_map"]["layers.0.norm"] = "model-00003-of-00004.safetensors"
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"maps tensor 'layers.0.norm' to model-00003-of-00004.safetensors, "
                                         r"which does not hold it"):
        SafetensorsReader(sharded)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": {"a": 3}}'])
def test_malformed_index_names_the_index(sharded, content):
    (sharded / INDEX_FILE).write_text(content)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a safetensors index"):
        SafetensorsReader(sharded)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{garbage" + data[16:])  # the 8 bytes after the length are JSON


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _corrupt_header, _empty])
@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_damaged_file_is_a_value_error_naming_it(tmp_path, damage, layout):
    limit = "5KB" if layout == "sharded" else "1GB"
    write_sharded(tmp_path, _tensors().items(), limit)
    victim = tmp_path / ("model-00003-of-00004.safetensors" if layout == "sharded" else SINGLE_FILE)
    damage(victim)
    with pytest.raises(ValueError, match=rf"cannot read the safetensors file {victim}: "):
        SafetensorsReader(tmp_path)


def test_file_damaged_after_the_reader_was_made(sharded):
    reader = SafetensorsReader(sharded)
    _truncate(sharded / "model-00001-of-00004.safetensors")
    with pytest.raises(ValueError, match=r"cannot read the safetensors file .*model-00001-of-00004.safetensors"):
        reader.read("embed.weight")


def test_missing_tensor_names_tensor_and_checkpoint(sharded):
    reader = SafetensorsReader(sharded, label="the lower checkpoint")
    with pytest.raises(ValueError, match=rf"tensor 'nope' is missing from the lower checkpoint {sharded}"):
        reader.read("nope")
    assert "nope" not in reader and "embed.weight" in reader


def test_names_follow_the_index_order(sharded):
    """Not grouped by shard: an index may list its tensors in any order (HF sorts them)."""
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    assert SafetensorsReader(sharded).names() == sorted(_tensors())
