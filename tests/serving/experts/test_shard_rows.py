"""Rows per shard, balancedness and dispatch latency per layer: what the sharded backend records is what it sent
(replicated experts' rows as split, failed calls not counted), its balancedness is router/planner.py's, and a
layer's dispatch lasts until its slower shard's answer is in, retries included."""

from __future__ import annotations

import time

import pytest
import torch

from router.balance import shard_loads, split_rows
from router.placement import LayeredPlacement, Placement
from router.planner import balancedness
from serving.experts.shard_rows import BUCKETS, ShardRowsWindow
from serving.experts.sharded import BALANCE_REPORT_S, RetryPolicy, ShardedExpertBackend
from serving.metrics import BALANCEDNESS, LAYER_DISPATCH, SHARD_CALL_ROWS, SHARD_ROWS, MemorySink
from tests.serving.experts.test_sharded import (
    LAYER,
    CountingTransport,
    FlakyTransport,
    _hot_expert_step,
    _layer_inputs,
    experts,
)

E = 8


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rows_by_shard(sink: MemorySink, layer: int = LAYER) -> dict[int, list[float]]:
    """moe_shard_call_rows observations of `layer`, per shard (moe_shard_rows_total adds up the same values)."""
    out: dict[int, list[float]] = {}
    counted: dict[int, list[float]] = {}
    for name, value, labels in sink.records:
        if name in (SHARD_CALL_ROWS.name, SHARD_ROWS.name) and labels["layer"] == str(layer):
            assert set(labels) == set(SHARD_CALL_ROWS.labels) == set(SHARD_ROWS.labels)
            (out if name == SHARD_CALL_ROWS.name else counted).setdefault(int(labels["shard"]), []).append(value)
    assert counted == out
    return out


def gauges(sink: MemorySink) -> list[tuple[str, float]]:
    """(layer, value) of every moe_expert_balancedness_ratio set, in order."""
    out = []
    for name, value, labels in sink.records:
        if name == BALANCEDNESS.name:
            assert labels["model"] == "m" and labels["replica"] == "r1"
            out.append((labels["layer"], value))
    return out


def sharded(placement, transport, sink, clock=None, **kwargs) -> ShardedExpertBackend:
    num_shards = placement.num_shards if isinstance(placement, Placement) else next(iter(placement.values())).num_shards
    window = ShardRowsWindow(num_shards, window_s=60.0, clock=clock or Clock())
    return ShardedExpertBackend(
        placement, transport, metrics=sink, model="m", replica="r1", shard_rows=window, **kwargs
    )


def shards_of(placement: Placement, layers=(LAYER,)):
    return {s: {layer: experts(placement.experts_of(s)) for layer in layers} for s in range(placement.num_shards)}


def test_window_adds_rows_per_layer_and_shard_and_forgets_them_a_window_later():
    clock = Clock()
    window = ShardRowsWindow(num_shards=3, window_s=60.0, clock=clock)
    window.add(1, {0: 4, 2: 1})
    clock.t += 0.5
    window.add(1, {1: 2})
    window.add(3, {2: 6})
    assert window.loads() == {1: [4, 2, 1], 3: [0, 0, 6]}
    assert window.balancedness() == pytest.approx({1: (7 / 3) / 4, 3: 2 / 6})
    clock.t += 30.0
    window.add(1, {0: 1})
    clock.t += 30.0  # the first rows' bucket is now a window old; the last ones are not
    assert window.loads() == {1: [1, 0, 0], 3: [0, 0, 0]}
    assert window.balancedness() == pytest.approx({1: 1 / 3, 3: 1.0})  # no rows: balanced, as the planner says
    clock.t += 60.0 * 10  # long idle: every bucket expires at once
    window.add(3, {1: 5})
    assert window.loads() == {1: [0, 0, 0], 3: [0, 5, 0]}
    assert len(window._buckets) == 1 <= BUCKETS


def test_rows_per_shard_are_the_rows_sent_with_a_replicated_expert_split_between_holders():
    placement, shards, hidden, weights, ids = _hot_expert_step()  # expert 0 on both shards
    sink = MemorySink()
    backend = sharded(placement, CountingTransport(shards), sink)
    backend(LAYER, hidden, weights, ids)
    # 16 (token, expert) rows: expert 0's 8 split 2 | 6 so that each shard computes 8 (1 call each)
    assert rows_by_shard(sink) == {0: [8], 1: [8]}
    backend.report_balancedness()
    assert gauges(sink) == [(str(LAYER), 1.0)]


def test_a_failed_call_is_not_counted_and_its_rows_count_where_they_went():
    placement, shards, hidden, weights, ids = _hot_expert_step()
    sink = MemorySink()
    transport = FlakyTransport(shards, fails={0: 1})  # shard 0 fails its first call only
    backend = sharded(placement, transport, sink, policy=RetryPolicy(pause_s=0.001))
    backend(LAYER, hidden, weights, ids)
    # round 1: shard 1 computes its 8; round 2: shard 0 its expert 1's 6, shard 1 expert 0's 2 moved off shard 0
    assert {s: sorted(v) for s, v in rows_by_shard(sink).items()} == {0: [6], 1: [2, 8]}
    backend.report_balancedness()
    assert gauges(sink) == [(str(LAYER), pytest.approx(8 / 10))]  # mean 8, max 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_and_balancedness_match_the_planner_under_a_replicated_placement(seed):
    placement = Placement.explicit(E, [[0, 1, 2, 3], [0, 4, 5], [0, 6, 7]])  # hot expert 0 on every shard
    gen = torch.Generator().manual_seed(seed)
    hidden, logits = torch.randn(40, 32, generator=gen), torch.randn(40, E, generator=gen)
    logits[:, 0] += 2.0
    logits[:, 1] += 1.0  # expert 1 is warm too, and on shard 0 only: shard 0 should take little of expert 0
    weights, ids = torch.topk(logits.softmax(-1), 2)
    sink = MemorySink()
    backend = sharded(placement, CountingTransport(shards_of(placement)), sink)
    backend(LAYER, hidden, weights, ids)
    counts = torch.bincount(ids.flatten(), minlength=E).tolist()
    want = shard_loads(split_rows(counts, placement.holder_table()), placement.num_shards)
    got = rows_by_shard(sink)
    assert [sum(got.get(s, [])) for s in range(3)] == want and sum(want) == ids.numel()
    backend.report_balancedness()
    [planned] = balancedness(torch.tensor([counts]), LayeredPlacement((placement,)))
    assert gauges(sink) == [(str(LAYER), pytest.approx(planned))]


