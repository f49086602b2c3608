import pytest
import torch

from router.balance import assignment_shards, split_rows
from router.dispatch import (
    Assignments,
    check_expert_map,
    combine,
    flatten,
    group_by_expert,
    split_assignments,
    split_by_shard,
)

# 8 experts on 3 uneven shards: {0, 1, 2}, {3, 4, 5}, {6, 7}
EXPERT_TO_SHARD = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def random_routing(tokens=12, experts=8, top_k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return weights, ids


def naive_moe(hidden, weights, ids, expert_mats):
    """out[t] = sum_k weights[t, k] * hidden[t] @ expert_mats[ids[t, k]], one token at a time."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            out[t] += weights[t, k] * (hidden[t] @ expert_mats[ids[t, k]])
    return out


def linear_experts(hidden, local_rows, experts, weights, expert_mats):
    """A stand-in shard: each assignment adds weight * hidden[row] @ W_expert to its row."""
    partial = torch.zeros_like(hidden)
    for row, e, w in zip(local_rows.tolist(), experts.tolist(), weights.tolist(), strict=True):
        partial[row] += w * (hidden[row] @ expert_mats[e])
    return partial


def test_flatten_is_slot_major():
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]], dtype=torch.bfloat16)
    a = flatten(weights, torch.tensor([[5, 1], [2, 5], [0, 3]]))
    assert a.rows.tolist() == [0, 1, 2, 0, 1, 2]
    assert a.experts.tolist() == [5, 2, 0, 1, 5, 3]
    assert a.weights.dtype == torch.float32
    assert a.weights.tolist() == weights.float().t().reshape(-1).tolist()
    # Grouped by expert, expert 5 sees token 0 (its first choice) before token 1 (its second).
    order, _ = group_by_expert(a.experts, num_experts=6)
    assert a.rows[order].tolist() == [2, 0, 1, 2, 0, 1]


def test_flatten_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="flatten"):
        flatten(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.int64))


def test_group_by_expert_is_stable_and_counts_empty_experts():
    experts = torch.tensor([3, 0, 3, 1, 0, 3])
    order, counts = group_by_expert(experts, num_experts=5)
    assert order.tolist() == [1, 4, 3, 0, 2, 5]  # stable: equal experts keep their positions' order
    assert counts.tolist() == [2, 1, 0, 3, 0]  # experts 2 and 4 get no rows
    assert [c.tolist() for c in order.split(counts.tolist())] == [[1, 4], [3], [], [0, 2, 5], []]


def test_group_by_expert_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="0..3"):
        group_by_expert(torch.tensor([0, 4]), num_experts=4)


def test_split_by_shard_uneven_shards():
    weights, ids = random_routing()
    a = flatten(weights, ids)
    batches = split_by_shard(a, EXPERT_TO_SHARD, num_shards=3)
    assert len(batches) == 3
    seen = []
    for shard, b in enumerate(batches):
        assert b is not None
        assert set(EXPERT_TO_SHARD[b.experts].tolist()) == {shard}
        want_rows = sorted(
            {r for r, e in zip(a.rows.tolist(), a.experts.tolist(), strict=True) if EXPERT_TO_SHARD[e] == shard}
        )
        assert b.rows.tolist() == want_rows  # unique and sorted: a token is sent once per shard
        seen += list(zip(b.rows[b.local_rows].tolist(), b.experts.tolist(), b.weights.tolist(), strict=True))
    everything = list(zip(a.rows.tolist(), a.experts.tolist(), a.weights.tolist(), strict=True))
    assert sorted(seen) == sorted(everything)  # every assignment lands on exactly one shard


def test_shard_with_no_rows_is_none():
    ids = torch.tensor([[0, 3], [4, 1], [2, 5]])  # nothing on shard 2 (experts 6, 7)
    batches = split_by_shard(flatten(torch.ones(3, 2), ids), EXPERT_TO_SHARD, num_shards=3)
    assert batches[2] is None
    assert batches[0] is not None and batches[0].rows.tolist() == [0, 1, 2]
    assert batches[1] is not None and batches[1].experts.tolist() == [4, 3, 5]  # slot-major
    assert batches[1].local_rows.tolist() == [1, 0, 2]


def test_bad_maps_are_refused_once_and_bad_ids_still_fail_loudly():
    check_expert_map(EXPERT_TO_SHARD, num_shards=3)
    with pytest.raises(ValueError, match=r"0\.\.1, got 0\.\.2"):
        check_expert_map(EXPERT_TO_SHARD, num_shards=2)
    with pytest.raises(ValueError, match="non-empty"):
        check_expert_map(torch.tensor([], dtype=torch.long), num_shards=2)
    # split_by_shard does not check per call (a host sync); an id past the map is still an error, not a wrong row
    with pytest.raises(IndexError, match="index 8"):
        split_by_shard(flatten(torch.ones(1, 1), torch.tensor([[8]])), EXPERT_TO_SHARD, num_shards=3)


def test_combine_of_split_equals_unsplit():
    weights, ids = random_routing(tokens=10, seed=1)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    expert_mats = torch.randn(8, 4, 4, generator=gen, dtype=torch.float64)
    out = torch.zeros_like(hidden)
    for b in split_by_shard(flatten(weights, ids), EXPERT_TO_SHARD, num_shards=3):
        assert b is not None
        partial = linear_experts(hidden[b.rows], b.local_rows, b.experts, b.weights, expert_mats)
        assert combine(out, b.rows, partial) is out  # in place
    torch.testing.assert_close(out, naive_moe(hidden, weights.double(), ids, expert_mats))


def test_rows_of_one_expert_split_between_shards_combine_to_the_unsplit_result():
    # every expert on both of 2 shards; split_rows levels them, so most experts' rows go to both
    weights, ids = random_routing(tokens=16, seed=3)
    a = flatten(weights, ids)
    counts = torch.bincount(a.experts, minlength=8).tolist()
    split = split_rows(counts, [(0, 1)] * 8)
    shard_of = assignment_shards(a.experts, split)  # [A]
    batches = split_assignments(a, shard_of, num_shards=2)
    assert [b.experts.numel() for b in batches] == [16, 16]  # 32 assignments, levelled
    assert any(len(pieces) == 2 for pieces in split)  # some expert's rows really are on both shards
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    expert_mats = torch.randn(8, 4, 4, generator=gen, dtype=torch.float64)
    out = torch.zeros_like(hidden)
    for shard, b in enumerate(batches):
        assert b.rows.tolist() == sorted(set(a.rows[shard_of == shard].tolist()))  # each token once per shard
        combine(out, b.rows, linear_experts(hidden[b.rows], b.local_rows, b.experts, b.weights, expert_mats))
    torch.testing.assert_close(out, naive_moe(hidden, weights.double(), ids, expert_mats))


def test_split_assignments_needs_one_shard_per_assignment():
    a = flatten(torch.ones(2, 2), torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"shard_of has shape \(3,\), the assignments \(4,\)"):
        split_assignments(a, torch.zeros(3, dtype=torch.int64), num_shards=2)


def test_combine_casts_and_checks_shape():
    out = torch.zeros(4, 2, dtype=torch.bfloat16)
    combine(out, torch.tensor([1, 3]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert out.tolist() == [[0, 0], [1, 2], [0, 0], [3, 4]]
    with pytest.raises(ValueError, match="partial"):
        combine(out, torch.tensor([1, 3]), torch.zeros(2, 3))


def test_assignments_are_frozen():
    a = flatten(torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64))
    assert isinstance(a, Assignments)
    with pytest.raises(AttributeError):
        a.rows = torch.zeros(1)  # type: ignore[misc]
