"""Moving token rows to experts and back, as pure functions.

The gate gives every token K (expert id, weight) pairs. Dispatch flattens them into assignments,
groups them by expert (for one matmul per expert) or by shard (for one call per shard), and combine
scatter-adds the weighted expert outputs back into the token rows.

Usage, one MoE layer across shards::

    a = flatten(weights, ids)
    out = torch.zeros_like(hidden)
    for b in split_by_shard(a, expert_to_shard, num_shards):
        if b is not None:
            combine(out, b.rows, shard(hidden[b.rows], b.local_rows, b.experts, b.weights))

With replicated experts, whose rows router/balance.py splits between holders, pick a shard per assignment::

    batches = split_assignments(a, assignment_shards(a.experts, split), num_shards)
"""

from dataclasses import dataclass

import torch
from torch import Tensor

# T = tokens, K = experts per token, E = experts, A = assignments (K * T), D = hidden,
# S = shards, R = rows one shard needs, A_s = assignments of one shard


@dataclass(frozen=True)
class Assignments:
    """Flat (token row, expert id, weight) triples, one per (token, chosen expert)."""

    rows: Tensor  # [A] int64 token row in the batch
    experts: Tensor  # [A] int64 global expert id
    weights: Tensor  # [A] float32 gate weight


@dataclass(frozen=True)
class ShardBatch:
    """What one shard is sent: the token rows it needs and its assignments indexed into them."""

    rows: Tensor  # [R] int64 sorted unique token rows of the batch; send hidden[rows]
    local_rows: Tensor  # [A_s] int64 index into `rows` (0..R-1)
    experts: Tensor  # [A_s] int64 global expert id
    weights: Tensor  # [A_s] float32 gate weight


def flatten(weights: Tensor, ids: Tensor) -> Assignments:
    """Turn the gate's ``(weights [T, K], ids [T, K])`` into assignments [K * T], slot-major.

    Slot-major (all tokens' first choice, then all second choices, ...) means that after a stable
    group_by_expert each expert sees its rows in the same order as transformers' experts loop.
    That order matters: a matmul's rounding can depend on a row's position in the batch.
    """
    if weights.shape != ids.shape or ids.ndim != 2:
        raise ValueError(
            f"flatten: weights and ids must both be [tokens, top_k], got {tuple(weights.shape)} and {tuple(ids.shape)}"
        )
    tokens, top_k = ids.shape
    rows = torch.arange(tokens, device=ids.device).repeat(top_k)  # [A] 0,1,..,T-1, 0,1,..,T-1, ...
    return Assignments(
        rows=rows,
        experts=ids.t().reshape(-1).long(),  # [A]
        weights=weights.t().reshape(-1).float(),  # [A]
    )