def test_balancedness_over_several_steps_and_layers_is_the_planners_on_the_window_load():
    layouts = {1: Placement.contiguous(E, 3), 3: Placement.round_robin(E, 3)}
    shards = {s: {layer: experts(p.experts_of(s)) for layer, p in layouts.items()} for s in range(3)}
    clock, sink = Clock(), MemorySink()
    backend = sharded(layouts, CountingTransport(shards), sink, clock)
    load = torch.zeros(2, E, dtype=torch.int64)
    for step in range(4):
        hidden, weights, ids = _layer_inputs(tokens=6 + step, seed=10 + step)
        for i, layer in enumerate(layouts):
            routed = ids if layer == 1 else ids % 4  # layer 3: experts 0-3 only
            backend(layer, hidden, weights, routed)
            load[i] += torch.bincount(routed.flatten(), minlength=E)
        clock.t += 1.0
    backend.report_balancedness()
    want = balancedness(load, LayeredPlacement(tuple(layouts.values())))
    assert gauges(sink)[-2:] == [("1", pytest.approx(want[0])), ("3", pytest.approx(want[1]))]
    assert want[1] < want[0]  # layer 3's load sits on shards 0 and 1 (round robin of experts 0-3 over 3 shards)


def test_balancedness_is_set_as_a_step_starts_at_most_every_few_seconds():
    placement = Placement.contiguous(E, 2)
    clock, sink = Clock(), MemorySink()
    backend = sharded({1: placement, 3: placement}, CountingTransport(shards_of(placement, (1, 3))), sink, clock)
    hidden, weights, ids = _layer_inputs()

    def step():
        for layer in (1, 3):
            backend(layer, hidden, weights, ids)

    step()  # nothing to report before the first step has run
    assert gauges(sink) == []
    step()  # the second step starts with both layers' rows in the window
    assert [layer for layer, _ in gauges(sink)] == ["1", "3"]
    for _ in range(3):
        clock.t += BALANCE_REPORT_S / 4
        step()
    assert len(gauges(sink)) == 2
    clock.t += BALANCE_REPORT_S / 4
    step()
    assert len(gauges(sink)) == 4
    assert len(rows_by_shard(sink, layer=3)[0]) == 6  # rows are observed on every call


def test_a_window_of_other_shards_is_refused():
    with pytest.raises(ValueError, match="shard_rows counts 3 shards, the placement has 2"):
        ShardedExpertBackend(Placement.contiguous(E, 2), CountingTransport({}), shard_rows=ShardRowsWindow(3, 60.0))


class SlowShardTransport(FlakyTransport):
    """Shard `slow`'s answers take `delay_s` to arrive (its collect waits that long after the send)."""

    def __init__(self, shards, slow: int, delay_s: float, fails=None):
        super().__init__(shards, fails or {})
        self.slow, self.delay_s = slow, delay_s

    def start(self, layer, calls):
        sent, results = time.perf_counter(), self.run(layer, calls)

        def collect():
            if self.slow in calls:
                time.sleep(max(0.0, sent + self.delay_s - time.perf_counter()))
            return results

        return collect


def layer_waits(sink: MemorySink) -> list[float]:
    out = []
    for name, value, labels in sink.records:
        if name == LAYER_DISPATCH.name:
            assert labels == {"model": "m", "layer": str(LAYER)}
            out.append(value)
    return out


def test_a_layers_dispatch_lasts_until_its_slower_shard_answers_once_per_layer_call():
    placement, shards, hidden, weights, ids = _hot_expert_step()
    sink = MemorySink()
    backend = sharded(placement, SlowShardTransport(shards, slow=1, delay_s=0.2), sink)
    backend(LAYER, hidden, weights, ids)
    backend(LAYER, hidden, weights, ids)
    waits = layer_waits(sink)
    assert len(waits) == 2 and all(0.2 <= w < 1.0 for w in waits)
    fast = MemorySink()
    sharded(placement, SlowShardTransport(shards, slow=5, delay_s=0.2), fast)(LAYER, hidden, weights, ids)
    assert layer_waits(fast)[0] < 0.2  # no shard of this step is slow


def test_a_layers_dispatch_counts_its_retries_once():
    placement, shards, hidden, weights, ids = _hot_expert_step()
    sink = MemorySink()
    transport = SlowShardTransport(shards, slow=1, delay_s=0.1, fails={0: 1})  # shard 0 fails its first call
    backend = sharded(placement, transport, sink, policy=RetryPolicy(pause_s=0.001))
    backend(LAYER, hidden, weights, ids)
    # two rounds, each waiting 0.1 s for shard 1 (the second carries the rows moved off shard 0)
    [wait] = layer_waits(sink)
    assert len(transport.calls) == 2 and wait >= 0.2
