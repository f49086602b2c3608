"""DirectTransport against real ShardServers (in this process, and one in a process of its own that is
SIGKILLed mid-call): answers by shard, the same numbers as in-process experts, the fallback where no replica
is known or of this version, and the handle transport's failure rules (gone fast, timeout, hedge, stale).

Every test runs twice: rows in frames, and rows on row channels (`direct_rows: collective`, gloo: the CPU
equivalent of the NCCL path GPUs take). A channel's two ends must be in two processes (a gloo group's
constructor holds the GIL while it waits for its peer), so there the servers run in a host process of their
own, as they do in a cluster.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from deployments.direct_transport import DirectTransport, Endpoint, ShardCallError
from router.gate import GateSpec, top_k_gate
from router.placement import Placement
from serving.errors import StalePlacementError
from serving.experts.local import LocalExpertBackend, StackedExperts
from serving.experts.shard_server import ShardServer
from serving.experts.sharded import InProcessTransport, ShardCall, ShardedExpertBackend, ShardFailure, run_shard_call
from serving.metrics import (
    DISPATCH,
    SHARD_CALLS,
    SHARD_COMPUTE,
    SHARD_HEDGES,
    SHARD_HOP,
    SHARD_TIMEOUTS,
    MemorySink,
)

HOST = "127.0.0.1"
CPU = torch.device("cpu")
CALL = ShardCall(torch.ones(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2))


class Scaling:
    """A replica's handler: hidden * factor after delay_s, or a StalePlacementError for another version."""

    def __init__(self, factor: float, delay_s: float = 0.0, version: str | None = None, fail: bool = False):
        self.factor, self.delay_s, self.version, self.fail = factor, delay_s, version, fail
        self.calls = 0

    def __call__(self, layer, call, version):
        self.calls += 1
        if version is not None and self.version is not None and version != self.version:
            raise StalePlacementError(f"replica of version {self.version}")
        if self.fail:
            raise ValueError("expert weights missing")
        time.sleep(self.delay_s)
        return call.hidden * self.factor


class RecordingFallback(InProcessTransport):
    """The handle transport's stand-in: records which shards it was asked for."""

    def __init__(self, shards=None):
        super().__init__(shards or {})
        self.asked: list[set[int]] = []

    def run(self, layer, calls):
        self.asked.append(set(calls))
        return {s: c.hidden * 10.0 for s, c in calls.items()}

    def probe(self, shard, timeout_s):
        return True


