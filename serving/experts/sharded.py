"""Routed experts held by shards, reached through a transport: the remote side of the ExpertBackend seam.

Shape legend: T = tokens in the step, D = hidden, K = experts per token,
R_s = token rows sent to shard s, A_s = (row, expert) assignments of shard s.

Per MoE layer and engine step this makes at most one call per shard, carrying every row routed to
that shard by every request in the step, and no call to a shard that got no rows. All calls go out
before any result is awaited, so shards compute concurrently. Each shard returns its weighted partial
sums; they are added up here in shard order (a fixed order, so results do not depend on timing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from router.dispatch import check_expert_map, combine, flatten, split_by_shard
from router.placement import Placement
from serving.experts.backend import LayerExperts


@dataclass(frozen=True)
class ShardCall:
    """One shard's work for one layer: rows and their (row, expert, weight) assignments."""

    hidden: Tensor  # [R_s, D] the rows this shard needs
    local_rows: Tensor  # [A_s] int64 index into hidden
    experts: Tensor  # [A_s] int64 global expert ids, all held by the shard
    weights: Tensor  # [A_s] gate weights

    def to(self, device: torch.device | str) -> ShardCall:
        """The same call with every tensor on `device` (a no-op where they are already)."""
        return ShardCall(*(t.to(device) for t in (self.hidden, self.local_rows, self.experts, self.weights)))


class ShardTransport(Protocol):
    """Sends every call of one layer and returns each shard's partial sums [R_s, D]."""

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor]: ...


class ShardedExpertBackend:
    """ExpertBackend whose experts live on the shards of `placement`, reached through `transport`.

    >>> backend = ShardedExpertBackend(Placement.contiguous(8, 2), InProcessTransport(shard_experts))
    >>> out = backend(layer, hidden, weights, ids)  # same numbers as LocalExpertBackend
    """

    def __init__(self, placement: Placement, transport: ShardTransport):
        self.placement, self.transport = placement, transport
        self.expert_to_shard = placement.expert_to_shard()  # [E]
        check_expert_map(self.expert_to_shard, placement.num_shards)  # once, not per call

    def __call__(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        if self.expert_to_shard.device != ids.device:  # once: the map lives where the gate's ids are
            self.expert_to_shard = self.expert_to_shard.to(ids.device)
        batches = split_by_shard(flatten(weights, ids), self.expert_to_shard, self.placement.num_shards)
        calls = {
            shard: ShardCall(hidden[b.rows], b.local_rows, b.experts, b.weights)  # [R_s, D], [A_s] x3
            for shard, b in enumerate(batches)
            if b is not None
        }
        partials = self.transport.run(layer, calls)  # {shard: [R_s, D]}, wherever the transport delivers them
        out = torch.zeros_like(hidden)  # [T, D]
        for shard in sorted(partials):
            combine(out, batches[shard].rows, partials[shard])  # moves a host result to out's device
        return out


def run_shard_call(layers: dict[int, LayerExperts], layer: int, call: ShardCall) -> Tensor:
    """What a shard does with a call: its experts of `layer` over the rows it was sent. [R_s, D]"""
    return layers[layer].forward(call.hidden, call.local_rows, call.experts, call.weights)


class InProcessTransport:
    """Calls shards living in this process, one after another: tests and overhead baselines."""

    def __init__(self, shards: dict[int, dict[int, LayerExperts]]):
        self.shards = shards  # shard -> layer -> experts

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor]:
        return {shard: run_shard_call(self.shards[shard], layer, call) for shard, call in calls.items()}
