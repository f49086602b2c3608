"""Sharded experts give the same numbers as in-process experts, call only shards with rows, retry failed
shards within a bound, and split replicated experts' rows over their live holders by load."""

from __future__ import annotations

import time

import pytest
import torch

from router.gate import GateSpec, top_k_gate
from router.placement import Placement
from serving.errors import EngineUnavailableError, StalePlacementError
from serving.experts.local import LocalExpertBackend, StackedExperts
from serving.experts.sharded import (
    InProcessTransport,
    RetryPolicy,
    ShardedExpertBackend,
    ShardFailure,
    run_shard_call,
)
from serving.metrics import MemorySink

E, D, I, LAYER = 8, 32, 16, 3


def experts(ids):
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(E, 2 * I, D, generator=gen) * 0.1
    down = torch.randn(E, D, I, generator=gen) * 0.1
    ids = list(ids)
    return StackedExperts(gate_up[ids], down[ids], expert_ids=ids)


class CountingTransport(InProcessTransport):
    def __init__(self, shards):
        super().__init__(shards)
        self.calls: list[set[int]] = []

    def run(self, layer, calls):
        self.calls.append(set(calls))
        return super().run(layer, calls)


PLACEMENTS = {
    "contiguous-1": Placement.contiguous(E, 1),
    "contiguous-3": Placement.contiguous(E, 3),
    "round_robin-4": Placement.round_robin(E, 4),
    "hot-0-on-3": Placement.explicit(E, [[0, 1, 2, 3], [0, 4, 5], [0, 6, 7]]),  # rows of 0 split over 3 shards
    "all-twice": Placement.explicit(E, [list(range(E)), list(range(E))]),
}


@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_sharded_equals_local(placement):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, D, generator=gen)
    logits = torch.randn(20, E, generator=gen)
    logits[:, 0] += 2.0  # expert 0 is hot: most tokens pick it, so its rows are split between holders
    weights, ids = top_k_gate(logits, GateSpec(num_experts=E, top_k=2, renormalize=True))
    local = LocalExpertBackend({LAYER: experts(range(E))})(LAYER, hidden, weights, ids)
    shards = {s: {LAYER: experts(placement.experts_of(s))} for s in range(placement.num_shards)}
    sharded = ShardedExpertBackend(placement, InProcessTransport(shards))(LAYER, hidden, weights, ids)
    torch.testing.assert_close(sharded, local, rtol=1e-6, atol=1e-6)


def test_one_call_per_shard_with_rows_and_none_to_idle_shards():
    placement = Placement.contiguous(E, 4)  # experts 0-1 | 2-3 | 4-5 | 6-7
    shards = {s: {LAYER: experts(placement.experts_of(s))} for s in range(4)}
    transport = CountingTransport(shards)
    backend = ShardedExpertBackend(placement, transport)
    ids = torch.tensor([[0, 1], [1, 4], [0, 5]])  # nothing routed to shards 1 and 3
    backend(LAYER, torch.randn(3, D), torch.full((3, 2), 0.5), ids)
    assert transport.calls == [{0, 2}]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["contiguous-3", "hot-0-on-3"])
def test_sharded_equals_local_on_the_device(device, name):
    """On the accelerator: shard calls built on the device (with a replicated expert, its rows split between
    holders there), sent through a transport that hands results back on the host (as HandleTransport's
    replicas do), combined on the device again."""

    class HostTransport(InProcessTransport):  # what a remote shard does: rows in on its device, results out on host
        def run(self, layer, calls):
            return {s: out.cpu() for s, out in super().run(layer, {s: c.to(device) for s, c in calls.items()}).items()}

    def on_device(stack: StackedExperts) -> StackedExperts:
        return StackedExperts(stack.gate_up.to(device), stack.down.to(device), stack.expert_ids.to(device))

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, D, generator=gen).to(device)
    logits = torch.randn(20, E, generator=gen)
    logits[:, 0] += 2.0  # expert 0 is hot
    weights, ids = top_k_gate(logits.to(device), GateSpec(num_experts=E, top_k=2))
    local = LocalExpertBackend({LAYER: on_device(experts(range(E)))})(LAYER, hidden, weights, ids)
    placement = PLACEMENTS[name]
    shards = {s: {LAYER: on_device(experts(placement.experts_of(s)))} for s in range(3)}
    sharded = ShardedExpertBackend(placement, HostTransport(shards))(LAYER, hidden, weights, ids)
    assert sharded.device.type == device.type
    torch.testing.assert_close(sharded, local, rtol=1e-6, atol=1e-6)


