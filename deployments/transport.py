"""ShardTransport over Serve DeploymentHandles: the simple first transport (DESIGN.md, "The data plane").

Called from the engine thread of a Router replica (not its event loop): every call of a layer is sent
with `.remote()` first, then all results are awaited, so shards work concurrently.
"""

from __future__ import annotations

import time

from ray.serve.handle import DeploymentHandle
from torch import Tensor

from serving.metrics import DISPATCH, MetricsSink, NullSink
from serving.sharded_experts import ShardCall


class HandleTransport:
    def __init__(self, handles: list[DeploymentHandle], metrics: MetricsSink | None = None, model: str = "model"):
        self.handles = handles  # shard id -> handle of ExpertShard-<id>
        self.metrics, self.model = metrics or NullSink(), model

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor]:
        start = time.perf_counter()
        pending = {shard: self.handles[shard].run.remote(layer, call) for shard, call in calls.items()}
        results = {}
        for shard, response in pending.items():
            results[shard] = response.result()
            self.metrics.record(DISPATCH, time.perf_counter() - start, {"model": self.model, "shard": str(shard)})
        return results
