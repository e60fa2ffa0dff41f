"""The Custom Split LLaMA configuration, its validation, and named shape presets.

A split model is: embedding (lower) -> ``num_layers_8`` lower Llama layers -> adapter
``h_lo -> h_hi`` -> the LAST ``num_layers_70`` layers of the upper Llama -> final RMSNorm
(top-level ``rms_norm_eps``) -> LM head or value head.

Two on-disk forms are accepted:

* by path: ``path8b`` / ``path70b`` name directories holding the lower / upper
  Llama ``config.json``; they are read ONCE, when the config is loaded;
* self-contained: ``lower_config`` / ``upper_config`` embed both Llama configs. This is
  what this project writes, so that no model constructor ever touches the file system.

The config also answers the standard Hugging Face fields that generic tooling reads
(``hidden_size``, ``num_hidden_layers``, heads, ``max_position_embeddings``): they are
derived from the fields above, read-only, written to ``config.json`` for readers of the raw
file, and checked against the architecture when a config is loaded. ``lower_config`` and
``upper_config`` are declared sub-configs, so ``attn_implementation`` and ``dtype`` reach them.

This module is data only (no megatron import): the oracle reads it too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from typing import Any

from huggingface_hub.errors import StrictDataclassError, StrictDataclassFieldValidationError
from transformers import AutoConfig, LlamaConfig, PreTrainedConfig

MODEL_TYPE = "custom_split_llama"
CAUSAL_LM_ARCH = "CustomSplitLLamaForCausalLM"
VALUE_ARCH = "CustomSplitLLamaForTokenClassification"

SUPPORTED_ROPE_TYPES = ("default", "llama3")
# The llama3 rope-scaling fields (meta-llama/Llama-3.1-*/config.json values); any values
# are honoured, these are the published ones.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_LLAMA3_ROPE = {"rope_type": "default", "rope_theta": 500000.0}
_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Published shapes of the Llama-3 family (meta-llama/*/config.json).
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_parameters=_LLAMA3_ROPE,
    ),
    "llama3-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_parameters=_LLAMA3_ROPE,
    ),
}
PRESETS["llama3.1-8b"] = dict(
    PRESETS["llama3-8b"], max_position_embeddings=131072, rope_parameters=_LLAMA31_ROPE
)
PRESETS["llama3.1-70b"] = dict(
    PRESETS["llama3-70b"], max_position_embeddings=131072, rope_parameters=_LLAMA31_ROPE
)

# Tiny test shapes derived from the real ones: same GQA ratio (4:1 for 8B, 8:1 for 70B),
# same FFN ratio (3.5), same rope settings; 2 KV heads so that TP=2 divides them.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama3.1-8b": dict(base="llama3.1-8b", hidden_size=64, head_dim=8,
                             num_key_value_heads=2, num_hidden_layers=4),
    "tiny-llama3.1-70b": dict(base="llama3.1-70b", hidden_size=128, head_dim=8,
                              num_key_value_heads=2, num_hidden_layers=6),
}
TINY_VOCAB = 256

# The standard top-level fields, derived from the two stacks (see CustomSplitLlamaConfig):
# name -> what it is derived from, for error messages.
DERIVED_FIELDS: dict[str, str] = {
    "hidden_size": "upper_config.hidden_size (the width of the trunk's output)",
    "num_hidden_layers": "num_layers_8 + num_layers_70 (decoder layers = KV-cache layers)",
    "num_attention_heads": "upper_config.num_attention_heads",
    "num_key_value_heads": "upper_config.num_key_value_heads",
    "head_dim": "upper_config.head_dim",
    "intermediate_size": "upper_config.intermediate_size",
    "max_position_embeddings": "min(lower_config, upper_config).max_position_embeddings",
    "initializer_range": "upper_config.initializer_range",
}


class _OncePerProcess(logging.Filter):
    """Lets each distinct message through once. transformers re-validates a Llama config's
    rope settings every time one is built, and a split model builds its two stacks' configs
    many times (load, save, each pipeline chunk, the oracle): a Llama-3.1 checkpoint whose
    max_position_embeddings is at most original_max_position_embeddings got the same
    warning 8 times per check, 34 times at TP=2 x PP=2."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


ROPE_LOGGER = "transformers.modeling_rope_utils"
if not any(isinstance(f, _OncePerProcess) for f in logging.getLogger(ROPE_LOGGER).filters):
    logging.getLogger(ROPE_LOGGER).addFilter(_OncePerProcess())


