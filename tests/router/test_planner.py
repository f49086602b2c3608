"""The placement planner: valid per-layer placements with the promised slots, better than contiguous, optimal on
small cases, deterministic; the hierarchical mode keeps expert groups on their node."""

from __future__ import annotations

import random

import pytest
import torch

from router.placement import LayeredPlacement, Placement, PlacementError
from router.planner import balancedness, plan, slot_counts


def zipf_load(layers, experts, s=1.0, tokens=4096, seed=0):
    """[layers, experts] expected rows, expert ranks shuffled per layer."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.arange(1, experts + 1, dtype=torch.float64) ** -s
    p = p / p.sum() * tokens
    return torch.stack([p[torch.argsort(torch.randperm(experts, generator=gen))] for _ in range(layers)]).round().long()


def check_slots(placement: LayeredPlacement, num_experts: int, num_shards: int, redundant: int):
    want = slot_counts(num_experts, num_shards, redundant)
    for i, layer in enumerate(placement.layers):
        assert [len(ids) for ids in layer.shards] == want, i  # every slot filled, the promised counts
        assert all(len(set(ids)) == len(ids) for ids in layer.shards)  # no expert twice on a shard
        assert set().union(*layer.shards) == set(range(num_experts)), i  # every expert somewhere


def test_slot_counts_are_equal_or_differ_by_one_with_the_first_shards_larger():
    assert slot_counts(256, 32, 32) == [9] * 32
    assert slot_counts(256, 32, 16) == [9] * 16 + [8] * 16
    assert slot_counts(256, 144, 0) == [2] * 112 + [1] * 32


@pytest.mark.parametrize(("shards", "redundant"), [(1, 0), (3, 0), (4, 5), (8, 8), (5, 11), (16, 4)])
def test_every_layer_is_a_valid_placement_with_the_promised_slots(shards, redundant):
    load = zipf_load(layers=3, experts=16)
    placement = plan(load, shards, redundant)
    assert placement.num_layers == 3 and placement.num_shards == shards and placement.num_experts == 16
    check_slots(placement, 16, shards, redundant)


@pytest.mark.parametrize("seed", range(30))
def test_small_random_loads_always_give_valid_placements(seed):
    # zero loads, ties and many copies on few shards: cases where a copy finds every free shard holding its
    # expert, so another expert must move to make room
    rng = random.Random(seed)
    experts, shards = rng.randint(2, 6), rng.randint(2, 5)
    redundant = rng.randint(max(0, shards - experts), experts * (shards - 1))
    load = torch.tensor([[rng.choice([0, 0, 1, 2, 5, 9, 30]) for _ in range(experts)] for _ in range(2)])
    for split in ("load", "even"):
        check_slots(plan(load, shards, redundant, split=split), experts, shards, redundant)


def test_a_copy_that_finds_no_free_shard_makes_room():
    load = torch.tensor([[1, 1, 5, 2]])  # 4 experts, 17 copies on 5 shards: found to need the move
    check_slots(plan(load, 5, 13), 4, 5, 13)


def test_no_redundancy_is_longest_processing_time_packing():
    load = torch.tensor([[5, 4, 3, 3, 3, 2]])
    placement = plan(load, num_shards=2, redundant=0)
    assert placement.layers[0].shards == ((0, 3, 5), (1, 2, 4))  # 5+3+2 | 4+3+3
    assert balancedness(load, placement) == [1.0]


def test_the_hot_expert_is_replicated_and_its_rows_split_unevenly_reach_the_optimum():
    load = torch.tensor([[12, 6, 1, 1]])  # 20 rows, 10 a shard at best; expert 0 alone is 12
    placement = plan(load, num_shards=2, redundant=1)  # 5 slots: 3 | 2
    assert placement.layers[0].holders(0) == (0, 1)
    assert balancedness(load, placement) == [1.0]  # expert 0 gives 3 rows to the shard with 6 + 1, 9 to the other
    # split evenly, the same placement would leave one shard with 6 + 6 + 1 = 13 of the 20
    assert balancedness(load, placement, split="even") == [pytest.approx(10 / 13)]


def test_two_experts_on_both_shards_level_them_exactly():
    load = torch.tensor([[90, 10, 10, 10]])
    placement = plan(load, num_shards=2, redundant=2)
    assert placement.layers[0].shards == ((0, 1, 2), (0, 1, 3))
    assert balancedness(load, placement) == [1.0]


def test_each_layer_replicates_its_own_hot_expert():
    load = torch.tensor([[40, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 40]])
    placement = plan(load, num_shards=3, redundant=3)
    assert len(placement.layers[0].holders(0)) == 3 and len(placement.layers[1].holders(5)) == 3
    assert placement.layers[0] != placement.layers[1]
    assert all(b > 0.95 for b in balancedness(load, placement))


@pytest.mark.parametrize(("shards", "redundant"), [(4, 0), (4, 4), (8, 8), (6, 3)])
def test_the_plan_is_at_least_as_balanced_as_contiguous(shards, redundant):
    load = zipf_load(layers=4, experts=24, s=1.2, seed=shards + redundant)
    planned = balancedness(load, plan(load, shards, redundant))
    contiguous = balancedness(load, LayeredPlacement.uniform(Placement.contiguous(24, shards), 4))
    assert all(p >= c for p, c in zip(planned, contiguous, strict=True)), (planned, contiguous)
    assert sum(planned) > sum(contiguous)


def test_split_by_load_is_never_worse_than_even_on_the_same_placement():
    load = zipf_load(layers=4, experts=32, s=1.4, seed=3)
    for placement in (plan(load, 8, 8), plan(load, 8, 8, split="even")):
        by_load, even = balancedness(load, placement), balancedness(load, placement, split="even")
        assert all(a >= b - 1e-12 for a, b in zip(by_load, even, strict=True))


def test_the_same_load_gives_the_same_plan():
    load = zipf_load(layers=3, experts=32, seed=5)
    assert plan(load, 8, 8) == plan(load.clone(), 8, 8)
    assert plan(load, 8, 8, num_groups=4, num_nodes=2) == plan(load.clone(), 8, 8, num_groups=4, num_nodes=2)


def test_fractional_loads_are_scaled_rows():
    load = zipf_load(layers=2, experts=16, seed=1)
    shares = load.double() / load.sum(1, keepdim=True)  # the same load as fractions of each layer
    check_slots(plan(shares, 4, 4), 16, 4, 4)
    assert balancedness(shares, plan(shares, 4, 4)) == pytest.approx(balancedness(load, plan(load, 4, 4)), abs=1e-3)


def test_a_layer_without_load_is_balanced():
    load = torch.zeros(1, 8, dtype=torch.long)
    placement = plan(load, 4, 4)
    check_slots(placement, 8, 4, 4)
    assert balancedness(load, placement) == [1.0]


def test_hierarchical_keeps_each_group_on_one_node():
    load = zipf_load(layers=3, experts=32, s=1.0, seed=2)  # 8 groups of 4 consecutive experts
    placement = plan(load, num_shards=8, redundant=8, num_groups=8, num_nodes=4)  # nodes of shards {0,1}, {2,3}...
    check_slots(placement, 32, 8, 8)
    for layer in placement.layers:
        holders = layer.holder_table()
        for group in range(8):
            nodes = {s // 2 for e in range(group * 4, (group + 1) * 4) for s in holders[e]}
            assert len(nodes) == 1, (group, nodes)  # the whole group, replicas too, on one node
        groups_per_node = [{e // 4 for s in (2 * n, 2 * n + 1) for e in layer.shards[s]} for n in range(4)]
        assert [len(g) for g in groups_per_node] == [2, 2, 2, 2]


def test_hierarchical_with_one_node_is_the_flat_plan():
    load = zipf_load(layers=2, experts=16, seed=4)
    assert plan(load, 4, 4, num_groups=4, num_nodes=1) == plan(load, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_shards=20, redundant=2), "20 shards need at least one slot each, but 16 experts \\+ 2 redundant"),
        (dict(num_shards=2, redundant=17), "redundant=17 copies do not fit: 16 experts on 2 shards"),
        (dict(num_shards=0, redundant=0), "need num_shards >= 1"),
        (dict(num_shards=4, redundant=4, num_nodes=2), "num_nodes=2 needs num_groups"),
        (dict(num_shards=4, redundant=4, num_groups=3, num_nodes=1), None),  # one node: groups are not used
        (dict(num_shards=4, redundant=4, num_groups=3, num_nodes=3), "num_experts=16 to be a multiple of num_groups=3"),
        (dict(num_shards=6, redundant=4, num_groups=4, num_nodes=4), "num_shards=6 to be a multiple of num_nodes=4"),
        (dict(num_shards=4, redundant=3, num_groups=4, num_nodes=2), "redundant=3 to be a multiple of num_nodes=2"),
    ],
)
def test_impossible_requests_name_the_count_at_fault(kwargs, message):
    load = zipf_load(layers=1, experts=16)
    if message is None:
        plan(load, **kwargs)
        return
    with pytest.raises(PlacementError, match=message):
        plan(load, **kwargs)


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (torch.tensor([1, 2, 3]), r"\[layers, experts\] tensor .* got \(3,\)"),
        (torch.zeros(0, 4), r"got \(0, 4\)"),
        (torch.tensor([[1, 2], [3, -1]]), r"load\[1\]\[1\] = -1: loads must be finite and non-negative"),
        (torch.tensor([[1.0, float("nan")]]), r"load\[0\]\[1\] = nan"),
    ],
)
def test_bad_loads_are_named(load, message):
    with pytest.raises(PlacementError, match=message):
        plan(load, 2, 0)


def test_balancedness_needs_a_placement_of_the_load_shape():
    with pytest.raises(PlacementError, match="load has 2 layers of 8 experts, the placement 1 of 8"):
        balancedness(torch.ones(2, 8), LayeredPlacement.uniform(Placement.contiguous(8, 2), 1))
