"""Repository-wide pytest setup: Hypothesis profiles and thread limits for 2-core CI.

Profiles: ``ci`` (default) is derandomized, so every torchrun rank draws the SAME
examples (distributed tests then agree on every tensor they exchange); ``dev`` explores
more examples with fresh randomness. Select with ``HYPOTHESIS_PROFILE=dev``.
"""

import os

import torch
from hypothesis import HealthCheck, settings

# Two cores shared by xdist workers or torchrun ranks: one intra-op thread each avoids
# oversubscription (measured: 4 threads per process on 2 cores is ~3x slower).
torch.set_num_threads(int(os.environ.get("SPLITLLAMA_TEST_THREADS", "1")))

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=12,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