def llama_preset(name: str, **overrides: Any) -> LlamaConfig:
    """A ``LlamaConfig`` of a named preset (real or tiny), with optional overrides."""
    if name in PRESETS:
        kwargs = copy.deepcopy(PRESETS[name])
    elif name in TINY_PRESETS:
        tiny = dict(TINY_PRESETS[name])
        base = PRESETS[tiny.pop("base")]
        hidden, head_dim, kv = tiny["hidden_size"], tiny["head_dim"], tiny["num_key_value_heads"]
        gqa = base["num_attention_heads"] // base["num_key_value_heads"]
        ffn_ratio = base["intermediate_size"] / base["hidden_size"]
        kwargs = copy.deepcopy(base)
        kwargs.update(
            hidden_size=hidden, head_dim=head_dim, num_key_value_heads=kv,
            num_attention_heads=kv * gqa, intermediate_size=int(hidden * ffn_ratio),
            num_hidden_layers=tiny["num_hidden_layers"], vocab_size=TINY_VOCAB,
        )
        if kwargs["num_attention_heads"] * head_dim != hidden:
            raise AssertionError(f"tiny preset {name} is inconsistent: {kwargs}")
    else:
        raise ValueError(
            f"unknown preset {name!r}; allowed: {sorted(PRESETS) + sorted(TINY_PRESETS)}"
        )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _as_llama_config(value: Any, field: str) -> LlamaConfig | None:
    if value is None or isinstance(value, LlamaConfig):
        return value
    if isinstance(value, PreTrainedConfig):
        raise ValueError(f"{field} must be a Llama config, got model_type={value.model_type!r}")
    if isinstance(value, dict):
        kwargs = dict(value)
        model_type = kwargs.pop("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{field} must be a Llama config, got model_type={model_type!r}")
        kwargs.pop("transformers_version", None)
        with llama_config_errors(field):
            return LlamaConfig(**kwargs)
    raise ValueError(f"{field} must be a dict or LlamaConfig, got {type(value).__name__}")


@contextlib.contextmanager
def llama_config_errors(field: str, in_file: str | None = None):
    """Turn transformers' strict-dataclass errors about a Llama config (a field of the
    wrong type, fields that contradict each other) into one ValueError naming the field
    as it is written in the file: ``lower_config.num_attention_heads: ...``, or, for a
    config of its own (``in_file``), ``<in_file>: num_attention_heads: ...``."""
    try:
        yield
    except StrictDataclassError as err:
        cause = err.__cause__ or err
        detail = str(cause).splitlines()[-1].strip()
        where = f"{in_file}: " if in_file else f"{field}."
        if isinstance(err, StrictDataclassFieldValidationError):
            name = re.search(r"field '([^']+)'", str(err))
            detail = re.sub(r"^Field '[^']+' ", "", detail)
            raise ValueError(f"{where}{name.group(1) if name else '?'}: {detail}") from None
        raise ValueError(f"{in_file or field} is inconsistent: {detail}") from None


