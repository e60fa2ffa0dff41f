"""THE table of parallel layouts the integration tests run, by name.

A test parametrised with ``layouts()`` runs each layout whose world size (tp * pp) equals
the current one: plain ``pytest`` runs the 1-process layouts, ``torchrun
--nproc-per-node 2`` the 2-process ones, ``--nproc-per-node 4`` the 4-process ones.
The tiny model has 2 lower + 2 upper layers, so ``layers_per_stage`` puts a pipeline
boundary inside the lower stack (1, 3), at the adapter (2, 2) or inside the upper stack
(3, 1); VPP 2 x PP 2 cuts at every one of them.
"""

from __future__ import annotations

import pytest

from splitllama.layout import ParallelLayout

LAYOUTS: dict[str, ParallelLayout] = {
    "tp1": ParallelLayout(),
    "tp2": ParallelLayout(tp=2),
    "tp2_sp": ParallelLayout(tp=2, sp=True),
    "pp2_cut_lower": ParallelLayout(pp=2, layers_per_stage=(1, 3)),
    "pp2_cut_adapter": ParallelLayout(pp=2, layers_per_stage=(2, 2)),
    "pp2_cut_upper": ParallelLayout(pp=2, layers_per_stage=(3, 1)),
    "pp2_vpp2": ParallelLayout(pp=2, vpp=2),
    "tp2_sp_pp2": ParallelLayout(tp=2, sp=True, pp=2, layers_per_stage=(1, 3)),
    "tp2_pp2_vpp2": ParallelLayout(tp=2, pp=2, vpp=2),
    # TP=4 needs 4 KV heads per stack: real Llama-3 shapes (8), not the tiny model (2)
    "tp4": ParallelLayout(tp=4),
    "tp4_sp": ParallelLayout(tp=4, sp=True),
}
TINY_MAX_TP = 2
# Stage placements that tests check stage by stage in ONE process, building each stage's
# modules without running them: the table's TP=1 layouts, and more pipeline stages than the
# tiny model runs processes for, so that every kind of stage appears (the whole model; lower
# layers only; the adapter and upper layers without the head; the head's stage; with and
# without vpp).
STAGE_PLACEMENTS: dict[str, ParallelLayout] = {
    **{name: layout for name, layout in LAYOUTS.items() if layout.tp == 1},
    "pp3_cut_adapter": ParallelLayout(pp=3, layers_per_stage=(2, 1, 1)),
    "pp4": ParallelLayout(pp=4),
}


def layouts(*names: str, world: int | None = None):
    """pytest params of the named layouts that fit the world size (when none are named:
    every layout the tiny model can take)."""
    from tests.integration.conftest import world_size

    world = world or world_size()
    chosen = names or tuple(n for n, layout in LAYOUTS.items() if layout.tp <= TINY_MAX_TP)
    params = [pytest.param(LAYOUTS[n], id=n) for n in chosen if LAYOUTS[n].world_size == world]
    if not params:
        return [pytest.param(None, id=f"none-at-world-{world}",
                             marks=pytest.mark.skip(reason=f"no layout of {chosen} runs on {world} process(es)"))]
    return params


def layout_name(layout: ParallelLayout) -> str:
    """The table's name of ``layout``."""
    return next(name for name, candidate in LAYOUTS.items() if candidate == layout)
