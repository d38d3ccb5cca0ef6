"""A local Ray instance (2 CPUs) for the test modules that run the CLI in-process: module-scoped, so each such
module starts one and stops it before the next module starts its own."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never join a cluster another process left
    yield
    ray.shutdown()
