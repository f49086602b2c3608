"""The sliding window of expert load: buckets on a fake clock, rows leave when their bucket is a window old."""

from __future__ import annotations

import pytest
import torch

from serving.experts.load_window import BUCKETS, ExpertLoadWindow


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rows(*per_layer: list[int]) -> torch.Tensor:
    return torch.tensor(per_layer, dtype=torch.int64)


def test_rows_add_up_per_model_layer_and_expert():
    clock = Clock()
    window = ExpertLoadWindow((1, 2), num_experts=3, window_s=60.0, clock=clock)  # DeepSeek-like: layer 0 is dense
    window.add([1, 2], rows([1, 0, 2], [0, 3, 0]))
    clock.t += 0.5
    window.add([2], rows([4, 0, 1]))  # a step may run only some layers
    window.add([], torch.zeros(0, 3, dtype=torch.int64))  # a step with no MoE rows
    load = window.snapshot()
    assert load.layers == (1, 2) and load.num_experts == 3 and load.window_s == 60.0 and load.routers == 1
    assert load.load == ((1, 0, 2), (4, 3, 1))


def test_rows_leave_once_their_bucket_is_a_window_old():
    clock = Clock(0.0)
    window = ExpertLoadWindow((0,), num_experts=2, window_s=60.0, clock=clock)  # buckets of 1 s
    window.add([0], rows([1, 0]))  # bucket 0
    clock.t = 30.2
    window.add([0], rows([0, 5]))  # bucket 30
    clock.t = 59.9
    assert window.snapshot().load == ((1, 5),)
    clock.t = 60.0  # bucket 0 is now 60 buckets old: out
    assert window.snapshot().load == ((0, 5),)
    clock.t = 89.99
    assert window.snapshot().load == ((0, 5),)
    clock.t = 90.0  # the window covers between 59 and 60 s: bucket 30 began 60 s ago
    assert window.snapshot().load == ((0, 0),)


def test_a_reused_slot_forgets_what_it_held_and_memory_stays_fixed():
    clock = Clock(0.0)
    window = ExpertLoadWindow((0, 1), num_experts=4, window_s=6.0, clock=clock)  # buckets of 0.1 s
    for step in range(10 * BUCKETS):  # ten windows of traffic, one row per step
        clock.t = step * 0.1 + 0.05  # mid-bucket: no float edge
        window.add([0, 1], rows([1, 0, 0, 0], [0, 0, 0, 2]))
    assert window._counts.shape == (BUCKETS, 2, 4)  # noqa: SLF001 (the bound is the point)
    assert window.snapshot().load == ((BUCKETS, 0, 0, 0), (0, 0, 0, 2 * BUCKETS))


def test_a_window_must_be_positive():
    with pytest.raises(ValueError, match="window_s=0"):
        ExpertLoadWindow((0,), 8, window_s=0)