class FlakyTransport(CountingTransport):
    """In-process shards, some of which fail their next `fails[shard]` calls as a dead replica would."""

    def __init__(self, shards, fails: dict[int, int], reason="gone"):
        super().__init__(shards)
        self.fails, self.reason = dict(fails), reason

    def run(self, layer, calls):
        self.calls.append(set(calls))
        out = {}
        for shard, call in calls.items():
            if self.fails.get(shard, 0) > 0:
                self.fails[shard] -= 1
                out[shard] = ShardFailure(self.reason, "test")
            else:
                out[shard] = run_shard_call(self.shards[shard], layer, call)
        return out

    def probe(self, shard, timeout_s):
        return self.fails.get(shard, 0) <= 0


def wait_for(condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _layer_inputs(tokens=12, top_k=2, seed=2):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, D, generator=gen)
    weights, ids = top_k_gate(torch.randn(tokens, E, generator=gen), GateSpec(num_experts=E, top_k=top_k))
    return hidden, weights, ids


def _local(hidden, weights, ids):
    return LocalExpertBackend({LAYER: experts(range(E))})(LAYER, hidden, weights, ids)


def test_a_failed_shard_call_is_retried_and_the_layer_still_equals_local():
    placement = Placement.contiguous(E, 2)
    shards = {s: {LAYER: experts(placement.experts_of(s))} for s in range(2)}
    sink = MemorySink()
    transport = FlakyTransport(shards, fails={1: 2})
    backend = ShardedExpertBackend(placement, transport, RetryPolicy(pause_s=0.001), sink)
    hidden, weights, ids = _layer_inputs()
    torch.testing.assert_close(backend(LAYER, hidden, weights, ids), _local(hidden, weights, ids), rtol=1e-6, atol=1e-6)
    assert transport.calls == [{0, 1}, {1}, {1}]  # shard 0's answer is kept; only shard 1 is called again
    assert sink.values("moe_shard_retries_total") == [1, 1]


def test_rows_of_a_replicated_expert_move_to_its_other_holder_without_waiting():
    placement = Placement.explicit(E, [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7]])  # 4 and 5 on both
    shards = {s: {LAYER: experts(placement.experts_of(s))} for s in range(2)}
    ids = torch.tensor([[4, 5]] * 6)  # only replicated experts, 6 rows each: one goes to each shard
    hidden, weights = torch.randn(6, D), torch.full((6, 2), 0.5)
    sink = MemorySink()
    transport = FlakyTransport(shards, fails={0: 100})  # shard 0 stays down
    backend = ShardedExpertBackend(placement, transport, RetryPolicy(pause_s=10.0, max_pause_s=0.05), sink)
    start = time.monotonic()
    out = backend(LAYER, hidden, weights, ids)
    assert time.monotonic() - start < 5.0  # no pause: the first one (pause_s) would take 10 s
    torch.testing.assert_close(out, _local(hidden, weights, ids), rtol=1e-6, atol=1e-6)
    assert transport.calls == [{0, 1}, {1}]  # shard 0's rows (expert 4) moved to shard 1 at once
    assert sink.values("moe_shard_failovers_total") == [1]
    # the next step keeps off shard 0 while it is down: one call, to shard 1
    backend(LAYER, hidden, weights, ids)
    assert transport.calls[-1] == {1}
    transport.fails[0] = 0  # shard 0 is back: the background probe sees it, and both holders share again
    assert wait_for(lambda: not backend.failed, timeout_s=5)
    backend(LAYER, hidden, weights, ids)
    assert transport.calls[-1] == {0, 1}


def test_replicated_experts_are_split_by_load_between_their_holders():
    placement = Placement.explicit(E, [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]])  # everything twice
    shards = {s: {LAYER: experts(placement.experts_of(s))} for s in range(2)}
    transport = CountingTransport(shards)
    hidden, weights, ids = _layer_inputs(tokens=32, top_k=2)
    out = ShardedExpertBackend(placement, transport)(LAYER, hidden, weights, ids)
    assert transport.calls == [{0, 1}]  # both holders used, not only the first
    torch.testing.assert_close(out, _local(hidden, weights, ids), rtol=1e-6, atol=1e-6)


class RecordingTransport(FlakyTransport):
    """FlakyTransport that also keeps, for every round, each shard's assigned expert ids."""

    def __init__(self, shards, fails=None):
        super().__init__(shards, fails or {})
        self.rounds: list[dict[int, list[int]]] = []

    def run(self, layer, calls):
        self.rounds.append({shard: call.experts.tolist() for shard, call in calls.items()})
        return super().run(layer, calls)


def _hot_expert_step():
    """Expert 0 on both shards; shard 0 must also take expert 1's 6 rows, shard 1 expert 4's 2."""
    placement = Placement.explicit(E, [[0, 1, 2, 3], [0, 4, 5, 6, 7]])
    shards = {s: {LAYER: experts(placement.experts_of(s))} for s in range(2)}
    ids = torch.tensor([[0, 1]] * 6 + [[0, 4]] * 2)  # 8 rows of expert 0
    gen = torch.Generator().manual_seed(3)
    return placement, shards, torch.randn(8, D, generator=gen), torch.rand(8, 2, generator=gen), ids


