"""``moe-serve rebalance``: a placement planned from measured expert load, beside the contiguous one.

The load file is JSON ``{"load": [[rows of expert 0, ..., expert E-1] for each MoE layer]}`` (integers, or
non-negative numbers such as averages). The report's JSON (``--json``) is::

    {"balancedness": mean over layers, "contiguous_balancedness": the same for the contiguous placement,
     "balancedness_per_layer": [...], "contiguous_balancedness_per_layer": [...],
     "placement": [[[expert ids on shard 0], ..., [ids on shard N-1]] for each layer]}

``contiguous_*`` are null when there are more shards than experts (no contiguous placement exists). Planned for a
running server (POST /v1/admin/rebalance), it adds ``current_balancedness`` and ``current_balancedness_per_layer``:
the placement the server runs now, under the same load. docs/placement.md describes both formats. Pure logic: the
CLI reads the file and prints.

Usage::

    load = read_load(Path("load.json").read_text(), source="load.json")   # [L, E] tensor
    report = rebalance(load, num_shards=32, redundant=32)
    print(report.describe())                # or json.dumps(report.to_json())
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from router.placement import LayeredPlacement, Placement, PlacementError
from router.planner import balancedness, plan, slot_counts

# L = MoE layers, E = experts


# What GET /v1/admin/expert-load adds beside `load` (moe-serve rebalance --url --save keeps it): read, not used.
SERVER_LOAD_FIELDS = ("layers", "num_experts", "window_s", "routers")


class LoadFileError(ValueError):
    """A load file that cannot be used: the message names the file, and the layer or expert at fault."""


def read_load(text: str, source: str) -> Tensor:
    """The [L, E] load in a load file's text; ``source`` (its path or URL) names it in errors."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadFileError(f"{source}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return parse_load(obj, source)


def parse_load(obj: object, source: str) -> Tensor:
    """``{"load": [[rows per expert] per MoE layer]}`` (parsed JSON) as an [L, E] tensor: int64 when every count
    is an integer, float64 otherwise. Every problem is a LoadFileError naming ``source`` and where."""
    if not isinstance(obj, dict) or "load" not in obj:
        raise LoadFileError(f'{source}: expected an object {{"load": [[rows per expert] for each MoE layer]}}')
    unknown = sorted(set(obj) - {"load", *SERVER_LOAD_FIELDS})
    if unknown:
        raise LoadFileError(
            f"{source}: unknown field(s) {unknown}; a load file has 'load' (and what a server's load carries: "
            f"{', '.join(SERVER_LOAD_FIELDS)})"
        )
    layers = obj["load"]
    if not isinstance(layers, list) or not layers:
        raise LoadFileError(f"{source}: 'load' must be a non-empty list, one list of expert counts per MoE layer")
    width = None
    for i, counts in enumerate(layers):
        if not isinstance(counts, list) or not counts:
            raise LoadFileError(f"{source}: load[{i}] must be a non-empty list of counts, one per expert")
        if width is None:
            width = len(counts)
        elif len(counts) != width:
            raise LoadFileError(
                f"{source}: load[{i}] has {len(counts)} experts, load[0] has {width}; every layer needs one count "
                "per expert"
            )
        for e, n in enumerate(counts):
            if isinstance(n, bool) or not isinstance(n, int | float) or not math.isfinite(n) or n < 0:
                raise LoadFileError(f"{source}: load[{i}][{e}] = {n!r}; counts must be finite numbers >= 0")
    integral = all(isinstance(n, int) for counts in layers for n in counts)
    return torch.tensor(layers, dtype=torch.int64 if integral else torch.float64)  # [L, E]


