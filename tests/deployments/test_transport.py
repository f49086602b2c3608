"""HandleTransport on the session cluster: concurrent calls, results by shard, each call's own latency,
timeouts and hedged attempts."""

from __future__ import annotations

import itertools
import time

import torch
from ray import serve

from deployments.transport import HandleTransport
from serving.experts.sharded import ShardCall, ShardFailure
from serving.metrics import MemorySink


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class SleepyShard:
    """Answers a layer call with hidden * factor after `delay_s`."""

    def __init__(self, delay_s: float, factor: float):
        self.delay_s, self.factor = delay_s, factor

    def run(self, layer: int, call: ShardCall, version: str | None = None) -> torch.Tensor:
        time.sleep(self.delay_s)
        return call.hidden * self.factor

    def ping(self) -> bool:
        return True


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
        latency = {labels["shard"]: value for name, value, labels in sink.records if name == "moe_dispatch_seconds"}
        assert latency["0"] >= 0.6 and elapsed < 1.1  # the calls overlapped
        # Shard 1 is awaited after the slow shard 0: its own latency, not the time until shard 0 answered.
        assert latency["1"] < 0.3, latency
    finally:
        serve.delete("transport-slow")
        serve.delete("transport-fast")


def test_a_call_past_its_timeout_is_a_timeout_failure_not_a_hang(serve_url):
    slow = serve.run(SleepyShard.bind(3.0, 2.0), name="transport-hung", route_prefix=None)
    try:
        sink = MemorySink()
        transport = HandleTransport([slow], sink, model="m", call_timeout_s=0.5)
        call = ShardCall(torch.ones(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2))
        assert transport.probe(0, timeout_s=30)  # the handle knows the replica: the call below is taken at once
        started = time.perf_counter()
        out = transport.run(0, {0: call})
        assert time.perf_counter() - started < 1.5
        assert isinstance(out[0], ShardFailure) and out[0].reason == "timeout", out[0]
        assert sink.values("moe_shard_timeouts_total") == [1]
    finally:
        serve.delete("transport-hung")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_timeout_s=1)
class SlowFirstCall:
    """Its first call takes 20 s (a stalled attempt), every later one answers at once. (Stopped 1 s after
    delete, stalled call or not.)"""

    def __init__(self):
        self.calls = itertools.count()

    def run(self, layer: int, call: ShardCall, version: str | None = None) -> torch.Tensor:
        if next(self.calls) == 0:
            time.sleep(20.0)
        return call.hidden * 2

    def ping(self) -> bool:
        return True


def test_a_slow_attempt_is_hedged_and_the_first_answer_wins(serve_url):
    handle = serve.run(SlowFirstCall.bind(), name="transport-hedge", route_prefix=None)
    try:
        sink = MemorySink()
        transport = HandleTransport([handle], sink, model="m", call_timeout_s=30.0, hedge_after_s=0.2)
        call = ShardCall(torch.ones(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2))
        assert transport.probe(0, timeout_s=30)
        started = time.perf_counter()
        out = transport.run(0, {0: call})
        assert time.perf_counter() - started < 10.0  # the hedge's answer, not the stalled attempt's 20 s
        assert torch.equal(out[0], call.hidden * 2)
        assert sink.values("moe_shard_hedges_total") == [1]
    finally:
        serve.delete("transport-hedge")


def test_a_call_for_another_app_version_is_refused_as_stale_not_computed(serve_url, demo_dir):
    """The real ExpertShard refuses a call carrying another version (a router of another placement or
    checkpoint, mid rolling update), and the transport reports it as a retryable ShardFailure."""
    from deployments.shard_deployment import ExpertShard
    from serving.experts.sharded import shard_version
    from serving.model.config import ModelConfig

    shard = ExpertShard.options(ray_actor_options={"num_cpus": 0.1})
    handle = serve.run(
        shard.bind(str(demo_dir), 0, [0, 1, 2, 3], {}, "cpu"),
        name="transport-stale",
        route_prefix=None,
    )
    try:
        call = ShardCall(torch.ones(2, 128), torch.tensor([0, 1]), torch.tensor([0, 3]), torch.ones(2))
        layers = ModelConfig.from_pretrained(demo_dir).moe_layer_ids
        right = shard_version(str(demo_dir), 0, dict.fromkeys(layers, [0, 1, 2, 3]))
        wrong = shard_version(str(demo_dir), 0, dict.fromkeys(layers, [0, 1, 2]))  # a router of another placement
        ok = HandleTransport([handle], versions=[right]).run(1, {0: call})
        assert ok[0].shape == (2, 128)
        stale = HandleTransport([handle], versions=[wrong]).run(1, {0: call})
        assert isinstance(stale[0], ShardFailure) and stale[0].reason == "stale", stale
        assert "different app versions" in stale[0].detail
    finally:
        serve.delete("transport-stale")