class CustomSplitLlamaConfig(PreTrainedConfig):
    """Config of a Custom Split LLaMA (``model_type: custom_split_llama``).

    Fields of the checkpoint format: ``vocab_size``, ``rms_norm_eps`` (final norm),
    ``num_layers_8`` (N lower layers, taken from the start of the lower model),
    ``num_layers_70`` (M upper layers, taken from the END of the upper model), ``mlp``
    (adapter kind), ``path8b`` / ``path70b``. Embedded sub-configs win over paths.
    """

    model_type = MODEL_TYPE
    # Declared sub-configs: transformers sets attn_implementation and dtype on them too. A
    # plain class dict, which transformers 5.17 reads as is and 5.24 reads in place of its
    # `sub_configs_defaults` (that one would also save the sub-configs as diffs against
    # LlamaConfig's defaults and build default ones when they are missing).
    sub_configs = {"lower_config": LlamaConfig, "upper_config": LlamaConfig}

    vocab_size: int | None = None
    rms_norm_eps: float | None = None
    num_layers_8: int | None = None
    num_layers_70: int | None = None
    mlp: bool = False
    path8b: str | None = None
    path70b: str | None = None
    lower_config: dict | LlamaConfig | None = None
    upper_config: dict | LlamaConfig | None = None
    tie_word_embeddings: bool = False
    # Standard Hugging Face field: forward builds a KV cache when use_cache is not passed.
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        # Derived fields found in a loaded dict are checked below, never stored.
        derived = {name: kwargs.pop(name) for name in DERIVED_FIELDS if name in kwargs}
        self.lower_config = _as_llama_config(self.lower_config, "lower_config")
        self.upper_config = _as_llama_config(self.upper_config, "upper_config")
        if self.lower_config is None and self.path8b is not None:
            self.lower_config = _read_llama_config(self.path8b, "path8b")
        if self.upper_config is None and self.path70b is not None:
            self.upper_config = _read_llama_config(self.path70b, "path70b")
        for sub in (self.lower_config, self.upper_config):
            if sub is not None:
                # LlamaConfig's tensor/pipeline plans name `layers.*`, `embed_tokens`, `norm`
                # of LlamaModel; no class here has that module tree (layers_first,
                # layers_last, adapter) or shards like that, so none is declared.
                sub.base_model_tp_plan = None
                sub.base_model_pp_plan = None
        super().__post_init__(**kwargs)
        if self.lower_config is not None or self.upper_config is not None:
            self.check_split()
        for name, value in derived.items():
            if self.lower_config is None or self.upper_config is None:
                raise ValueError(f"{name} is given but lower_config/upper_config are missing: "
                                 f"{name} is derived from {DERIVED_FIELDS[name]}")
            if value != getattr(self, name):
                raise ValueError(
                    f"{name}={value!r} disagrees with the architecture: it is derived from "
                    f"{DERIVED_FIELDS[name]} = {getattr(self, name)!r} (edit those fields instead)"
                )

    def __setattr__(self, key: str, value: Any) -> None:
        if key in DERIVED_FIELDS:
            # `from_pretrained(path, num_hidden_layers=3)` and generic tools set these: the
            # value is honoured only when it is what the architecture already gives.
            if value != getattr(self, key):
                raise ValueError(
                    f"{key}={value!r} cannot be set: it is derived from {DERIVED_FIELDS[key]} "
                    f"= {getattr(self, key)!r} (set those fields instead)"
                )
            return
        super().__setattr__(key, value)
        # One vocabulary for the embedding (lower) and the LM head (upper): a new vocab_size
        # (resize_token_embeddings sets it) applies to both sub-configs, so they never go stale.
        if key == "vocab_size" and value is not None:
            for field in ("lower_config", "upper_config"):
                sub = self.__dict__.get(field)
                if isinstance(sub, LlamaConfig):
                    sub.vocab_size = value

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the derived standard fields (when both sub-configs are there)."""
        out = super().to_dict()
        if isinstance(self.lower_config, LlamaConfig) and isinstance(self.upper_config, LlamaConfig):
            out.update({name: getattr(self, name) for name in DERIVED_FIELDS})
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load ``config.json``; relative ``path8b``/``path70b`` are resolved against its
        directory. The sub-configs are read here, once, and embedded."""
        root = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(root):
            config_dict, extra = cls.get_config_dict(root, *args, **kwargs)
            for key in ("path8b", "path70b"):
                path = config_dict.get(key)
                if path and not os.path.isabs(path):
                    config_dict[key] = os.path.join(root, path)
            return cls.from_dict(config_dict, **extra)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_llama_configs(
        cls,
        lower: LlamaConfig,
        upper: LlamaConfig,
        num_lower: int,
        num_upper: int,
        mlp: bool = False,
        rms_norm_eps: float | None = None,
        **kwargs: Any,
    ) -> CustomSplitLlamaConfig:
        return cls(
            vocab_size=lower.vocab_size,
            rms_norm_eps=upper.rms_norm_eps if rms_norm_eps is None else rms_norm_eps,
            num_layers_8=num_lower,
            num_layers_70=num_upper,
            mlp=mlp,
            lower_config=copy.deepcopy(lower),
            upper_config=copy.deepcopy(upper),
            architectures=[CAUSAL_LM_ARCH],
            **kwargs,
        )

    # ---- derived quantities ------------------------------------------------------------
    @property
    def lower(self) -> LlamaConfig:
        return self.lower_config

    @property
    def upper(self) -> LlamaConfig:
        return self.upper_config

    @property
    def num_lower(self) -> int:
        return self.num_layers_8

    @property
    def num_upper(self) -> int:
        return self.num_layers_70

    @property
    def h_lo(self) -> int:
        return self.lower_config.hidden_size

    @property
    def h_hi(self) -> int:
        return self.upper_config.hidden_size

    # ---- standard Hugging Face fields (read-only; see DERIVED_FIELDS) ------------------
    @property
    def hidden_size(self) -> int:
        return self.upper_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers_8 + self.num_layers_70

    @property
    def num_attention_heads(self) -> int:
        return self.upper_config.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.upper_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.upper_config.head_dim

    @property
    def intermediate_size(self) -> int:
        return self.upper_config.intermediate_size

    @property
    def max_position_embeddings(self) -> int:
        return min(self.lower_config.max_position_embeddings, self.upper_config.max_position_embeddings)

    @property
    def initializer_range(self) -> float:
        return self.upper_config.initializer_range

    @property
    def upper_layer_offset(self) -> int:
        """Global index, in the upper checkpoint, of split upper layer 0."""
        return self.upper_config.num_hidden_layers - self.num_layers_70

    # ---- validation --------------------------------------------------------------------
    def validate(self) -> None:
        """transformers' own checks (it runs them when a config is saved), then the split's
        (``check_split``), which a config made without its stacks (``CustomSplitLlamaConfig()``,
        as transformers' tools make one before filling it in) is spared until a model is
        built from it."""
        super().validate()
        if self.lower_config is not None or self.upper_config is not None:
            self.check_split()

    def check_split(self) -> None:
        """Refuse an incomplete or inconsistent split config with a message that names the
        field: what every model built from it checks first."""
        for field in ("lower_config", "upper_config"):
            if getattr(self, field) is None:
                path_field = "path8b" if field == "lower_config" else "path70b"
                raise ValueError(f"{field} is missing: embed it or set {path_field}")
        for field, sub in (("lower_config", self.lower), ("upper_config", self.upper)):
            _validate_llama(sub, field)
        for field, count, sub, name in (
            ("num_layers_8", self.num_layers_8, self.lower, "lower"),
            ("num_layers_70", self.num_layers_70, self.upper, "upper"),
        ):
            if not isinstance(count, int) or isinstance(count, bool):
                raise ValueError(f"{field} must be an int, got {count!r}")
            if not 1 <= count <= sub.num_hidden_layers:
                raise ValueError(
                    f"{field}={count} is out of range: the {name} model has "
                    f"{sub.num_hidden_layers} layers (allowed 1..{sub.num_hidden_layers})"
                )
        if self.vocab_size is None:
            self.vocab_size = self.lower.vocab_size
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {self.vocab_size!r}")
        for field, sub in (("lower_config", self.lower), ("upper_config", self.upper)):
            if sub.vocab_size != self.vocab_size:
                raise ValueError(
                    f"vocab_size={self.vocab_size} differs from {field}.vocab_size="
                    f"{sub.vocab_size}: embedding and LM head must share one vocabulary"
                )
        if self.rms_norm_eps is None:
            self.rms_norm_eps = self.upper.rms_norm_eps
        if not isinstance(self.rms_norm_eps, (int, float)) or isinstance(self.rms_norm_eps, bool) \
                or not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not isinstance(self.mlp, bool):
            raise ValueError(f"mlp must be true or false, got {self.mlp!r}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be false: embedding and LM head come "
                             "from different checkpoints")