def test_rows_of_a_replicated_expert_are_split_unevenly_to_level_the_shards():
    placement, shards, hidden, weights, ids = _hot_expert_step()
    transport = RecordingTransport(shards)
    out = ShardedExpertBackend(placement, transport)(LAYER, hidden, weights, ids)
    [sent] = transport.rounds
    # 16 assignments, 8 a shard: expert 0 gives 2 rows to shard 0 (which has expert 1's 6) and 6 to shard 1
    # (which has expert 4's 2); one holder for all 8 would have left the shards at 6 and 10 (or 14 and 2)
    assert sorted(sent[0]) == [0] * 2 + [1] * 6 and sorted(sent[1]) == [0] * 6 + [4] * 2
    torch.testing.assert_close(out, _local(hidden, weights, ids), rtol=1e-6, atol=1e-6)


def test_a_failed_holder_gets_no_rows_of_a_replicated_expert_while_another_is_up():
    placement, shards, hidden, weights, ids = _hot_expert_step()
    transport = RecordingTransport(shards, fails={0: 1})  # shard 0 fails its first call only
    out = ShardedExpertBackend(placement, transport, RetryPolicy(pause_s=0.001))(LAYER, hidden, weights, ids)
    first, retry = transport.rounds
    assert sorted(first[0]) == [0] * 2 + [1] * 6
    # the retry sends shard 0's rows again: expert 1's must wait for shard 0, expert 0's go to shard 1 at once
    assert sorted(retry[0]) == [1] * 6 and retry[1] == [0, 0]
    torch.testing.assert_close(out, _local(hidden, weights, ids), rtol=1e-6, atol=1e-6)


def test_a_shard_down_past_the_bound_fails_the_layer_with_engine_unavailable():
    placement = Placement.contiguous(E, 2)
    shards = {s: {LAYER: experts(placement.experts_of(s))} for s in range(2)}
    transport = FlakyTransport(shards, fails={1: 10**6}, reason="timeout")
    backend = ShardedExpertBackend(placement, transport, RetryPolicy(wait_s=0.2, pause_s=0.01))
    hidden, weights, ids = _layer_inputs()
    start = time.monotonic()
    with pytest.raises(EngineUnavailableError, match=r"shard\(s\) \[1\].*shard_wait_s=0.2"):
        backend(LAYER, hidden, weights, ids)
    assert 0.2 <= time.monotonic() - start < 2.0
    assert 3 <= len(transport.calls) < 40  # it kept trying, with pauses between tries


def test_a_shard_of_another_app_version_is_retried_briefly_then_the_step_moves_on():
    """During a rolling update a replica may refuse calls as another version: a few refusals are retried
    (the next replica may match); refusals past stale_wait_s raise StalePlacementError (the Ingress moves
    the requests to another router), long before shard_wait_s."""
    placement = Placement.contiguous(E, 2)
    shards = {s: {LAYER: experts(placement.experts_of(s))} for s in range(2)}
    hidden, weights, ids = _layer_inputs()
    policy = RetryPolicy(wait_s=30.0, pause_s=0.01, stale_wait_s=0.2)
    brief = FlakyTransport(shards, fails={1: 2}, reason="stale")
    out = ShardedExpertBackend(placement, brief, policy)(LAYER, hidden, weights, ids)
    torch.testing.assert_close(out, _local(hidden, weights, ids), rtol=1e-6, atol=1e-6)
    lasting = FlakyTransport(shards, fails={1: 10**6}, reason="stale")
    start = time.monotonic()
    with pytest.raises(StalePlacementError, match=r"shard\(s\) \[1\].*another app version.*stale test"):
        ShardedExpertBackend(placement, lasting, policy)(LAYER, hidden, weights, ids)
    assert 0.2 <= time.monotonic() - start < 2.0


def test_each_layer_may_place_its_experts_differently():
    """A per-layer placement ({layer: Placement}): shards hold other experts in each layer (a replicated one
    too), and every layer still equals the in-process experts."""
    layouts = {1: Placement.contiguous(E, 2), 3: Placement.explicit(E, [[0, 2, 4, 6, 7], [1, 3, 5, 7]])}
    shards = {s: {layer: experts(p.experts_of(s)) for layer, p in layouts.items()} for s in range(2)}
    every = {layer: experts(range(E)) for layer in layouts}
    backend = ShardedExpertBackend(layouts, CountingTransport(shards))
    hidden, weights, ids = _layer_inputs(tokens=16)
    for layer in layouts:
        want = LocalExpertBackend(every)(layer, hidden, weights, ids)
        torch.testing.assert_close(backend(layer, hidden, weights, ids), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match="no placement for layer 2"):
        backend(2, hidden, weights, ids)
