"""Expert placement at DeepSeek-V3 scale: balancedness of contiguous placement and of the planner on Zipf loads.

    python -m benchmarks.placement [--layers 58] [--tokens 65536] [--seed 0] [--out benchmarks/results]

Loads: 256 routed experts, 58 MoE layers, 8 experts per token, `tokens` tokens a layer. The expert of rank r
gets its expected share of the 8 * tokens rows, 8 * tokens * r^-s / sum_k k^-s (Zipf with exponent s),
rounded to whole rows; every layer shuffles which expert has which rank (seeded). Expected loads, not sampled
tokens: the contiguous figures this gives (0.48 and 0.17 at s = 1.0 on 8 and 32 shards) are the reference's
(0.47 and 0.17), while sampling 8 distinct experts per token flattens the top (0.59 and 0.26).

Balancedness = mean shard load / max shard load, per layer, averaged over layers. Columns:
- contiguous: Placement.contiguous (the redundant slots unused); replicated rows need no split.
- planner: router.planner.plan, rows of replicated experts split by load (router.balance.split_rows, what
  dispatch does); "even": the planner optimising for, and measured with, an even split (w_e / n_e a copy,
  what DeepSeek's EPLB assumes).
- hier.: the planner's hierarchical mode with DeepSeek-V3's 8 expert groups kept whole on nodes of 8 shards
  (as EPLB's hierarchical policy does); only where 8 groups divide among the nodes (8 and 32 shards).
  "node cap": mean node load / max node load once whole groups are on nodes (best pairing), the most any
  split within nodes can reach.
- bound: mean / max(mean, max_e w_e / n_e) with the copies n_e that minimise that max (copy_counts): no
  placement of E + R copies does better, whatever the split (slot counts ignored, so loose at 2 slots a shard).
- EPLB (ref.): the issue's figures, computed with DeepSeek's open EPLB (rebalance_experts, even split) on such
  loads. They match its hierarchical policy (the "hier. even" column reproduces them); its global policy would
  be the "even" column.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from benchmarks.report import machine_meta, write_report
from router.placement import LayeredPlacement, Placement
from router.planner import balancedness, copy_counts, load_rows, plan

EXPERTS, TOP_K, GROUPS, SHARDS_PER_NODE = 256, 8, 8, 8
EXPONENTS, SHARD_COUNTS, REDUNDANT = (0.6, 1.0, 1.4), (8, 32, 144), (0, 16, 32)
EPLB_REFERENCE = {(1.0, 32, 32): 0.71, (1.0, 8, 0): 0.68, (0.6, 32, 32): 0.93}  # (s, shards, redundant) -> EPLB
CONTIGUOUS_REFERENCE = {(1.0, 32, 32): 0.17, (1.0, 8, 0): 0.47}


def zipf_load(s: float, layers: int, tokens: int, seed: int = 0) -> Tensor:
    """[layers, EXPERTS] expected rows of Zipf(s) routing, expert ranks shuffled per layer (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    share = torch.arange(1, EXPERTS + 1, dtype=torch.float64) ** -s  # [E] by rank
    rows = (share / share.sum() * tokens * TOP_K).round().long()  # [E]
    return torch.stack([rows[torch.randperm(EXPERTS, generator=gen)] for _ in range(layers)])  # [L, E]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def bound(load: Tensor, num_shards: int, redundant: int) -> float:
    out = []
    for w in load_rows(load):
        copies = copy_counts(w, num_shards, redundant)
        average = sum(w) / num_shards
        out.append(average / max(average, max(x / n for x, n in zip(w, copies, strict=True))))
    return mean(out)


def node_cap(load: Tensor, nodes: int) -> float:
    """Mean / max node load with GROUPS groups of consecutive experts packed whole, GROUPS / nodes a node, by
    the planner's rule (heaviest group onto the lightest node with room)."""
    out, size = [], EXPERTS // GROUPS
    for w in load_rows(load):
        node_load, count = [0] * nodes, [0] * nodes
        for g in sorted((sum(w[i * size : (i + 1) * size]) for i in range(GROUPS)), reverse=True):
            n = min((n for n in range(nodes) if count[n] < GROUPS // nodes), key=lambda n: (node_load[n], n))
            node_load[n] += g
            count[n] += 1
        out.append(sum(node_load) / nodes / max(node_load))
    return mean(out)


def cell(load: Tensor, s: float, num_shards: int, redundant: int) -> dict:
    layers = load.shape[0]
    contiguous = LayeredPlacement.uniform(Placement.contiguous(EXPERTS, num_shards), layers)
    row = dict(s=s, shards=num_shards, redundant=redundant)
    row["contiguous"] = mean(balancedness(load, contiguous))
    row["planner"] = mean(balancedness(load, plan(load, num_shards, redundant)))
    row["even"] = mean(balancedness(load, plan(load, num_shards, redundant, split="even"), split="even"))
    nodes = num_shards // SHARDS_PER_NODE
    if GROUPS % nodes == 0 and redundant % nodes == 0:
        hier = dict(num_groups=GROUPS, num_nodes=nodes)
        row["hier"] = mean(balancedness(load, plan(load, num_shards, redundant, **hier)))
        row["hier_even"] = mean(balancedness(load, plan(load, num_shards, redundant, split="even", **hier), "even"))
        row["node_cap"] = node_cap(load, nodes)
    row["bound"] = bound(load, num_shards, redundant)
    row["eplb_reference"] = EPLB_REFERENCE.get((s, num_shards, redundant))
    row["contiguous_reference"] = CONTIGUOUS_REFERENCE.get((s, num_shards, redundant))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=58, help="MoE layers (default: 58, DeepSeek-V3's)")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens a layer (default: 65536)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-layer expert orders (default: 0)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for placement.json")
    args = parser.parse_args()
    start, rows = time.monotonic(), []
    for s in EXPONENTS:
        load = zipf_load(s, args.layers, args.tokens, args.seed)
        for num_shards in SHARD_COUNTS:
            for redundant in REDUNDANT:
                rows.append(cell(load, s, num_shards, redundant))
                print(f"s={s} shards={num_shards} redundant={redundant}: {rows[-1]['planner']:.3f}", flush=True)
    for row in rows:  # table cells: 3 decimals, "-" where a column does not apply
        for key, value in row.items():
            if key not in ("s", "shards", "redundant"):
                row[key] = "-" if value is None else round(value, 3)
        row.setdefault("hier", "-")
        row.setdefault("hier_even", "-")
        row.setdefault("node_cap", "-")
    meta = machine_meta(experts=EXPERTS, top_k=TOP_K, layers=args.layers, tokens=args.tokens, seed=args.seed,
                        seconds=round(time.monotonic() - start, 1))  # fmt: skip
    columns = {
        "s": "s", "shards": "shards", "redundant": "redundant", "contiguous": "contiguous",
        "planner (split by load)": "planner", "planner (even split)": "even", "hier. (by load)": "hier",
        "hier. (even)": "hier_even", "node cap": "node_cap", "bound": "bound", "EPLB (ref.)": "eplb_reference",
    }  # fmt: skip
    write_report(args.out, "placement", meta, rows, columns)


if __name__ == "__main__":
    main()
