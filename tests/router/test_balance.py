"""Replicated experts go to their least-loaded live holder."""

from __future__ import annotations

import pytest

from router.balance import least_loaded_holders


def test_replicated_expert_goes_to_the_holder_with_less_fixed_load():
    # expert 0 on shards 0 and 1; shard 0 also must take expert 1's 10 rows, shard 1 expert 2's 3
    holders = [(0, 1), (0,), (1,)]
    assert least_loaded_holders([5, 10, 3], holders) == [1, 0, 1]
    assert least_loaded_holders([5, 3, 10], holders) == [0, 0, 1]


def test_heaviest_replicated_expert_is_placed_first_and_ties_take_the_lowest_shard():
    holders = [(0, 1), (0, 1), (0, 1)]
    # 9 rows -> shard 0 (tie), 5 -> shard 1, 4 -> shard 1 (5 < 9): loads 9 | 9
    assert least_loaded_holders([4, 9, 5], holders) == [1, 0, 1]


def test_down_holders_are_skipped_unless_every_holder_is_down():
    holders = [(0, 1), (1,), (1, 2)]
    assert least_loaded_holders([4, 0, 4], holders, down={0}) == [1, 1, 2]
    assert least_loaded_holders([4, 0, 4], holders, down={0, 1, 2}) == [0, 1, 1]  # first holders: must wait


def test_counts_and_holders_must_agree():
    with pytest.raises(ValueError, match="3 counts for 2 experts"):
        least_loaded_holders([1, 2, 3], [(0,), (1,)])
