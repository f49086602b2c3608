"""benchmarks/step_profile.py on the demo: a step's time is split into routed experts and the rest, and the
parts add up."""

from __future__ import annotations

import pytest
import torch

from benchmarks.step_profile import profile


def test_a_decode_step_is_split_into_experts_and_the_rest(demo_dir):
    row = profile(demo_dir, "demo", "loop", batch=3, steps=3, dtype=torch.float32)
    assert row["model"] == "demo" and row["batch"] == 3
    assert 0 < row["experts_ms"] <= row["step_ms"]
    assert row["experts_ms"] + row["rest_ms"] == pytest.approx(row["step_ms"], abs=0.11)  # each rounded to 0.1 ms
    assert row["per_layer_ms"] * 2 == pytest.approx(row["experts_ms"], abs=0.11)  # the demo has 2 MoE layers
