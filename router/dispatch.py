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
    """
    if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= num_experts):
        raise ValueError(
            f"group_by_expert: expert ids must be in 0..{num_experts - 1}, "
            f"got {int(experts.min())}..{int(experts.max())}"
        )
    order = torch.sort(experts, stable=True).indices  # [A]
    counts = torch.bincount(experts, minlength=num_experts)  # [E]
    return order, counts


def split_by_shard(assignments: Assignments, expert_to_shard: Tensor, num_shards: int) -> list[ShardBatch | None]:
    """Split assignments into one batch per shard; ``None`` for a shard with no rows (do not call it).

    expert_to_shard: [E] int64, the shard that holds each expert.
    A token routed to two experts of the same shard is sent to that shard once.
    """
    if expert_to_shard.numel() and (int(expert_to_shard.min()) < 0 or int(expert_to_shard.max()) >= num_shards):
        raise ValueError(
            f"split_by_shard: expert_to_shard values must be in 0..{num_shards - 1}, "
            f"got {int(expert_to_shard.min())}..{int(expert_to_shard.max())}"
        )
    if assignments.experts.numel() and int(assignments.experts.max()) >= expert_to_shard.numel():
        raise ValueError(
            f"split_by_shard: expert id {int(assignments.experts.max())} has no shard "
            f"(expert_to_shard covers {expert_to_shard.numel()} experts)"
        )
    shard_of = expert_to_shard.to(assignments.experts.device)[assignments.experts]  # [A]
    batches: list[ShardBatch | None] = []
    for shard in range(num_shards):
        mine = (shard_of == shard).nonzero().squeeze(1)  # [A_s] positions in the assignments
        if mine.numel() == 0:
            batches.append(None)
            continue
        # unique(sorted=True) gives the shard's rows in batch order, and `inverse` maps each of its
        # assignments to a position in them: exactly the re-indexing the shard needs.
        rows, local_rows = torch.unique(assignments.rows[mine], sorted=True, return_inverse=True)  # [R], [A_s]
        batches.append(
            ShardBatch(
                rows=rows,
                local_rows=local_rows,
                experts=assignments.experts[mine],  # [A_s]
                weights=assignments.weights[mine],  # [A_s]
            )
        )
    return batches


def combine(out: Tensor, rows: Tensor, partial: Tensor) -> Tensor:
    """Add a shard's weighted partial sums [R, D] into ``out`` [T, D] at ``rows`` [R]; in place.

    Returns ``out``. ``partial`` is cast to ``out``'s dtype first.
    """
    if partial.shape != (rows.shape[0], out.shape[1]):
        raise ValueError(
            f"combine: partial must be [rows={rows.shape[0]}, hidden={out.shape[1]}], got {tuple(partial.shape)}"
        )
    return out.index_add_(0, rows.to(out.device), partial.to(device=out.device, dtype=out.dtype))
