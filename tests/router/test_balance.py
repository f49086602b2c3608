"""Rows of replicated experts are split between live holders so that the heaviest shard is as light as it can be."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from router.balance import assignment_shards, shard_loads, split_rows, water_fill


def best_max_load(counts, holders, down=()):
    """The lowest possible max shard load, by trying every split (tiny cases only)."""
    options = []
    for rows, hs in zip(counts, holders, strict=True):
        live = [s for s in hs if s not in down] or [hs[0]]
        # every way to give `rows` rows to the live holders
        options.append([c for c in itertools.product(range(rows + 1), repeat=len(live)) if sum(c) == rows])
        options[-1] = [tuple(zip(live, c, strict=True)) for c in options[-1]]
    shards = 1 + max(s for hs in holders for s in hs)
    best = None
    for choice in itertools.product(*options):
        load = [0] * shards
        for pieces in choice:
            for s, rows in pieces:
                load[s] += rows
        best = max(load) if best is None else min(best, max(load))
    return best


def check_valid(split, counts, holders, down=()):
    for e, (pieces, rows, hs) in enumerate(zip(split, counts, holders, strict=True)):
        assert sum(n for _, n in pieces) == rows, e
        assert all(n > 0 for _, n in pieces) and [s for s, _ in pieces] == sorted(s for s, _ in pieces)
        live = [s for s in hs if s not in down] or [hs[0]]
        assert {s for s, _ in pieces} <= set(live), (e, pieces, live)


def test_the_docstring_case_levels_a_shard_with_fixed_rows():
    # shard 0 must take expert 1's 4 rows, so replicated expert 0 gives it 1 row and shard 1 the other 5
    assert split_rows([6, 4, 0], [(0, 1), (0,), (1,)]) == [((0, 1), (1, 5)), ((0, 4),), ()]


def test_an_odd_row_goes_to_the_lowest_shard():
    assert split_rows([5], [(0, 1)]) == [((0, 3), (1, 2))]
    assert split_rows([5], [(2, 3)]) == [((2, 3), (3, 2))]


def test_a_chain_of_replicated_experts_is_levelled_beyond_the_greedy():
    # 0 on shards {0, 1}, 1 on {1, 2}: the greedy pours 0 as 5|5, then 1 over shards 1 and 2 (max 8); the optimum
    # moves rows of 0 onto shard 0 so that 1 can leave more on shard 1: loads 7, 7, 6
    counts, holders = [10, 10], [(0, 1), (1, 2)]
    assert max(shard_loads(split_rows(counts, holders, max_moves=0), 3)) == 8
    split = split_rows(counts, holders)
    assert max(shard_loads(split, 3)) == 7 == best_max_load(counts, holders)
    check_valid(split, counts, holders)


@pytest.mark.parametrize("seed", range(40))
def test_split_rows_finds_the_optimum_of_an_exhaustive_search(seed):
    # mostly two holders an expert, so that replicated experts chain shards together (the greedy alone misses
    # the optimum in 4 of these 40 cases)
    rng = random.Random(seed)
    shards, experts = rng.randint(3, 5), rng.randint(3, 5)
    holders = [tuple(sorted(rng.sample(range(shards), rng.choice([1, 2, 2, 2])))) for _ in range(experts)]
    counts = [rng.randint(0, 8) for _ in range(experts)]
    down = {rng.randrange(shards)} if seed % 4 == 0 else set()
    split = split_rows(counts, holders, down)
    check_valid(split, counts, holders, down)
    assert max(shard_loads(split, shards)) == best_max_load(counts, holders, down), (counts, holders, down)


def test_a_down_holder_gets_nothing_while_another_is_up():
    holders = [(0, 1), (1,), (1, 2)]
    split = split_rows([4, 0, 4], holders, down={0})
    assert split == [((1, 4),), (), ((2, 4),)]  # 0's rows all on shard 1; 2's all on 2 (1 already has 4)
    # an expert held only by the down shard still goes there (its rows must wait), and so does one whose
    # holders are all down (its first holder)
    assert split_rows([3, 2], [(0,), (0, 1)], down={0}) == [((0, 3),), ((1, 2),)]
    assert split_rows([3, 2], [(0,), (0, 1)], down={0, 1}) == [((0, 3),), ((0, 2),)]


def test_counts_and_holders_must_agree_and_counts_be_non_negative():
    with pytest.raises(ValueError, match="3 counts for 2 experts"):
        split_rows([1, 2, 3], [(0,), (1,)])
    with pytest.raises(ValueError, match=r"counts\[1\] = -1 is negative"):
        split_rows([1, -1], [(0,), (1,)])
    with pytest.raises(ValueError, match="expert 0 has rows but no holder"):
        split_rows([1], [()])


def test_water_fill_raises_the_lowest_bins_first():
    assert water_fill(7, [3, 0, 0, 10]) == [1, 3, 3, 0]  # all three low bins end at 4
    assert water_fill(0, [1, 2]) == [0, 0]
    assert water_fill(5, [0, 0]) == [3, 2]  # the odd unit to the first bin


def test_assignment_shards_follows_the_split_in_assignment_order():
    experts = torch.tensor([2, 0, 2, 1, 2, 0, 2])  # expert 2 has 4 assignments, at positions 0, 2, 4, 6
    split = [((0, 1), (1, 1)), ((1, 1),), ((0, 3), (3, 1))]
    shards = assignment_shards(experts, split)
    assert shards.dtype == torch.int64 and shards.device == experts.device
    assert shards.tolist() == [0, 0, 0, 1, 0, 1, 3]  # 2: first three to shard 0, the last to 3; 0: one each
    counted = {(e, s): 0 for e, pieces in enumerate(split) for s, _ in pieces}
    for e, s in zip(experts.tolist(), shards.tolist(), strict=True):
        counted[(e, s)] += 1
    assert counted == {(e, s): n for e, pieces in enumerate(split) for s, n in pieces}


def test_assignment_shards_of_no_assignments():
    assert assignment_shards(torch.zeros(0, dtype=torch.int64), [(), ()]).tolist() == []
