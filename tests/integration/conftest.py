"""One real local Ray for the integration tests that train (started once, shut down at the end)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A fresh local Ray with 2 CPUs and the dashboard.

    The dashboard's HTTP server is what Train V2's placement-group cleaner talks to when Tune
    stops a trial; without it stopped trials leak their placement groups and the next ones hang.
    """
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
    )
    yield
    ray.shutdown()
