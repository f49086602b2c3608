"""One Ray cluster and one Serve HTTP proxy for the whole test session, on its own port and temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from deployments.local_cluster import free_port


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """The port of the session cluster's Prometheus endpoint (Ray's metrics agent)."""
    return free_port()


@pytest.fixture(scope="session")
def serve_url(ray_metrics_port):
    """Base URL of the session's Serve proxy; apps are deployed under their own route prefixes."""
    import ray
    from ray import serve

    # Ray's unix sockets need a short path; never share the default /tmp/ray with another cluster.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Logical CPUs, not cores: replicas reserve fractions and mostly wait on each other.
    ray.init(num_cpus=16, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             _metrics_export_port=ray_metrics_port, _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    os.environ.pop("RAY_ADDRESS", None)
