"""HandleTransport on the session cluster: concurrent calls, results by shard, and each call's own latency."""

from __future__ import annotations

import time

import torch
from ray import serve

from deployments.transport import HandleTransport
from serving.experts.sharded import ShardCall
from serving.metrics import MemorySink


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class SleepyShard:
    """Answers a layer call with hidden * factor after `delay_s`."""

    def __init__(self, delay_s: float, factor: float):
        self.delay_s, self.factor = delay_s, factor

    def run(self, layer: int, call: ShardCall) -> torch.Tensor:
        time.sleep(self.delay_s)
        return call.hidden * self.factor


def test_each_shard_call_records_its_own_latency(serve_url):
    slow = serve.run(SleepyShard.bind(0.6, 2.0), name="transport-slow", route_prefix=None)
    fast = serve.run(SleepyShard.bind(0.0, 3.0), name="transport-fast", route_prefix=None)
    try:
        sink = MemorySink()
        transport = HandleTransport([slow, fast], sink, model="m")
        call = ShardCall(torch.ones(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2))
        transport.run(0, {0: call, 1: call})  # warm both replicas up
        sink.records.clear()
        started = time.perf_counter()
        out = transport.run(0, {0: call, 1: call})
        elapsed = time.perf_counter() - started
        assert torch.equal(out[0], call.hidden * 2) and torch.equal(out[1], call.hidden * 3)
        latency = {labels["shard"]: value for _, value, labels in sink.records}
        assert latency["0"] >= 0.6 and elapsed < 1.1  # the calls overlapped
        # Shard 1 is awaited after the slow shard 0: its own latency, not the time until shard 0 answered.
        assert latency["1"] < 0.3, latency
    finally:
        serve.delete("transport-slow")
        serve.delete("transport-fast")
