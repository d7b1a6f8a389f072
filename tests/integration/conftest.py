"""One real local Ray for the integration tests (started once, shut down at the end)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import ray

from dtlray.ray_session import init_ray


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A fresh local Ray with 2 CPUs and its dashboard, started the way ``dtlray`` starts it.

    The dashboard's HTTP server is what Train V2's placement-group cleaner asks when Tune stops a
    trial; ``init_ray`` points it at this instance even if another Ray runs on the machine.
    """
    if ray.is_initialized():
        ray.shutdown()
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
