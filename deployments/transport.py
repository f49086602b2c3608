"""ShardTransport over Serve DeploymentHandles: the simple first transport (docs/architecture.md, "Seams").

Called from the engine thread of a Router replica (not its event loop): every call of a layer is sent
with `.remote()` first, then results are taken as they complete, so shards work concurrently and each
call's dispatch latency (send to result) is its own, not the longest of the calls before it.
"""

from __future__ import annotations

import time

import ray
from ray.serve.handle import DeploymentHandle
from torch import Tensor

from serving.experts.sharded import ShardCall
from serving.metrics import DISPATCH, MetricsSink, NullSink


class HandleTransport:
    def __init__(self, handles: list[DeploymentHandle], metrics: MetricsSink | None = None, model: str = "model"):
        self.handles = handles  # shard id -> handle of ExpertShard-<id>
        self.metrics, self.model = metrics or NullSink(), model

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor]:
        # Device -> host before sending (Serve pickles the call; a CUDA tensor would not unpickle on another
        # node), one copy per shard call; each ExpertShard moves the rows to its own device on arrival.
        sent = {
            shard: (time.perf_counter(), self.handles[shard].run.remote(layer, call.to("cpu")))
            for shard, call in calls.items()
        }
        # As object refs, so ray.wait hands back whichever call finishes first (Serve's documented escape
        # hatch from a DeploymentResponse to its ObjectRef; it returns once a replica has been chosen).
        shard_of = {response._to_object_ref_sync(): shard for shard, (_, response) in sent.items()}
        results, pending = {}, list(shard_of)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            now = time.perf_counter()
            for ref in done:
                shard = shard_of[ref]
                results[shard] = ray.get(ref)  # a replica's error surfaces here as RayTaskError, as before
                self.metrics.record(DISPATCH, now - sent[shard][0], {"model": self.model, "shard": str(shard)})
        return results
