"""Re-initialising megatron's parallel state, as every test and `splitllama bench` do per
layout, must not leak process groups: each leaked gloo group keeps 3 threads, and a CPU
session that leaked them crawled into the collective timeout (CI, 2026-11-29)."""

from __future__ import annotations

import torch.distributed as dist

from splitllama.distributed import setup_parallel, teardown_parallel
from tests.integration.conftest import DEVICE
from tests.integration.layouts import LAYOUTS


def live_groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def test_reinitialising_leaves_no_groups_behind():
    fitting = [layout for layout in LAYOUTS.values() if dist.get_world_size() % layout.world_size == 0]
    teardown_parallel()
    before = live_groups()
    setup_parallel(fitting[0], DEVICE)
    assert live_groups() > before, "megatron created no groups: the test would prove nothing"
    after_first = live_groups()
    for layout in fitting * 3:
        setup_parallel(layout, DEVICE)
    setup_parallel(fitting[0], DEVICE)
    assert live_groups() == after_first
    teardown_parallel()
    assert live_groups() == before
