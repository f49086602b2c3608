"""Expert placement: which shard holds which routed experts.

A ``Placement`` is one MoE layer's layout: for each shard, the experts it holds. An expert may sit on several
shards (replicas of a hot expert); every expert must sit on at least one. The serving runtime today uses one
``Placement`` for every layer. A ``LayeredPlacement`` holds one per MoE layer, as the planner
(router/planner.py) makes them: hot experts differ from layer to layer, so a shard may hold different expert
ids in different layers (the same shards and the same number of experts in each).

Usage::

    p = build_placement("contiguous", num_experts=8, num_shards=3)
    p.shards                     # ((0, 1, 2), (3, 4, 5), (6, 7))
    print(p.describe())          # shard 0: experts 0-2 (3) ...
    batches = split_by_shard(assignments, p.expert_to_shard(), p.num_shards)

    layered = LayeredPlacement.from_json([[[0, 1], [1, 2, 3]], [[2, 3], [0, 1, 3]]], num_experts=4)
    layered.layers[1].holders(3)   # (0, 1): expert 3 is replicated in layer 1
    layered.experts_of(0)          # ((0, 1), (2, 3)): what shard 0 loads, per layer
"""

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

# E = experts

Strategy = Literal["contiguous", "round_robin", "explicit"]


class PlacementError(ValueError):
    """A placement that cannot serve the model: the message names the expert, shard or count at fault."""


@dataclass(frozen=True)
class Placement:
    """For each shard, the sorted global expert ids it holds; ``num_experts`` routed experts in all.

    Build one with ``contiguous``, ``round_robin`` or ``explicit`` (or ``build_placement`` from the
    app config). Ids of each shard are sorted on construction, so equal placements compare equal.
    """

    shards: tuple[tuple[int, ...], ...]
    num_experts: int

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise PlacementError(f"Placement: num_experts must be >= 1, got {self.num_experts}")
        if len(self.shards) == 0:
            raise PlacementError("Placement: needs at least one shard, got none")
        # Normalise once, here: sorted int tuples, so lists from a config are accepted as well.
        object.__setattr__(self, "shards", tuple(tuple(sorted(operator.index(e) for e in ids)) for ids in self.shards))
        for shard, ids in enumerate(self.shards):
            if not ids:
                raise PlacementError(f"Placement: shard {shard} holds no experts; drop it or give it experts")
            for e in ids:
                if not 0 <= e < self.num_experts:
                    raise PlacementError(
                        f"Placement: shard {shard} holds expert {e}, outside 0..{self.num_experts - 1}"
                    )
            dups = sorted({e for a, e in zip(ids, ids[1:], strict=False) if a == e})
            if dups:
                raise PlacementError(f"Placement: shard {shard} lists experts {dups} more than once")
        missing = sorted(set(range(self.num_experts)).difference(*self.shards))
        if missing:
            raise PlacementError(
                f"Placement: experts {missing} are on no shard; every expert 0..{self.num_experts - 1} needs one"
            )

    @classmethod
    def contiguous(cls, num_experts: int, num_shards: int) -> "Placement":
        """Consecutive ranges; the first ``num_experts % num_shards`` shards get one expert more.

        ``Placement.contiguous(8, 3).shards == ((0, 1, 2), (3, 4, 5), (6, 7))``
        """
        _check_counts(num_experts, num_shards)
        base, extra = divmod(num_experts, num_shards)
        shards, start = [], 0
        for shard in range(num_shards):
            size = base + (shard < extra)
            shards.append(tuple(range(start, start + size)))
            start += size
        return cls(tuple(shards), num_experts)

    @classmethod
    def round_robin(cls, num_experts: int, num_shards: int) -> "Placement":
        """Expert e on shard ``e % num_shards``: ``Placement.round_robin(8, 3).shards[0] == (0, 3, 6)``."""
        _check_counts(num_experts, num_shards)
        return cls(tuple(tuple(range(s, num_experts, num_shards)) for s in range(num_shards)), num_experts)

    @classmethod
    def explicit(cls, num_experts: int, shards: Sequence[Sequence[int]]) -> "Placement":
        """Any layout, e.g. hot expert 0 replicated: ``Placement.explicit(4, [[0, 1], [0, 2, 3]])``."""
        return cls(tuple(tuple(ids) for ids in shards), num_experts)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def experts_of(self, shard: int) -> tuple[int, ...]:
        """The sorted global expert ids that ``shard`` holds."""
        if not 0 <= shard < self.num_shards:
            raise PlacementError(f"Placement: shard {shard} does not exist (num_shards={self.num_shards})")
        return self.shards[shard]

    def holders(self, expert: int) -> tuple[int, ...]:
        """The shards holding ``expert``, ascending; more than one for a replicated expert."""
        if not 0 <= expert < self.num_experts:
            raise PlacementError(f"Placement: expert {expert} outside 0..{self.num_experts - 1}")
        return tuple(s for s, ids in enumerate(self.shards) if expert in ids)

    def holder_table(self) -> tuple[tuple[int, ...], ...]:
        """``holders(e)`` for every expert at once, [E] (one pass over the shards, not one per expert)."""
        table: list[list[int]] = [[] for _ in range(self.num_experts)]
        for shard, ids in enumerate(self.shards):
            for e in ids:
                table[e].append(shard)
        return tuple(tuple(hs) for hs in table)

    def expert_to_shard(self, replica_choice: Sequence[int] | None = None) -> Tensor:
        """The one shard each expert's rows go to, as [E] int64 (what ``split_by_shard`` takes).

        replica_choice: optional [E]; ``replica_choice[e]`` indexes ``holders(e)``. ``None`` (the
            default) picks index 0: the lowest-numbered shard holding the expert. An index past an
            expert's holders is an error, so a non-replicated expert must be given 0.
        """
        if replica_choice is not None and len(replica_choice) != self.num_experts:
            raise PlacementError(
                f"expert_to_shard: replica_choice must have num_experts={self.num_experts} entries, "
                f"got {len(replica_choice)}"
            )
        mapping = []
        for e in range(self.num_experts):
            holders = self.holders(e)
            pick = 0 if replica_choice is None else replica_choice[e]
            if not 0 <= pick < len(holders):
                raise PlacementError(
                    f"expert_to_shard: replica_choice[{e}]={pick}, but expert {e} is on {len(holders)} "
                    f"shard(s) {list(holders)}; use 0..{len(holders) - 1}"
                )
            mapping.append(holders[pick])
        return torch.tensor(mapping, dtype=torch.int64)  # [E]

    def describe(self) -> str:
        """One line per shard, e.g. ``shard 0: experts 0-2, 5 (4)``."""
        return "\n".join(f"shard {s}: experts {_ranges(ids)} ({len(ids)})" for s, ids in enumerate(self.shards))