def read_placement(path: str, num_experts: int) -> LayeredPlacement:
    """The per-layer placement in the JSON file at `path`: its ``placement`` field, as ``--json`` writes it
    (the report's other fields are ignored), so a plan can be served as it is (``placement: file``).
    Every problem is a PlacementError naming the file and, for a bad layout, the layer and shard."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as e:
        raise PlacementError(f"placement_file {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise PlacementError(f"placement_file {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict) or "placement" not in obj:
        raise PlacementError(f"placement_file {path}: expected an object with a 'placement' field (rebalance --json)")
    try:
        return LayeredPlacement.from_json(obj["placement"], num_experts)
    except PlacementError as e:
        raise PlacementError(f"placement_file {path}: {e}") from None


@dataclass(frozen=True)
class RebalanceReport:
    """A planned placement and its balancedness per layer, beside the contiguous placement's."""

    placement: LayeredPlacement
    balancedness: tuple[float, ...]  # [L] planned
    contiguous: tuple[float, ...] | None  # [L] contiguous; None when num_shards > num_experts
    redundant: int
    current: tuple[float, ...] | None = None  # [L] the placement a server runs now, when planned for one

    @property
    def mean(self) -> float:
        return sum(self.balancedness) / len(self.balancedness)

    @property
    def contiguous_mean(self) -> float | None:
        return None if self.contiguous is None else sum(self.contiguous) / len(self.contiguous)

    @property
    def current_mean(self) -> float | None:
        return None if self.current is None else sum(self.current) / len(self.current)

    def to_json(self) -> dict:
        """The ``--json`` output (module docstring)."""
        return {
            "balancedness": self.mean,
            "contiguous_balancedness": self.contiguous_mean,
            "balancedness_per_layer": list(self.balancedness),
            "contiguous_balancedness_per_layer": None if self.contiguous is None else list(self.contiguous),
            "placement": self.placement.to_json(),
            **(
                {}
                if self.current is None
                else {"current_balancedness": self.current_mean, "current_balancedness_per_layer": list(self.current)}
            ),
        }

    def describe(self) -> str:
        """A summary, one line per layer (balancedness both ways, replicated experts), then every layer's shards."""
        p = self.placement
        slots = sorted(set(slot_counts(p.num_experts, p.num_shards, self.redundant)), reverse=True)
        contiguous = "n/a (more shards than experts)" if self.contiguous_mean is None else f"{self.contiguous_mean:.3f}"
        lines = [
            f"{p.num_layers} MoE layers, {p.num_experts} experts, {p.num_shards} shards, {self.redundant} redundant "
            f"slots a layer ({' or '.join(map(str, slots))} slots a shard)",
            "balancedness (mean shard load / max shard load, replicated experts' rows split by load), "
            f"mean over layers: planned {self.mean:.3f}, contiguous {contiguous}",
            "",
            "layer  planned  contiguous  replicated experts (copies)",
        ]
        for i, layer in enumerate(p.layers):
            before = "-" if self.contiguous is None else f"{self.contiguous[i]:.3f}"
            copies = sorted((-len(hs), e) for e, hs in enumerate(layer.holder_table()) if len(hs) > 1)  # most first
            replicated = ", ".join(f"{e} x{-n}" for n, e in copies) or "none"
            lines.append(f"{i:<5}  {self.balancedness[i]:<7.3f}  {before:<10}  {replicated}")
        return "\n".join([*lines, "", p.describe()])


def rebalance(
    load: Tensor,
    num_shards: int,
    redundant: int,
    num_groups: int | None = None,
    num_nodes: int = 1,
    current: LayeredPlacement | None = None,
) -> RebalanceReport:
    """Plan a placement for ``load`` [L, E] (router.planner.plan) and measure it against contiguous and, given
    the placement a server runs now (``current``), against that one."""
    placement = plan(load, num_shards, redundant, num_groups=num_groups, num_nodes=num_nodes)
    layers, experts = load.shape
    contiguous = None
    if num_shards <= experts:
        before = LayeredPlacement.uniform(Placement.contiguous(experts, num_shards), layers)
        contiguous = tuple(balancedness(load, before))
    now = None if current is None else tuple(balancedness(load, current))
    return RebalanceReport(placement, tuple(balancedness(load, placement)), contiguous, redundant, now)
