"""Checking a split checkpoint directory without loading it: its config and every
tensor's name and shape from the safetensors headers. Imports neither megatron nor the
model, so the ``splitllama`` command refuses a bad directory before it launches any
process; ``split.load_checkpoint`` runs the same checks (and ``check_config``, the model's
config against the checkpoint's). ``config_fields`` needs the standard library only
(transformers and torch are imported by the functions that use them), so a path that
holds no checkpoint at all is refused before either is imported.
``check_finite`` reads the weights, one tensor at a time, for NaN and Inf.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitllama import weight_names as wn
    from splitllama.checkpoint.safetensors_io import SafetensorsReader
    from splitllama.config import CustomSplitLlamaConfig


def check_model_type(model_type, where: str) -> None:
    """Refuse a config of another model type, naming where it came from; a plain Llama
    config (the usual mistake) gets the way to a split checkpoint."""
    from splitllama.config import CustomSplitLlamaConfig

    if model_type != CustomSplitLlamaConfig.model_type:
        hint = (": make a split checkpoint with `splitllama assemble` first" if model_type == "llama" else "")
        raise ValueError(f"{where} has model_type={model_type!r}, expected "
                         f"{CustomSplitLlamaConfig.model_type!r}{hint}")


def config_fields(directory: str | os.PathLike) -> dict[str, Any]:
    """The fields of ``directory/config.json``, or a ValueError that says what is wrong with
    the path (missing directory or config.json, not JSON, not a JSON object)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json")
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(fields).__name__}")
    return fields


def read_split_config(directory: str | os.PathLike) -> CustomSplitLlamaConfig:
    """The split config of a checkpoint directory, or a ValueError that says what is wrong
    with it (``config_fields``'s refusals, not a split checkpoint)."""
    from splitllama.config import CustomSplitLlamaConfig

    directory = Path(directory)
    path = directory / "config.json"
    check_model_type(config_fields(directory).get("model_type"), str(path))
    try:
        return CustomSplitLlamaConfig.from_pretrained(directory)
    except ValueError as err:  # names the field
        raise ValueError(f"{path}: {err}") from None
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid split config ({type(err).__name__}: {err})") from None


# Every config field that changes the math, which a checkpoint's config must share with
# the model it is loaded into: shapes are also checked tensor by tensor, but the norm
# epsilons, rope settings, the adapter kind and the upper stack's depth (the index offset
# of its layers) show in no tensor. Other fields are either refused by validation when not
# Llama-3's (hidden_act, biases, tied embeddings) or do not enter the computation.
_TOP_FIELDS = ("num_layers_8", "num_layers_70", "mlp", "vocab_size", "rms_norm_eps")
_SUB_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "rms_norm_eps", "rope_parameters", "num_hidden_layers", "vocab_size",
               "hidden_act", "attention_bias", "mlp_bias")


def check_config(model_config: CustomSplitLlamaConfig, directory: str | os.PathLike) -> None:
    """Refuse a checkpoint whose config differs from the model's in a field that changes the
    math (``_TOP_FIELDS``, ``_SUB_FIELDS``), naming the field."""
    saved = read_split_config(directory)
    for field in _TOP_FIELDS:
        if getattr(saved, field) != getattr(model_config, field):
            raise ValueError(
                f"checkpoint {directory}: {field}={getattr(saved, field)!r} but the model was "
                f"built with {field}={getattr(model_config, field)!r}"
            )
    for which in ("lower_config", "upper_config"):
        for field in _SUB_FIELDS:
            a, b = (getattr(getattr(config, which), field, None) for config in (saved, model_config))
            if a != b:
                raise ValueError(
                    f"checkpoint {directory}: {which}.{field}={a!r} but the model was built "
                    f"with {which}.{field}={b!r}"
                )


class BrokenCheckpointError(ValueError):
    """A checkpoint whose weights themselves are unusable (NaN or Inf in a tensor)."""


def check_finite(directory: str | os.PathLike) -> None:
    """Raise ``BrokenCheckpointError`` naming the first tensor (in name order) that holds
    NaN or Inf. Reads every tensor once, one at a time."""
    import torch

    from splitllama.checkpoint.safetensors_io import SafetensorsReader

    reader = SafetensorsReader(directory)
    for name in sorted(reader.names()):
        tensor = reader.read(name)
        if not tensor.is_floating_point():
            continue
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        if nan or inf:
            found = " and ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "Inf")) if count)
            raise BrokenCheckpointError(
                f"checkpoint {reader.directory} is broken: tensor {name} {tuple(tensor.shape)} holds {found} "
                f"of {tensor.numel()} values (in {reader.file_of(name).name})"
            )


def validate_checkpoint_dir(directory: str | os.PathLike, head: wn.Head = "lm",
                            fresh_value_head: bool = False) -> CustomSplitLlamaConfig:
    """Check a split checkpoint without reading any weight: its config, and every
    tensor's name and shape from the safetensors headers. Returns the config."""
    from splitllama.checkpoint.safetensors_io import SafetensorsReader

    config = read_split_config(directory)
    check_tensors(SafetensorsReader(directory), config, head, fresh_value_head)
    return config


def _listing(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def check_tensors(reader: SafetensorsReader, config, head: wn.Head, fresh_value_head: bool) -> None:
    from splitllama import weight_names as wn

    expected = wn.split_checkpoint_shapes(config, head)
    present = set(reader.names())
    ignored: set[str] = set()
    if head == "value" and fresh_value_head:
        expected.pop(wn.VALUE_HEAD)
        ignored = {wn.LM_HEAD, wn.VALUE_HEAD}
    elif head == "value" and wn.VALUE_HEAD not in present and wn.LM_HEAD in present:
        raise ValueError(
            f"{reader.directory} is a CausalLM checkpoint ({wn.LM_HEAD}, no {wn.VALUE_HEAD}): to start "
            "a value model (critic) from it with a freshly initialised value head, pass fresh_value_head=True"
        )
    elif head == "lm" and wn.VALUE_HEAD in present and wn.LM_HEAD not in present:
        raise ValueError(f"{reader.directory} is a value checkpoint ({wn.VALUE_HEAD}, no {wn.LM_HEAD}): "
                         "load it into a value model (head 'value')")
    missing = set(expected) - present
    unexpected = present - set(expected) - ignored
    if missing:
        raise ValueError(f"checkpoint {reader.directory} is missing tensors: {_listing(missing)}")
    if unexpected:
        raise ValueError(f"checkpoint {reader.directory} has unexpected tensors: {_listing(unexpected)}")
    for name, shape in expected.items():
        found = reader.shape(name)
        if found != tuple(shape):
            raise ValueError(
                f"checkpoint {reader.directory}: tensor {name} has shape {found}, expected {tuple(shape)}"
            )