@dataclass(frozen=True)
class LayeredPlacement:
    """One ``Placement`` per MoE layer, in model order (entry i is the i-th MoE layer, not decoder layer i).

    Every layer has the same shards and the same ``num_experts``. What a per-layer runtime needs: shard s loads
    ``experts_of(s)[i]`` for MoE layer i; the router splits layer i's rows by ``layers[i].holder_table()``.
    ``to_json()`` / ``from_json()`` give and read the ``placement`` field of ``moe-serve rebalance --json``:
    ``[[[expert ids on shard 0], ..., [ids on shard N-1]] for each layer]``.
    """

    layers: tuple[Placement, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise PlacementError("LayeredPlacement: needs at least one layer, got none")
        first = self.layers[0]
        for i, layer in enumerate(self.layers):
            if (layer.num_shards, layer.num_experts) != (first.num_shards, first.num_experts):
                raise PlacementError(
                    f"LayeredPlacement: layer {i} has {layer.num_shards} shards and {layer.num_experts} experts, "
                    f"layer 0 has {first.num_shards} and {first.num_experts}; every layer needs the same"
                )

    @classmethod
    def uniform(cls, placement: Placement, num_layers: int) -> "LayeredPlacement":
        """The same placement in every layer (what the runtime serves today)."""
        if num_layers < 1:
            raise PlacementError(f"LayeredPlacement.uniform: num_layers must be >= 1, got {num_layers}")
        return cls((placement,) * num_layers)

    @classmethod
    def from_json(cls, layers: object, num_experts: int) -> "LayeredPlacement":
        """Read ``[[[ids on shard 0], ...] for each layer]``; errors name the layer and shard at fault."""
        if not isinstance(layers, list) or not layers:
            raise PlacementError("placement: expected a non-empty list with one entry per MoE layer")
        out = []
        for i, shards in enumerate(layers):
            if not isinstance(shards, list) or not all(isinstance(ids, list) for ids in shards):
                raise PlacementError(f"placement: layer {i} must be a list of shards, each a list of expert ids")
            for s, ids in enumerate(shards):
                if not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
                    raise PlacementError(f"placement: layer {i}, shard {s}: expert ids must be integers, got {ids}")
            try:
                out.append(Placement.explicit(num_experts, shards))
            except PlacementError as e:
                raise PlacementError(f"placement: layer {i}: {e}") from None
        return cls(tuple(out))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_shards(self) -> int:
        return self.layers[0].num_shards

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    def experts_of(self, shard: int) -> tuple[tuple[int, ...], ...]:
        """The experts ``shard`` holds in each layer, [layers] sorted id tuples: what it must load."""
        return tuple(layer.experts_of(shard) for layer in self.layers)

    def to_json(self) -> list[list[list[int]]]:
        """``[[[ids on shard 0], ..., [ids on shard N-1]] for each layer]``, ids ascending."""
        return [[list(ids) for ids in layer.shards] for layer in self.layers]

    def describe(self) -> str:
        """Each layer's shards, indented under a ``layer i:`` line."""
        return "\n".join(
            f"layer {i}:\n" + "\n".join(f"  {line}" for line in layer.describe().splitlines())
            for i, layer in enumerate(self.layers)
        )


def build_placement(
    strategy: Strategy, num_experts: int, num_shards: int, explicit: list[list[int]] | None = None
) -> Placement:
    """The placement the app config asks for; ``explicit`` is given iff ``strategy == "explicit"``.

    ``build_placement("explicit", 4, 2, explicit=[[0, 1], [2, 3]])``
    """
    if (strategy == "explicit") != (explicit is not None):
        raise PlacementError(
            f"build_placement: 'explicit' shard lists are required with strategy 'explicit' and only then; "
            f"got strategy {strategy!r} with explicit={'given' if explicit is not None else 'None'}"
        )
    if strategy == "contiguous":
        return Placement.contiguous(num_experts, num_shards)
    if strategy == "round_robin":
        return Placement.round_robin(num_experts, num_shards)
    if strategy == "explicit":
        assert explicit is not None  # checked above; narrows the type
        if len(explicit) != num_shards:
            raise PlacementError(
                f"build_placement: explicit has {len(explicit)} shard lists, but num_shards={num_shards}"
            )
        _check_counts(num_experts, num_shards)
        return Placement.explicit(num_experts, explicit)
    raise PlacementError(
        f"build_placement: unknown strategy {strategy!r}; use 'contiguous', 'round_robin' or 'explicit'"
    )


def shard_weight_bytes(
    placement: Placement, num_moe_layers: int, hidden: int, moe_intermediate: int, bytes_per_param: int
) -> list[int]:
    """Bytes of routed-expert weights each shard holds, for capacity planning.

    An expert is three hidden x moe_intermediate matrices (gate, up, down) in every MoE layer; a
    replicated expert counts on every shard that holds it. Shared experts live on the router.
    """
    for name, value in [
        ("num_moe_layers", num_moe_layers),
        ("hidden", hidden),
        ("moe_intermediate", moe_intermediate),
        ("bytes_per_param", bytes_per_param),
    ]:
        if value < 1:
            raise PlacementError(f"shard_weight_bytes: {name} must be >= 1, got {value}")
    per_expert = num_moe_layers * 3 * hidden * moe_intermediate * bytes_per_param
    return [len(ids) * per_expert for ids in placement.shards]


def _check_counts(num_experts: int, num_shards: int) -> None:
    if not 1 <= num_shards <= num_experts:
        raise PlacementError(
            f"Placement: num_shards={num_shards} must be in 1..num_experts={num_experts} (a shard needs an expert)"
        )


def _ranges(ids: Sequence[int]) -> str:
    """Sorted ids as runs: (0, 1, 2, 5, 7, 8) -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for e in ids:
        if runs and e == runs[-1][1] + 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
