"""The rules tensor, sequence, pipeline and virtual pipeline sizes obey, in one place and
on the standard library only: the command line checks its flags with them before it
imports torch, and ``layout.ParallelLayout`` and ``layout.stage_layouts`` check theirs.
Also ``ceil_div`` / ``round_up``, the one ceiling division of sizes.

Each check names the sizes as its caller's user knows them (``names``): the layout's
fields, megatron's config fields or the command line's flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LAYOUT_NAMES = {"tp": "tp", "sp": "sp", "pp": "pp", "vpp": "vpp"}
MEGATRON_NAMES = {"tp": "tensor_model_parallel_size", "sp": "sequence_parallel",
                  "pp": "pipeline_model_parallel_size", "vpp": "virtual_pipeline_model_parallel_size"}
FLAG_NAMES = {"tp": "--tp", "sp": "--sp", "pp": "--pp", "vpp": "--vpp"}


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_parallel_sizes(tp: Any = 1, sp: bool = False, pp: Any = 1, vpp: Any = None,
                         names: Mapping[str, str] = LAYOUT_NAMES) -> None:
    """Refuse sizes no layout can have: ``tp``, ``pp`` positive ints, ``vpp`` None or a
    positive int, ``vpp > 1`` only with ``pp > 1`` (virtual stages interleave pipeline
    ranks), ``sp`` only with ``tp > 1`` (it splits tokens over TP ranks)."""
    for field, value in (("tp", tp), ("pp", pp)):
        if not is_positive_int(value):
            raise ValueError(f"{names[field]} must be a positive int, got {value!r}")
    if vpp is not None and not is_positive_int(vpp):
        raise ValueError(f"{names['vpp']} must be None or a positive int, got {vpp!r}")
    if vpp is not None and vpp > 1 and pp == 1:
        raise ValueError(f"{names['vpp']} {vpp} needs {names['pp']} > 1 (virtual stages interleave pipeline ranks)")
    if sp and tp == 1:
        raise ValueError(f"{names['sp']} needs {names['tp']} > 1 (sequence parallelism splits tokens over TP ranks)")


def ceil_div(n: int, d: int) -> int:
    """How many parts of at most ``d`` cover ``n``."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (token counts under SP, vocabulary
    rows over TP)."""
    return ceil_div(n, multiple) * multiple
