"""Rows sent to each shard per MoE layer over a sliding window, and the balancedness they give.

The sharded expert backend (serving/experts/sharded.py) adds each layer call's (token, expert) rows per shard
as the shards return results, and reports `balancedness()` as moe_expert_balancedness_ratio every few seconds.
These are the rows dispatch actually sent: replicated experts' rows as split_rows split them step by step, and
rows kept off a failed shard where they went instead. So the figure is what the shards saw, which the expert
window plus the placement (router/planner.py balancedness) only approximates.

    >>> window = ShardRowsWindow(num_shards=2, window_s=60.0)
    >>> window.add(3, {0: 6, 1: 2})      # layer 3's call: shard 0 computed 6 rows, shard 1 two
    >>> window.balancedness()            # {3: 0.666...}: mean 4 / max 6

The hot path (`add`) is a clock read and a few integer adds per call: no tensor, no lock. It is not thread
safe; the engine thread, which runs every layer, is its only user. Buckets as in the expert window
(serving/experts/load_window.py): a row counts until its bucket is more than window_s old. Memory: at most
BUCKETS x layers x shards integers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from serving.experts.load_window import BUCKETS

# S = shards


class ShardRowsWindow:
    """(token, expert) rows per (MoE layer, shard) of the last `window_s` seconds."""

    def __init__(self, num_shards: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        if num_shards < 1 or window_s <= 0:
            raise ValueError(f"ShardRowsWindow: need num_shards >= 1 and window_s > 0, got {num_shards}, {window_s}")
        self.num_shards, self.window_s, self.clock = num_shards, window_s, clock
        self._width = window_s / BUCKETS
        self._buckets: deque[tuple[int, dict[int, list[int]]]] = deque()  # (bucket, layer -> [S] rows), oldest first
        self._total: dict[int, list[int]] = {}  # layer -> [S] rows of every bucket in `_buckets`

    def add(self, layer: int, rows: Mapping[int, int]) -> None:
        """Count `rows[shard]` rows sent to each shard for `layer`, now."""
        bucket = int(self.clock() // self._width)
        if not self._buckets or self._buckets[-1][0] != bucket:
            self._expire(bucket)
            self._buckets.append((bucket, {}))
        counts = self._buckets[-1][1].setdefault(layer, [0] * self.num_shards)
        total = self._total.setdefault(layer, [0] * self.num_shards)
        for shard, n in rows.items():
            counts[shard] += n
            total[shard] += n

    def loads(self) -> dict[int, list[int]]:
        """Rows per shard [S] of every layer that ran since the start, over the window as it stands now."""
        self._expire(int(self.clock() // self._width))
        return {layer: list(total) for layer, total in self._total.items()}

    def balancedness(self) -> dict[int, float]:
        """Mean shard rows / max shard rows of each layer over the window (1.0 for a layer with none)."""
        return {layer: balance(load) for layer, load in self.loads().items()}

    def _expire(self, now: int) -> None:
        """Drop buckets more than a window older than bucket `now`, taking their rows off the totals."""
        while self._buckets and self._buckets[0][0] <= now - BUCKETS:
            _, old = self._buckets.popleft()
            for layer, counts in old.items():
                total = self._total[layer]
                for shard, n in enumerate(counts):
                    total[shard] -= n


def balance(load: Sequence[int]) -> float:
    """Mean / max of one layer's shard loads [S]; 1.0 with no load (router/planner.py's balancedness)."""
    peak = max(load)
    return sum(load) / len(load) / peak if peak > 0 else 1.0
