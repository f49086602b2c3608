"""ShardTransport over Serve DeploymentHandles: the simple first transport (DESIGN.md, "The data plane").

Called from the engine thread of a Router replica (not its event loop): every call of a layer is sent
with `.remote()` first, then all results are awaited, so shards work concurrently.
"""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle
from torch import Tensor

from serving.sharded_experts import ShardCall


class HandleTransport:
    def __init__(self, handles: list[DeploymentHandle]):
        self.handles = handles  # shard id -> handle of ExpertShard-<id>

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor]:
        pending = {shard: self.handles[shard].run.remote(layer, call) for shard, call in calls.items()}
        return {shard: response.result() for shard, response in pending.items()}