class Held:
    """A replica's handler that computes its experts (a class, so it can be sent to the host process)."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, layer, call, version):
        return run_shard_call(self.layers, layer, call)


@dataclass(frozen=True)
class Started:
    host: str
    port: int
    store_port: int | None = None


def _host_servers(commands, answers) -> None:
    """The host process: start a ShardServer (with row channels) per handler it is sent; close them all on None."""
    started = []
    while True:
        handler = commands.get()
        if handler is None:
            for server in started:
                server.close()
            started.clear()
            answers.put("closed")
            continue
        server = ShardServer(handler, HOST, channel_device=CPU)
        started.append(server)
        answers.put((server.port, server.store_port))


@pytest.fixture(scope="module")
def server_host():
    ctx = multiprocessing.get_context("spawn")
    commands, answers = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=_host_servers, args=(commands, answers), daemon=True)
    process.start()
    yield commands, answers
    process.kill()
    process.join(10)


@pytest.fixture(params=["frames", "collective"])
def rows(request) -> str:
    return request.param


@pytest.fixture
def servers(rows, request):
    started = []
    host = request.getfixturevalue("server_host") if rows == "collective" else None

    def start(handler) -> Started:
        if host is None:
            server = ShardServer(handler, HOST)
            started.append(server)
            return Started(HOST, server.port)
        commands, answers = host
        commands.put(handler)
        return Started(HOST, *answers.get(timeout=60))

    yield start
    for server in started:
        server.close()
    if host is not None:
        host[0].put(None)
        assert host[1].get(timeout=60) == "closed"


def endpoint(server: Started, replica, version=None):
    return Endpoint(replica, server.host, server.port, version, server.store_port)


@pytest.fixture
def transport(rows):
    """Makes DirectTransports whose rows go the way this run of the test says (closed at the end)."""
    made = []

    def make(endpoints: dict[int, list[Endpoint]], fallback=None, **kwargs) -> DirectTransport:
        row_device = CPU if rows == "collective" else None
        t = _transport(endpoints, fallback, row_device=row_device, **kwargs)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _transport(endpoints: dict[int, list[Endpoint]], fallback=None, **kwargs):
    t = DirectTransport(fallback or RecordingFallback(), lambda s: list(endpoints.get(s, [])), max(endpoints) + 1,
                        model="m", refresh_s=0.05, **kwargs)  # fmt: skip
    deadline = time.monotonic() + 5
    while any(not t._endpoints.get(s) for s, e in endpoints.items() if e) and time.monotonic() < deadline:
        time.sleep(0.01)  # the discovery thread's first round
    return t


def test_calls_go_straight_to_the_replicas_and_come_back_by_shard(servers, transport, rows):
    a, b = servers(Scaling(2.0)), servers(Scaling(3.0))
    sink, fallback = MemorySink(), RecordingFallback()
    t = transport({0: [endpoint(a, "a")], 1: [endpoint(b, "b")]}, fallback, metrics=sink)
    out = t.run(0, {0: CALL, 1: CALL})
    assert torch.equal(out[0], CALL.hidden * 2) and torch.equal(out[1], CALL.hidden * 3)
    channels = [conn.channel for conn in t._conns.values()]
    assert len(channels) == 2 and all((c is not None) == (rows == "collective") for c in channels)
    assert all(c.backend == "gloo" for c in channels if c is not None)
    assert fallback.asked == []
    assert sorted(labels["shard"] for name, _, labels in sink.records if name == DISPATCH.name) == ["0", "1"]
    kind = "channel" if rows == "collective" else "direct"
    assert [labels["transport"] for name, _, labels in sink.records if name == SHARD_CALLS.name] == [kind] * 2


def test_a_calls_round_trip_splits_into_the_shards_own_time_and_the_hop(servers, transport):
    slow, fast = servers(Scaling(2.0, delay_s=0.2)), servers(Scaling(3.0))
    sink = MemorySink()
    t = transport({0: [endpoint(slow, "slow")], 1: [endpoint(fast, "fast")]}, metrics=sink)
    for _ in range(3):
        t.run(0, {0: CALL, 1: CALL})

    def by_shard(metric):
        records = [(v, labels["shard"]) for name, v, labels in sink.records if name == metric.name]
        return {s: [v for v, shard in records if shard == s] for s in "01"}

    dispatch, compute, hop = by_shard(DISPATCH), by_shard(SHARD_COMPUTE), by_shard(SHARD_HOP)
    assert all(len(compute[s]) == len(hop[s]) == len(dispatch[s]) == 3 for s in "01")
    assert all(0.2 <= c < 0.4 for c in compute["0"]) and all(c < 0.1 for c in compute["1"])  # the handler's sleep
    assert all(h < 0.1 for h in hop["0"] + hop["1"])  # the sleep is the shard's, not the hop's
    for s in "01":
        assert all(abs(c + h - d) < 1e-3 for c, h, d in zip(compute[s], hop[s], dispatch[s], strict=True))


def test_sharded_experts_over_the_wire_equal_in_process_experts(servers, transport):
    e, d, i, layer = 8, 32, 16, 3
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(e, 2 * i, d, generator=gen) * 0.1, torch.randn(e, d, i, generator=gen) * 0.1

    def stacked(ids):
        return {layer: StackedExperts(gate_up[ids], down[ids], expert_ids=list(ids))}

    placement = Placement.explicit(e, [[0, 1, 2, 3], [0, 4, 5], [0, 6, 7]])  # expert 0's rows split three ways
    endpoints = {}
    for s in range(placement.num_shards):
        server = servers(Held(stacked(list(placement.experts_of(s)))))
        endpoints[s] = [endpoint(server, f"r{s}")]
    hidden = torch.randn(20, d, generator=gen)
    logits = torch.randn(20, e, generator=gen)
    logits[:, 0] += 2.0
    weights, ids = top_k_gate(logits, GateSpec(num_experts=e, top_k=2, renormalize=True))
    t = transport(endpoints)
    sharded = ShardedExpertBackend(placement, t)(layer, hidden, weights, ids)
    local = LocalExpertBackend(stacked(list(range(e))))(layer, hidden, weights, ids)
    torch.testing.assert_close(sharded, local, rtol=1e-6, atol=1e-6)
    assert t.fallback.asked == []


def test_a_shard_with_no_known_replica_or_none_of_this_version_goes_through_the_fallback(servers, transport):
    old = servers(Scaling(2.0, version="v-old"))
    fallback = RecordingFallback()
    t = transport({0: [endpoint(old, "old", "v-old")], 1: []}, fallback, versions=["v-new", "v1"])
    out = t.run(0, {0: CALL, 1: CALL})
    assert fallback.asked == [{0, 1}]  # the old replica is never sent rows for the new placement
    assert torch.equal(out[0], CALL.hidden * 10) and torch.equal(out[1], CALL.hidden * 10)


def _serve_forever(port_out, delay_s, channel_device):
    server = ShardServer(Scaling(5.0, delay_s=delay_s), HOST, channel_device=channel_device)
    port_out.put((server.port, server.store_port))
    threading.Event().wait()


def test_a_killed_replica_is_gone_at_once_and_the_next_call_goes_to_another(servers, transport, rows):
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    channel_device = CPU if rows == "collective" else None
    doomed = ctx.Process(target=_serve_forever, args=(ports, 30.0, channel_device), daemon=True)
    doomed.start()
    try:
        port, store_port = ports.get(timeout=60)
        live = servers(Scaling(2.0))
        sink = MemorySink()
        doomed_endpoint = Endpoint("doomed", HOST, port, store_port=store_port)
        t = transport({0: [doomed_endpoint, endpoint(live, "live")]}, metrics=sink, call_timeout_s=20)
        threading.Timer(0.5, os.kill, (doomed.pid, signal.SIGKILL)).start()
        started = time.perf_counter()
        out = t.run(0, {0: CALL})  # round-robin starts at the first endpoint: the doomed process
        assert out[0] == ShardFailure("gone", out[0].detail) and time.perf_counter() - started < 5
        retry = t.run(0, {0: CALL})  # what the backend does next: the live replica answers (a rediscovered dead
        # one is refused at connect, dropped again, and the call goes on to the next)
        assert torch.equal(retry[0], CALL.hidden * 2)
        assert not [r for r in sink.records if r[0] == SHARD_TIMEOUTS.name]
    finally:
        doomed.kill()
        doomed.join(10)


def test_a_call_past_its_timeout_is_a_timeout_and_its_stream_is_closed(servers, transport):
    hung = servers(Scaling(2.0, delay_s=3.0))
    sink = MemorySink()
    t = transport({0: [endpoint(hung, "hung")]}, metrics=sink, call_timeout_s=0.4)
    started = time.perf_counter()
    out = t.run(0, {0: CALL})
    assert out[0].reason == "timeout" and 0.4 <= time.perf_counter() - started < 2.0
    assert sink.values(SHARD_TIMEOUTS.name) == [1] and sink.values(DISPATCH.name) == []


def test_a_slow_attempt_is_hedged_to_another_replica_and_the_first_answer_wins(servers, transport):
    slow, fast = servers(Scaling(2.0, delay_s=1.5)), servers(Scaling(2.0))
    sink = MemorySink()
    t = transport({0: [endpoint(slow, "slow"), endpoint(fast, "fast")]}, metrics=sink, hedge_after_s=0.1)
    started = time.perf_counter()
    out = t.run(0, {0: CALL})
    assert torch.equal(out[0], CALL.hidden * 2) and time.perf_counter() - started < 1.0
    assert [name for name, _, _ in sink.records].count(SHARD_HEDGES.name) == 1
    time.sleep(1.6)  # the slow replica's late answer now waits in its stream...
    for _ in range(3):  # ...and is skipped, not taken for a later call's answer
        assert torch.equal(t.run(1, {0: CALL})[0], CALL.hidden * 2)


def test_a_refusal_as_another_version_is_stale_and_a_shard_error_fails_the_step(servers, transport):
    stale = servers(Scaling(2.0, version="v-other"))
    t = transport({0: [endpoint(stale, "stale", "v1")]}, versions=["v1"])  # it claims v1 but is not
    assert t.run(0, {0: CALL})[0].reason == "stale"
    broken = servers(Scaling(2.0, fail=True))
    t = transport({0: [endpoint(broken, "broken")]})
    with pytest.raises(ShardCallError, match="expert weights missing"):
        t.run(0, {0: CALL})
