"""Which holder serves a replicated expert in one step: the least-loaded live one.

A placement may put a hot expert on several shards (router/placement.py). Each step, the rows of such
an expert go to the one of its holders with the least work so far in that step, counting first the
rows every shard must take (its experts held nowhere else), then the replicated experts, heaviest
first. A shard that is down is skipped while another holder is up.

Usage::

    holders = [placement.holders(e) for e in range(placement.num_experts)]
    counts = torch.bincount(ids.flatten(), minlength=E).tolist()   # rows per expert this step
    shard_of = least_loaded_holders(counts, holders, down={1})     # [E] shard per expert
"""

from collections.abc import Collection, Sequence

# E = experts, S = shards


def least_loaded_holders(
    counts: Sequence[int], holders: Sequence[Sequence[int]], down: Collection[int] = ()
) -> list[int]:
    """The shard each expert's rows go to this step, [E].

    counts: rows routed to each expert in the step, [E]. holders: the shards holding each expert,
    ascending (at least one each). down: shards to avoid; an expert whose holders are all down keeps its
    first holder (its rows must wait for that shard). Ties go to the lowest shard id, so the choice is
    deterministic.
    """
    if len(counts) != len(holders):
        raise ValueError(f"least_loaded_holders: {len(counts)} counts for {len(holders)} experts")
    shard_of = [hs[0] for hs in holders]  # an expert held once, or a replicated one with no load: first holder
    load: dict[int, int] = {}
    replicated = []
    for expert, hs in enumerate(holders):
        if len(hs) == 1:
            load[hs[0]] = load.get(hs[0], 0) + counts[expert]
        elif counts[expert]:
            replicated.append(expert)
    for expert in sorted(replicated, key=lambda e: (-counts[e], e)):  # heaviest first: a greedy bin packing
        live = [s for s in holders[expert] if s not in down] or list(holders[expert][:1])
        best = min(live, key=lambda s: (load.get(s, 0), s))
        shard_of[expert] = best
        load[best] = load.get(best, 0) + counts[expert]
    return shard_of
