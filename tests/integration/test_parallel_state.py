"""Re-initialising megatron's parallel state, as every test and `splitllama bench` do per
layout, must not leak process groups: each leaked gloo group keeps 3 threads, and a CPU
session that leaked them crawled into the collective timeout (CI, 2026-11-29). On a gloo
world the groups are kept for the next set-up that asks for the same group instead
(``distributed._KEPT``): reused, never piled up."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from splitllama.distributed import kept_groups, setup_parallel, teardown_parallel
from tests.integration.conftest import DEVICE
from tests.integration.layouts import LAYOUTS


def live_groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def test_reinitialising_leaves_no_groups_behind():
    fitting = [layout for layout in LAYOUTS.values() if dist.get_world_size() % layout.world_size == 0]
    teardown_parallel()
    before = live_groups() - len(kept_groups())
    setup_parallel(fitting[0], DEVICE)
    assert live_groups() > before, "megatron created no groups: the test would prove nothing"
    tensor_group = parallel_state.get_tensor_model_parallel_group()
    for layout in fitting:  # every group of every layout made (or kept) once
        setup_parallel(layout, DEVICE)
    after_every_layout = live_groups()
    for layout in fitting * 2:
        setup_parallel(layout, DEVICE)
    assert live_groups() == after_every_layout, "re-initialising made groups beyond those of its layouts"
    setup_parallel(fitting[0], DEVICE)
    kept = parallel_state.get_tensor_model_parallel_group() is tensor_group
    assert kept == (dist.get_backend() == "gloo"), "gloo groups are kept and reused, others made anew"
    teardown_parallel()
    assert live_groups() == before + len(kept_groups()), "teardown left groups other than the kept ones"
