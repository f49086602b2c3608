"""Planning expert placement from measured load: replicate hot experts and pack the copies onto shards, per layer.

Usage::

    load = torch.tensor(rows)                              # [L, E] rows routed to each expert, per MoE layer
    placement = plan(load, num_shards=32, redundant=32)    # LayeredPlacement: one Placement per layer
    per_layer = balancedness(load, placement)              # [L] mean shard load / max shard load
    before = balancedness(load, LayeredPlacement.uniform(Placement.contiguous(E, 32), L))

Redundant slots. ``redundant = R`` is R expert copies beyond the E originals, in every layer: a layer has
P = E + R slots, one copy each (DeepSeek EPLB's num_physical = E + R). Every shard gets P // S slots, and when
S does not divide P the first P % S shards get one more (as ``Placement.contiguous`` splits experts), so slot
counts, and the memory for expert weights, differ by at most one. Every slot is filled: copies beyond what
balance needs still serve as failover holders. No shard holds an expert twice, so an expert has at most S
copies; a plan needs S <= E + R and R <= E * (S - 1).

Balancedness of a layer is mean shard load / max shard load (1.0 for a layer with no load), where the rows of a
replicated expert are split between its holders by ``router.balance.split_rows``, the function the router runs
every step, so the figure is what dispatch does. ``split="even"`` splits them evenly instead (what DeepSeek's
EPLB assumes), and the planner then optimises for that.

Algorithm, for each layer (S shards, load w_e of expert e):
1. Copies. One per expert, then the R extra copies one at a time to the expert with the highest load per copy,
   w_e / n_e (the D'Hondt rule; it minimises the largest w_e / n_e, a lower bound on the max shard load under
   any split), never more than S copies of one expert.
2. Packing. Copies in order of decreasing w_e / n_e, each to the least-loaded shard with a free slot that does
   not hold that expert yet (longest-processing-time-first bin packing with slot counts). Two ways to count a
   shard's load while packing, and the plan keeps the one whose result has the lower max load under the chosen
   split (ties: the first): (a) each copy carries w_e / n_e; (b) with ``split="load"`` only, loads as
   ``water_fill`` levels them: a replicated expert's rows flow between its holders as copies and other experts
   land, so shards linked by replicated experts fill as one level. If no shard can take a copy (every shard
   with a free slot holds that expert), a copy of another expert moves from a full shard to one with a free
   slot to make room; such a pair always exists because slot counts differ by at most one.

Hierarchical (``num_groups`` with ``num_nodes > 1``), for DeepSeek-style group-limited routing, where a token's
experts lie in a few of ``num_groups`` groups of consecutive expert ids: shards form ``num_nodes`` nodes of
consecutive shard ids; whole groups are packed onto nodes (equal numbers, heaviest group first onto the
lightest node with room), then each node is planned as above over its own shards with R / num_nodes copies.
A token's rows then stay on the nodes of its groups, but balance is capped by how evenly whole groups fill the
nodes (benchmarks/README.md, "Placement"). It needs E % num_groups, num_groups % num_nodes, num_shards %
num_nodes and redundant % num_nodes to be 0. With ``num_nodes == 1`` groups do not matter and are ignored.

Loads: integer loads are rows as given; fractional loads (averages, shares) are scaled to 2**20 rows per layer
and rounded first.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from router.balance import shard_loads, split_rows, water_fill
from router.placement import LayeredPlacement, Placement, PlacementError

# L = MoE layers, E = experts, S = shards, P = slots (copies) per layer

SplitMode = Literal["load", "even"]
SCALED_ROWS = 2**20  # rows per layer that a fractional load is scaled to


def plan(
    load: Tensor,
    num_shards: int,
    redundant: int,
    num_groups: int | None = None,
    num_nodes: int = 1,
    split: SplitMode = "load",
) -> LayeredPlacement:
    """A placement for each layer of ``load`` [L, E] that minimises its heaviest shard's load (see the module
    docstring for the slot rules and the algorithm). Deterministic: the same load gives the same placement.

    >>> plan(torch.tensor([[90, 10, 10, 10]]), num_shards=2, redundant=2).layers[0].shards  # 0 and 1 on both
    ((0, 1, 2), (0, 1, 3))
    """
    rows = load_rows(load)
    num_experts = len(rows[0])
    slot_counts(num_experts, num_shards, redundant)  # checks the counts, naming the one at fault
    if num_nodes == 1:
        layers = [_plan_layer(w, num_shards, redundant, split) for w in rows]
    else:
        _check_hierarchy(num_experts, num_shards, redundant, num_groups, num_nodes)
        assert num_groups is not None  # checked above; narrows the type
        layers = [_plan_hierarchical(w, num_shards, redundant, num_groups, num_nodes, split) for w in rows]
    return LayeredPlacement(tuple(Placement(tuple(map(tuple, shards)), num_experts) for shards in layers))


def balancedness(load: Tensor, placement: LayeredPlacement, split: SplitMode = "load") -> list[float]:
    """Mean shard load / max shard load for each layer of ``load`` [L, E] under ``placement``, [L]; the rows of a
    replicated expert split by ``split_rows`` (``split="load"``) or evenly."""
    rows = load_rows(load)
    if (len(rows), len(rows[0])) != (placement.num_layers, placement.num_experts):
        raise PlacementError(
            f"balancedness: load has {len(rows)} layers of {len(rows[0])} experts, the placement "
            f"{placement.num_layers} of {placement.num_experts}"
        )
    return [
        _balance(_loads(w, layer.holder_table(), layer.num_shards, split))
        for w, layer in zip(rows, placement.layers, strict=True)
    ]


def slot_counts(num_experts: int, num_shards: int, redundant: int) -> list[int]:
    """Slots of each shard for E + R copies: ``slot_counts(256, 32, 16) == [9] * 16 + [8] * 16``."""
    if num_shards < 1 or redundant < 0:
        raise PlacementError(f"plan: need num_shards >= 1 and redundant >= 0, got {num_shards} and {redundant}")
    if num_shards > num_experts + redundant:
        raise PlacementError(
            f"plan: {num_shards} shards need at least one slot each, but {num_experts} experts + {redundant} "
            f"redundant give {num_experts + redundant}; use fewer shards or more redundant slots"
        )
    if redundant > num_experts * (num_shards - 1):
        raise PlacementError(
            f"plan: redundant={redundant} copies do not fit: {num_experts} experts on {num_shards} shards, at most "
            f"one copy of an expert per shard, leave room for {num_experts * (num_shards - 1)}"
        )
    base, extra = divmod(num_experts + redundant, num_shards)
    return [base + (s < extra) for s in range(num_shards)]


def load_rows(load: Tensor) -> list[list[int]]:
    """``load`` [L, E] as integer rows per layer (fractional loads scaled to 2**20 rows a layer), checked."""
    if not isinstance(load, Tensor) or load.ndim != 2 or load.shape[0] == 0 or load.shape[1] == 0:
        shape = tuple(load.shape) if isinstance(load, Tensor) else type(load).__name__
        raise PlacementError(f"load must be a [layers, experts] tensor with at least one of each, got {shape}")
    x = load.double() if load.is_floating_point() else load.long()
    bad = (x < 0) | x.isnan() | x.isinf()
    if bad.any():
        layer, expert = bad.nonzero()[0].tolist()
        raise PlacementError(
            f"load[{layer}][{expert}] = {x[layer, expert].item()}: loads must be finite and non-negative"
        )
    if load.is_floating_point():
        total = x.sum(1, keepdim=True)  # [L, 1]
        x = (x / total.clamp(min=1e-300) * SCALED_ROWS).round().long()  # [L, E]; a layer of zeros stays zero
    return x.tolist()


def copy_counts(w: Sequence[int], num_shards: int, redundant: int) -> list[int]:
    """Copies of each expert for one layer's rows ``w`` [E], [E] summing to E + redundant: the D'Hondt rule
    (module docstring), at most ``num_shards`` each, ties to the lower id. ``max(w[e] / copies[e])`` is then as
    low as any choice of copies makes it, so it bounds the max shard load of any placement of E + R copies."""
    copies = [1] * len(w)
    heap = [(-float(load), e) for e, load in enumerate(w)]  # highest load per copy first
    heapq.heapify(heap)
    for _ in range(redundant):
        while True:
            _, e = heapq.heappop(heap)
            if copies[e] < num_shards:  # an expert on every shard takes no more (and leaves the heap)
                break
        copies[e] += 1
        heapq.heappush(heap, (-w[e] / copies[e], e))
    return copies


def _plan_layer(w: list[int], num_shards: int, redundant: int, split: SplitMode) -> list[list[int]]:
    """One layer's shards (expert ids per shard) for loads ``w`` [E]."""
    caps = slot_counts(len(w), num_shards, redundant)
    copies = copy_counts(w, num_shards, redundant)
    candidates = [_pack(w, copies, caps, fluid=False)]
    if split == "load":
        candidates.append(_pack(w, copies, caps, fluid=True))
    return min(candidates, key=lambda shards: max(_loads(w, _holders(shards, len(w)), num_shards, split)))


