"""Per-shard autoscaling: each ExpertShard-<i> scales on the expert rows it computes (`shard_autoscaling`).

Each replica counts the expert rows it computes (one token row through one expert: what a shard's compute
grows with) and reports their rate to Serve as a custom autoscaling metric (`ExpertShard.
record_autoscaling_stats`). Serve averages each replica's reports over `look_back_period_s`; the policy
here adds the replicas' rates up (the shard's demand) and asks for ceil(demand / target) replicas. Serve's
own wrapper applies min/max_replicas and the up/downscale delays. Replicas of a shard are interchangeable
(shards hold no per-request state), and every router reaches them through a DeploymentHandle, whose
router spreads calls over a deployment's live replicas, so a replica added takes a share of the calls.

Why not Serve's default, target_ongoing_requests: a Router makes at most one call per shard per MoE
layer and waits for all of them, so a shard has at most one call in flight per router, hot or cold, and
the time a call is in flight is mostly the hop (~6-8 ms on the CI machine) that every shard pays alike.
Measured on the skewed demo (make_demo router_skew zipf:1.43; in each MoE layer the six hottest experts on
shard 0, the two coldest on shard 1; 1 router, 4 closed-loop streams of 16 tokens, look-back 2 s, the
controller's view sampled each second for 25 s): Serve's ongoing requests were 0.27-1.0 (mean 0.76) on the
hot shard and 0.0-1.0 (mean 0.73) on the cold one, no target can tell them apart; expert rows per second
were 270-545 (mean 420) on the hot shard and 15-119 (mean 56) on the cold one, ~7x apart and apart in
every sample. (With four experts on each shard: ongoing 0.77 and 0.74, rows 215-440 and 65-260.) Rows
per second is also what a replica's capacity is measured in: it computes rows, whatever the batch holds.

What a replica added buys: one router's calls to a shard never overlap (one per layer, awaited), so the
second replica of a shard serves calls in parallel only where several routers (`routers`) share it; with
one router it halves each replica's load, not the step's latency.

This module is cloudpickled by value into Serve's controller (AutoscalingPolicy.serialize_policy), so
it imports nothing of this project at module level.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

EXPERT_ROWS_PER_S = "moe_expert_rows_per_s"  # the custom metric's name, as replicas report it
POLICY = "deployments.autoscaling:ExpertRowsPolicy"


class ExpertRowsPolicy:
    """Serve autoscaling policy (a class: Serve builds it once per deployment with `policy_kwargs`):
    ceil(sum of the replicas' expert rows per second / target_expert_rows_per_s) replicas.

        autoscaling_config={"policy": {"policy_function": POLICY,
                                       "policy_kwargs": {"target_expert_rows_per_s": 2000}}, ...}
    """

    def __init__(self, target_expert_rows_per_s: float):
        self.target = target_expert_rows_per_s

    def __call__(self, ctx: Any) -> tuple[float, dict]:
        """ctx: Serve's AutoscalingContext. Until some replica has reported, keep the current target."""
        rates = (ctx.aggregated_metrics or {}).get(EXPERT_ROWS_PER_S) or {}
        if not rates:
            return ctx.target_num_replicas, {}
        demand = sum(rates.values())  # rows/s of the whole shard
        return max(1, math.ceil(demand / self.target)), {}


class RowRate:
    """Expert rows counted as they are computed; `rate()` is rows per second since the last `rate()`.
    Thread-safe: Serve may run a sync `run` in another thread than the one that asks for the rate."""

    def __init__(self, clock=time.monotonic):
        self._clock, self._lock = clock, threading.Lock()
        self._rows, self.total = 0, 0
        self._since = clock()

    def add(self, rows: int) -> None:
        with self._lock:
            self._rows += rows
            self.total += rows

    def rate(self) -> float:
        with self._lock:
            now = self._clock()
            rows, elapsed = self._rows, now - self._since
            self._rows, self._since = 0, now
        return rows / elapsed if elapsed > 0 else 0.0
