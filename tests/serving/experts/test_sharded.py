"""Sharded experts give the same numbers as in-process experts, and call only shards with rows."""

from __future__ import annotations

import pytest
import torch

from router.gate import GateSpec, top_k_gate
from router.placement import Placement
from serving.experts.local import LocalExpertBackend, StackedExperts
from serving.experts.sharded import InProcessTransport, ShardedExpertBackend

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


@pytest.mark.parametrize(
    "placement", [Placement.contiguous(E, 1), Placement.contiguous(E, 3), Placement.round_robin(E, 4)]
)
def test_sharded_equals_local(placement):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, D, generator=gen)
    weights, ids = top_k_gate(torch.randn(20, E, generator=gen), GateSpec(num_experts=E, top_k=2, renormalize=True))
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
def test_sharded_equals_local_on_the_device(device):
    """On the accelerator: shard calls built on the device, sent through a transport that hands results
    back on the host (as HandleTransport's replicas do), combined on the device again."""

    class HostTransport(InProcessTransport):  # what a remote shard does: rows in on its device, results out on host
        def run(self, layer, calls):
            return {s: out.cpu() for s, out in super().run(layer, {s: c.to(device) for s, c in calls.items()}).items()}

    def on_device(stack: StackedExperts) -> StackedExperts:
        return StackedExperts(stack.gate_up.to(device), stack.down.to(device), stack.expert_ids.to(device))

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, D, generator=gen).to(device)
    weights, ids = top_k_gate(torch.randn(20, E, generator=gen).to(device), GateSpec(num_experts=E, top_k=2))
    local = LocalExpertBackend({LAYER: on_device(experts(range(E)))})(LAYER, hidden, weights, ids)
    placement = Placement.contiguous(E, 3)
    shards = {s: {LAYER: on_device(experts(placement.experts_of(s)))} for s in range(3)}
    sharded = ShardedExpertBackend(placement, HostTransport(shards))(LAYER, hidden, weights, ids)
    assert sharded.device.type == device.type
    torch.testing.assert_close(sharded, local, rtol=1e-6, atol=1e-6)