def _read_llama_config(path: str, field: str) -> LlamaConfig:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{field}={path!r} (resolved to {os.path.abspath(path)!r}) does not hold a "
            "config.json; relative paths are resolved against the split config's directory "
            "by CustomSplitLlamaConfig.from_pretrained and against the working directory "
            "otherwise"
        )
    with llama_config_errors(field):
        return LlamaConfig.from_pretrained(path)


def _validate_llama(sub: LlamaConfig, field: str) -> None:
    if sub.hidden_act != "silu":
        raise ValueError(f"{field}.hidden_act={sub.hidden_act!r} is not supported (allowed: 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(sub, flag, False):
            raise ValueError(f"{field}.{flag}=true is not supported (Llama-3 has no biases)")
    if sub.num_attention_heads % sub.num_key_value_heads:
        raise ValueError(
            f"{field}.num_attention_heads={sub.num_attention_heads} is not a multiple of "
            f"{field}.num_key_value_heads={sub.num_key_value_heads}"
        )
    rope = rope_parameters(sub)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{field}.rope_parameters.rope_type={rope_type!r} is not supported "
            f"(allowed: {list(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "llama3":
        missing = [key for key in LLAMA3_ROPE_KEYS if key not in rope]
        if missing:
            raise ValueError(f"{field}.rope_parameters lacks {missing}: rope_type 'llama3' needs "
                             f"{list(LLAMA3_ROPE_KEYS)}")
        if not float(rope["high_freq_factor"]) > float(rope["low_freq_factor"]) > 0:
            raise ValueError(
                f"{field}.rope_parameters: need high_freq_factor > low_freq_factor > 0, got "
                f"low_freq_factor={rope['low_freq_factor']!r}, high_freq_factor={rope['high_freq_factor']!r}"
            )


def rope_parameters(sub: LlamaConfig) -> dict[str, Any]:
    """The standardised rope settings of a Llama config (transformers >= 5 layout)."""
    return dict(sub.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})


AutoConfig.register(MODEL_TYPE, CustomSplitLlamaConfig, exist_ok=True)
