"""Multi-node placement and node loss, on `ray.cluster_utils.Cluster` (three raylet nodes on this machine):
routers and shard replicas pinned to the two worker nodes by a custom resource in the app config (as
KubeRay worker groups advertise them), the Ingress on the head; a worker node removed under locust load
loses no request. Runs benchmarks/resilience.py's node scenario in its own process: it needs its own
Ray cluster, not the session's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_removing_a_worker_node_under_load_loses_no_request(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's cluster
    command = [sys.executable, "-m", "benchmarks.resilience", "--scenarios", "node", "--users", "4",
               "--duration", "16", "--fault-at", "6", "--window", "8", "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [row] = json.loads((tmp_path / "resilience.json").read_text())["rows"]
    # before the fault every router and shard had a replica on each worker node
    assert row["nodes_before"] == {"Router": 2, "ExpertShard-0": 2, "ExpertShard-1": 2}, row
    assert int(row["requests"]) >= 8 and row["failed"] == 0, row
    assert row["replicas_back_s"] != "n/a", "Serve did not replace the lost replicas on the other node"