def group_by_expert(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Sort assignments by expert.

    experts: [A] int64 ids in 0..num_experts-1.
    Returns ``(order [A], counts [E])``: ``experts[order]`` is ascending, assignments of the same
    expert keep their original order (stable), and ``counts[e]`` is how many go to expert e, so
    ``torch.split(order, counts.tolist())`` gives each expert's assignments.

    No host sync here (the caller's ``counts.tolist()`` is the one a split needs): an id past the range
    shows in the length of bincount's result, so the check costs nothing; a negative id fails in bincount.
    """
    order = torch.sort(experts, stable=True).indices  # [A]
    counts = torch.bincount(experts, minlength=num_experts)  # [E], longer if an id is >= num_experts
    if counts.numel() > num_experts:
        raise ValueError(f"group_by_expert: expert ids must be in 0..{num_experts - 1}, got {int(experts.max())}")
    return order, counts


def check_expert_map(expert_to_shard: Tensor, num_shards: int) -> None:
    """Raise ValueError unless every expert maps to a shard in 0..num_shards-1. Called once, when a
    placement is installed, so that split_by_shard need not check (and sync) on every call."""
    if expert_to_shard.ndim != 1 or expert_to_shard.numel() == 0:
        raise ValueError(f"expert_to_shard must be a non-empty [E] tensor, got shape {tuple(expert_to_shard.shape)}")
    low, high = int(expert_to_shard.min()), int(expert_to_shard.max())
    if low < 0 or high >= num_shards:
        raise ValueError(f"expert_to_shard values must be in 0..{num_shards - 1}, got {low}..{high}")


def split_by_shard(
    assignments: Assignments, expert_to_shard: Tensor, num_shards: int, num_rows: int | None = None
) -> list[ShardBatch | None]:
    """Split assignments into one batch per shard, every row of an expert to the one shard ``expert_to_shard``
    names; ``None`` for a shard with no rows (do not call it).

    expert_to_shard: [E] int64, the shard that holds each expert (checked once by check_expert_map; the gate only
    picks ids in 0..E-1). num_rows: as in ``split_assignments``.
    """
    shard_of = expert_to_shard.to(assignments.experts.device)[assignments.experts]  # [A]
    return split_assignments(assignments, shard_of, num_shards, num_rows)


def split_assignments(
    assignments: Assignments, shard_of: Tensor, num_shards: int, num_rows: int | None = None
) -> list[ShardBatch | None]:
    """Split assignments into one batch per shard, assignment a to shard ``shard_of[a]``; ``None`` for a shard
    with no rows (do not call it). Rows of one replicated expert may go to several shards this way
    (``router.balance.assignment_shards`` says which).

    shard_of: [A] int64 in 0..num_shards-1, on the assignments' device. num_rows: a bound on the token rows (T);
    the default, A, holds for what ``flatten`` gives, not for a subset of it (assignments sent again after a
    failure). A token routed to two experts of the same shard is sent to that shard once. Two host syncs whatever
    the number of shards: unique's result size, and the counts that cut the flat results into per-shard pieces.
    """
    if assignments.experts.numel() == 0:
        return [None] * num_shards
    if shard_of.shape != assignments.experts.shape:
        raise ValueError(
            f"split_assignments: shard_of has shape {tuple(shard_of.shape)}, the assignments "
            f"{tuple(assignments.experts.shape)}; give one shard per assignment"
        )
    a = max(assignments.experts.numel(), num_rows or 0)  # > every row index
    order = torch.sort(shard_of, stable=True).indices  # [A] grouped by shard, original order inside
    # One key per (shard, row): unique(sorted) lists each shard's rows in batch order, shard after shard,
    # and `inverse` maps every assignment to its row's place in that list.
    keys = shard_of[order] * a + assignments.rows[order]  # [A]; rows < a, so keys never collide
    unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)  # [U], [A]
    ones = torch.ones_like(unique_keys)
    rows_per_shard = torch.zeros(num_shards, dtype=torch.long, device=keys.device).index_add_(
        0, unique_keys // a, ones
    )  # [S]
    assignments_per_shard = torch.bincount(shard_of, minlength=num_shards)  # [S]
    row_counts, assignment_counts = torch.stack([rows_per_shard, assignments_per_shard]).tolist()  # host sync
    row_start = torch.cumsum(rows_per_shard, 0) - rows_per_shard  # [S] where each shard's rows begin
    pieces = zip(
        (unique_keys % a).split(row_counts),  # S x [R]
        (inverse - row_start[shard_of[order]]).split(assignment_counts),  # S x [A_s] index into its rows
        assignments.experts[order].split(assignment_counts),  # S x [A_s]
        assignments.weights[order].split(assignment_counts),  # S x [A_s]
        strict=True,
    )
    return [
        ShardBatch(rows=rows, local_rows=local_rows, experts=experts, weights=weights) if rows.numel() else None
        for rows, local_rows, experts, weights in pieces
    ]


def combine(out: Tensor, rows: Tensor, partial: Tensor) -> Tensor:
    """Add a shard's weighted partial sums [R, D] into ``out`` [T, D] at ``rows`` [R]; in place.

    Returns ``out``. ``partial`` is cast to ``out``'s dtype first.
    """
    if partial.shape != (rows.shape[0], out.shape[1]):
        raise ValueError(
            f"combine: partial must be [rows={rows.shape[0]}, hidden={out.shape[1]}], got {tuple(partial.shape)}"
        )
    return out.index_add_(0, rows.to(out.device), partial.to(device=out.device, dtype=out.dtype))