def _plan_hierarchical(
    w: list[int], num_shards: int, redundant: int, num_groups: int, num_nodes: int, split: SplitMode
) -> list[list[int]]:
    """Whole groups onto nodes, then each node planned on its own (module docstring)."""
    size, per_node, node_shards = len(w) // num_groups, num_groups // num_nodes, num_shards // num_nodes
    group_load = [sum(w[g * size : (g + 1) * size]) for g in range(num_groups)]
    node_load, node_groups = [0] * num_nodes, [[] for _ in range(num_nodes)]
    for g in sorted(range(num_groups), key=lambda g: (-group_load[g], g)):
        node = min((n for n in range(num_nodes) if len(node_groups[n]) < per_node), key=lambda n: (node_load[n], n))
        node_groups[node].append(g)
        node_load[node] += group_load[g]
    shards: list[list[int]] = []
    for groups in node_groups:
        ids = sorted(e for g in groups for e in range(g * size, (g + 1) * size))  # node-local expert i is ids[i]
        local = _plan_layer([w[e] for e in ids], node_shards, redundant // num_nodes, split)
        shards += [[ids[i] for i in held] for held in local]
    return shards


def _check_hierarchy(num_experts: int, num_shards: int, redundant: int, num_groups: int | None, num_nodes: int) -> None:
    if num_groups is None:
        raise PlacementError(f"plan: num_nodes={num_nodes} needs num_groups (the expert groups kept on one node)")
    for what, value, by in [
        ("num_experts", num_experts, num_groups),
        ("num_groups", num_groups, num_nodes),
        ("num_shards", num_shards, num_nodes),
        ("redundant", redundant, num_nodes),
    ]:
        if by < 1 or value % by:
            raise PlacementError(
                f"plan: hierarchical placement needs {what}={value} to be a multiple of "
                f"{'num_groups' if what == 'num_experts' else 'num_nodes'}={by}"
            )
    slot_counts(num_experts // num_nodes, num_shards // num_nodes, redundant // num_nodes)  # each node on its own


class _Packing:
    """Shards being filled: the experts each holds and its load so far, each copy carrying w_e / n_e
    (``fluid=False``) or replicated experts' rows levelled over their holders by water_fill (``fluid=True``).

    Shards with a free slot sit in a heap keyed (load, experts held, shard id); an entry whose key is no longer
    the shard's own is stale and skipped, and every change of a shard's key pushes a fresh one.
    """

    def __init__(self, w: Sequence[int], copies: Sequence[int], caps: Sequence[int], fluid: bool):
        self.w, self.copies, self.caps, self.fluid = w, copies, caps, fluid
        self.shards: list[list[int]] = [[] for _ in caps]
        self.held: list[set[int]] = [set() for _ in caps]
        self.load: list[float] = [0] * len(caps)  # ints while fluid (water_fill counts rows)
        self.holders: dict[int, list[int]] = {}  # fluid: replicated expert -> its shards so far
        self.share: dict[int, list[int]] = {}  # fluid: replicated expert -> its rows on each of those shards
        self.flowing: list[list[int]] = [[] for _ in caps]  # fluid: replicated experts on each shard
        self.heap: list[tuple[float, int, int]] = [(0, 0, s) for s, cap in enumerate(caps) if cap > 0]

    def place(self, e: int) -> None:
        """One more copy of expert ``e``: onto the least-loaded eligible shard, making room if none is."""
        skipped = []
        while self.heap:
            entry = heapq.heappop(self.heap)
            s = entry[2]
            if entry != self._key(s) or len(self.shards[s]) == self.caps[s]:
                continue  # stale, or full
            if e in self.held[s]:
                skipped.append(entry)
                continue
            for kept in skipped:
                heapq.heappush(self.heap, kept)
            self._add(e, s)
            return
        for kept in skipped:
            heapq.heappush(self.heap, kept)
        # Every shard with a free slot holds e. Take a full shard u without e and move one of its experts that
        # the free shard t lacks onto t; u's freed slot takes e. Such an expert exists: u has at least as many
        # experts as t (caps differ by <= 1 and t is not full), and t holds e, which u does not.
        t = min((s for s in range(len(self.caps)) if len(self.shards[s]) < self.caps[s]), key=self._key)
        u = min((s for s in range(len(self.caps)) if e not in self.held[s]), key=self._key)
        x = min((x for x in self.shards[u] if x not in self.held[t]), key=lambda x: (self.w[x] / self.copies[x], x))
        self._remove(x, u)
        self._add(x, t)
        self._add(e, u)

    def _key(self, s: int) -> tuple[float, int, int]:
        return (self.load[s], len(self.shards[s]), s)

    def _changed(self, s: int) -> None:
        if len(self.shards[s]) < self.caps[s]:
            heapq.heappush(self.heap, self._key(s))

    def _add(self, e: int, s: int) -> None:
        self.shards[s].append(e)
        self.held[s].add(e)
        if not self.fluid:
            self.load[s] += self.w[e] / self.copies[e]
        elif self.copies[e] == 1:
            self.load[s] += self.w[e]
            for f in self.flowing[s]:  # the new rows push replicated experts' rows towards their other holders
                self._pour(f)
        else:
            self.holders.setdefault(e, []).append(s)
            self.share.setdefault(e, []).append(0)
            self.flowing[s].append(e)
            self._pour(e)
        self._changed(s)

    def _remove(self, e: int, s: int) -> None:
        self.shards[s].remove(e)
        self.held[s].discard(e)
        if not self.fluid:
            self.load[s] -= self.w[e] / self.copies[e]
        elif self.copies[e] == 1:
            self.load[s] -= self.w[e]
            for f in self.flowing[s]:
                self._pour(f)
        else:
            i = self.holders[e].index(s)
            self.load[s] -= self.share[e].pop(i)
            del self.holders[e][i]
            self.flowing[s].remove(e)
            self._pour(e)
        self._changed(s)

    def _pour(self, e: int) -> None:
        """Take replicated expert e's rows out and water-fill them over its holders again."""
        hs, old = self.holders[e], self.share[e]
        for s, rows in zip(hs, old, strict=True):
            self.load[s] -= rows
        self.share[e] = water_fill(self.w[e], [self.load[s] for s in hs])
        for s, rows, before in zip(hs, self.share[e], old, strict=True):
            self.load[s] += rows
            if rows != before:
                self._changed(s)


def _pack(w: Sequence[int], copies: Sequence[int], caps: Sequence[int], fluid: bool) -> list[list[int]]:
    """Longest-processing-time-first packing of every copy (module docstring, step 2); expert ids per shard."""
    packing = _Packing(w, copies, caps, fluid)
    for e in sorted(range(len(w)), key=lambda e: (-w[e] / copies[e], e)):
        for _ in range(copies[e]):
            packing.place(e)
    return packing.shards


def _holders(shards: Sequence[Sequence[int]], num_experts: int) -> list[list[int]]:
    table: list[list[int]] = [[] for _ in range(num_experts)]
    for s, ids in enumerate(shards):
        for e in ids:
            table[e].append(s)
    return table


def _loads(w: Sequence[int], holders: Sequence[Sequence[int]], num_shards: int, split: SplitMode) -> list[float]:
    """Each shard's rows when replicated experts' rows are split by load (split_rows) or evenly."""
    if split == "load":
        return [float(x) for x in shard_loads(split_rows(w, holders), num_shards)]
    load = [0.0] * num_shards
    for e, hs in enumerate(holders):
        for s in hs:
            load[s] += w[e] / len(hs)
    return load


def _balance(load: Sequence[float]) -> float:
    peak = max(load)
    return sum(load) / len(load) / peak if peak > 0 else 1.0
