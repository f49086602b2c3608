"""How one step's rows of a replicated expert are split between its holders: by load, to level the shards.

A placement may put a hot expert on several shards (router/placement.py). Each step, the rows of every
expert held once go to its shard (fixed load); the rows of a replicated expert may go to any of its live
holders, in any proportion, and ``split_rows`` chooses the proportions that minimise the heaviest shard's
rows. A shard that is down gets no rows of an expert another live holder has.

Usage::

    holders = [placement.holders(e) for e in range(placement.num_experts)]
    counts = torch.bincount(ids.flatten(), minlength=E).tolist()   # rows per expert this step
    split = split_rows(counts, holders, down={1})                 # [E] ((shard, rows), ...) per expert
    shard_loads(split, num_shards)                                 # [S] rows each shard computes
    assignment_shards(experts, split)                              # [A] shard of each assignment (dispatch)

How: the rows of every expert held by one live shard are placed first. Then each replicated expert, heaviest
first, is *water-filled* into its live holders: its rows raise the lowest holders to a common level (integer
rows; the few left over go one each to the lowest-numbered of them). That greedy can be off when a later expert
would have balanced an earlier one's holders better, so it is followed by augmenting paths, as in max-flow:
the heaviest shard hands rows, through a chain of replicated experts, to the lightest shard it can reach, until
every shard it reaches is within one row of it. Then no split has a lower maximum (``_level`` says why), so the
result is exact; ``max_moves`` (far above what levelling takes) only bounds the work of a pathological step.
tests/router/test_balance.py checks it against exhaustive search.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

# E = experts, S = shards, A = (row, expert) assignments

Split = list[tuple[tuple[int, int], ...]]  # [E]: ((shard, rows), ...) per expert, shards ascending, rows > 0

MAX_MOVES = 1024  # augmenting moves per call at most (module docstring); far more than levelling needs


def split_rows(
    counts: Sequence[int],
    holders: Sequence[Sequence[int]],
    down: Collection[int] = (),
    max_moves: int = MAX_MOVES,
) -> Split:
    """How many of each expert's rows each of its shards takes this step, minimising the heaviest shard's rows.

    counts: rows routed to each expert in the step, [E] (non-negative integers). holders: the shards holding each
    expert, ascending, no repeats (``Placement.holder_table()``; at least one each). down: shards to keep rows
    off; an expert whose holders are all down sends every row to its first holder (they must wait for that
    shard). Returns [E] tuples of (shard, rows) with rows > 0, ascending by shard, summing to ``counts[e]``
    (empty for an expert with no rows). Deterministic.

    >>> split_rows([6, 4, 0], [(0, 1), (0,), (1,)])   # shard 0 has 4 fixed rows: expert 0 gives it 1, shard 1 5
    [((0, 1), (1, 5)), ((0, 4),), ()]
    """
    if len(counts) != len(holders):
        raise ValueError(f"split_rows: {len(counts)} counts for {len(holders)} experts")
    load: dict[int, int] = {}
    split: Split = [()] * len(counts)
    live: dict[int, list[int]] = {}  # expert -> its live holders, for experts with rows and >= 2 live holders
    for expert, rows in enumerate(counts):
        if rows <= 0:
            if rows < 0:
                raise ValueError(f"split_rows: counts[{expert}] = {rows} is negative")
            continue
        hs = holders[expert]
        if len(hs) > 1:
            up = [s for s in hs if s not in down] if down else list(hs)
            if len(up) > 1:
                live[expert] = up
                for s in up:
                    load.setdefault(s, 0)
                continue
            hs = up or hs  # one live holder, or every holder down: the first waits
        if not hs:
            raise ValueError(f"split_rows: expert {expert} has rows but no holder")
        split[expert] = ((hs[0], rows),)
        load[hs[0]] = load.get(hs[0], 0) + rows
    if not live:
        return split
    share: dict[int, dict[int, int]] = {}  # expert -> {live holder: rows}
    for expert in sorted(live, key=lambda e: (-counts[e], e)):  # greedy: heaviest first, each water-filled
        poured = water_fill(counts[expert], [load[s] for s in live[expert]])
        share[expert] = dict(zip(live[expert], poured, strict=True))
        for s, rows in share[expert].items():
            load[s] += rows
    _level(load, share, live, max_moves)
    for expert, rows_on in share.items():
        split[expert] = tuple((s, rows) for s, rows in sorted(rows_on.items()) if rows)
    return split


def _level(load: dict[int, int], share: dict[int, dict[int, int]], live: dict[int, list[int]], max_moves: int) -> None:
    """Move rows along augmenting paths from the heaviest shard until it can shed none (in place).

    A path a -> ... -> b follows replicated experts: a step x -> y through expert e needs e to have rows on x
    and y to be a live holder of e. Moving d rows along it (each expert gives d rows from x to y) lowers only a
    and raises only b. The heaviest shard a sends to the lightest shard b it reaches while load[b] <= load[a] - 2.
    When a reaches no such b, every shard a reaches is within one row of it, and no expert with rows there can
    leave that set, so no split does better than load[a]: the max is optimal.
    """
    experts_on: dict[int, list[int]] = {}
    for expert, hs in live.items():
        for s in hs:
            experts_on.setdefault(s, []).append(expert)
    for _ in range(max_moves):
        a = max(load, key=lambda s: (load[s], -s))  # the heaviest shard (lowest id on ties)
        parent: dict[int, tuple[int, int] | None] = {a: None}
        queue, b = [a], a
        for x in queue:  # breadth first over shards reachable from a
            for expert in experts_on.get(x, ()):
                if share[expert][x] == 0:
                    continue
                for y in live[expert]:
                    if y not in parent:
                        parent[y] = (x, expert)
                        queue.append(y)
                        if (load[y], y) < (load[b], b):
                            b = y
        if load[a] - load[b] < 2:
            return
        path = []
        y = b
        while (step := parent[y]) is not None:
            path.append((step[0], step[1], y))
            y = step[0]
        moved = min([(load[a] - load[b]) // 2] + [share[expert][x] for x, expert, _ in path])
        for x, expert, y in path:
            share[expert][x] -= moved
            share[expert][y] += moved
        load[a] -= moved
        load[b] += moved


def water_fill(rows: int, levels: Sequence[int]) -> list[int]:
    """Integer water-filling: ``rows`` units over bins at ``levels``, each unit onto a lowest bin (ties: the
    first). Returns the units per bin; the result minimises the highest bin and the sum of squares."""
    order = sorted(range(len(levels)), key=lambda i: (levels[i], i))
    # Find how many of the lowest bins the water covers: the k lowest rise to level t = (rows + sum) / k,
    # which must not pass the (k+1)-th lowest.
    total, k = 0, 0
    for k in range(1, len(order) + 1):
        total += levels[order[k - 1]]
        if k == len(order) or (rows + total) <= levels[order[k]] * k:
            break
    level, extra = divmod(rows + total, k)  # the k lowest end at `level`, `extra` of them (lowest index) one higher
    out = [0] * len(levels)
    for rank, i in enumerate(sorted(order[:k])):
        out[i] = level - levels[i] + (rank < extra)
    return out


def shard_loads(split: Split, num_shards: int) -> list[int]:
    """Rows each shard takes under ``split``, [S]."""
    load = [0] * num_shards
    for pieces in split:
        for shard, rows in pieces:
            load[shard] += rows
    return load


def assignment_shards(experts: Tensor, split: Split) -> Tensor:
    """The shard of every assignment, [A] int64 on experts' device: what ``router.dispatch.split_assignments``
    takes. Of an expert's assignments, in their order, the first go to its first piece's shard, the next to the
    second's, and so on. ``split`` must come from this step's counts of ``experts`` (pieces sum to them).
    One host-to-device copy of the pieces; no sync."""
    shards, rows = [], []
    for pieces in split:
        for shard, n in pieces:
            shards.append(shard)
            rows.append(n)
    device = experts.device
    order = torch.sort(experts, stable=True).indices  # [A] assignments grouped by expert, original order inside
    # Pieces are listed expert after expert, exactly as `order` lists the assignments, so repeating each
    # piece's shard by its rows gives the shard of each assignment in that order.
    table = torch.tensor([shards, rows], dtype=torch.int64).to(device)  # [2, pieces]: shard, rows
    sorted_shards = torch.repeat_interleave(table[0], table[1], output_size=experts.numel())  # [A]
    out = torch.empty_like(experts)
    out[order] = sorted_shards
    return out
