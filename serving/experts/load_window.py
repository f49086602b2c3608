"""Expert load over a sliding window: a ring of BUCKETS time buckets of [L, E] token rows.

The engine adds the rows it drains from the RoutingCounter once per step (already on the host, so this
costs no device sync), and any thread may read the window's sum (`snapshot`), e.g. a replica answering
GET /v1/admin/expert-load while the engine thread steps; a lock keeps the two apart.

    >>> window = ExpertLoadWindow(layer_ids=(0, 1), num_experts=8, window_s=60.0)
    >>> window.add([0, 1], rows)                  # rows [2, 8] int64: this step's rows per expert
    >>> window.snapshot().load                    # ((...8 ints), (...8 ints)): the last 60 s

Memory is fixed: BUCKETS x L x E int64, whatever the window and the traffic (DeepSeek-V3, 58 MoE layers of
256 experts: 7 MiB). The window moves in steps of one bucket (window_s / BUCKETS): a row counts until its
bucket is more than window_s old, so a snapshot covers between window_s - window_s/BUCKETS and window_s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from serving.expert_load import ExpertLoad

# B = buckets, L = MoE layers, E = routed experts
BUCKETS = 60  # a 60 s window moves by the second


class ExpertLoadWindow:
    """Token rows per (MoE layer, expert) of the last `window_s` seconds (see the module docstring)."""

    def __init__(
        self,
        layer_ids: Sequence[int],
        num_experts: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if window_s <= 0:
            raise ValueError(f"ExpertLoadWindow: window_s={window_s} must be > 0")
        self.layer_ids, self.num_experts, self.window_s = tuple(layer_ids), num_experts, window_s
        self._row_of = {layer: i for i, layer in enumerate(self.layer_ids)}  # model layer -> row of `load`
        self._width, self._clock = window_s / BUCKETS, clock
        self._counts = torch.zeros(BUCKETS, len(self.layer_ids), num_experts, dtype=torch.int64)  # [B, L, E]
        self._bucket_of_slot: list[int | None] = [None] * BUCKETS  # the bucket number each slot holds
        self._lock = threading.Lock()

    def add(self, layers: Sequence[int], rows: Tensor) -> None:
        """Count this step's rows [len(layers), E] (host int64) for the model layers `layers`, now."""
        if not layers:
            return
        index = torch.tensor([self._row_of[layer] for layer in layers])  # [n] rows of `load` these layers are
        with self._lock:
            slot = self._slot(self._bucket(self._clock()))
            self._counts[slot].index_add_(0, index, rows.to(torch.int64))  # [L, E]

    def snapshot(self) -> ExpertLoad:
        """The rows of the window as it stands now, summed over its buckets."""
        now = self._bucket(self._clock())
        with self._lock:
            live = [s for s, b in enumerate(self._bucket_of_slot) if b is not None and now - BUCKETS < b <= now]
            load = self._counts[live].sum(dim=0).tolist()  # [L, E]
        return ExpertLoad(self.layer_ids, self.num_experts, self.window_s, tuple(map(tuple, load)))

    def _bucket(self, t: float) -> int:
        return int(t // self._width)

    def _slot(self, bucket: int) -> int:
        """The ring slot of `bucket`, emptied first if it still holds an older bucket (caller holds the lock)."""
        slot = bucket % BUCKETS
        if self._bucket_of_slot[slot] != bucket:
            self._counts[slot].zero_()
            self._bucket_of_slot[slot] = bucket
        return slot
