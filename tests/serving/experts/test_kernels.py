"""Choosing the expert kernel (serving/experts/kernels.py): `engine_config.expert_kernel` is validated,
`auto` resolves to loop without vLLM and to vllm with it (for a dtype, device and shape it supports),
`vllm` where it cannot run says why, and a process's experts are built for the kernel chosen."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from pydantic import ValidationError

from deployments.config import AppConfig
from serving.engine_client import EngineConfig
from serving.errors import ConfigError
from serving.experts import kernels
from serving.experts.kernels import kernel_of, load_kernel, resolve_kernel
from serving.experts.loading import load_experts
from serving.experts.local import StackedExperts
from serving.model.checkpoint import Checkpoint
from serving.model.config import ModelConfig

CPU = torch.device("cpu")


@pytest.fixture
def without_vllm(monkeypatch):
    """vLLM not installed, as importlib sees it (what a shard's image without vLLM looks like)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


@pytest.fixture
def with_vllm(monkeypatch):
    """vLLM installed, as importlib sees it (nothing is imported by resolving)."""
    real = importlib.util.find_spec
    found = real("json")  # any spec: resolve_kernel only asks whether there is one
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: found if name == "vllm" else real(name, *a))


def test_expert_kernel_is_validated_and_an_unknown_value_names_the_field():
    assert EngineConfig().expert_kernel == "loop"  # today's path stays the default
    assert EngineConfig(expert_kernel="auto").expert_kernel == "auto"
    with pytest.raises(ValidationError, match=r"expert_kernel\n.*'auto', 'loop' or 'vllm'"):
        EngineConfig(expert_kernel="fast")
    with pytest.raises(ValidationError, match=r"engine_config\.expert_kernel"):
        AppConfig.model_validate({"model": "x", "engine_config": {"expert_kernel": "triton"}})
    with pytest.raises(ConfigError, match="expert_kernel='fast': expected one of auto, loop, vllm"):
        resolve_kernel("fast", torch.float32, CPU, 128)


def test_auto_is_loop_without_vllm_and_vllm_cannot_be_forced(without_vllm):
    assert resolve_kernel("auto", torch.bfloat16, CPU, 2048) == "loop"
    assert resolve_kernel("loop", torch.bfloat16, CPU, 2048) == "loop"
    with pytest.raises(ConfigError, match="expert_kernel: vllm: vLLM is not installed; install it with"):
        resolve_kernel("vllm", torch.bfloat16, CPU, 2048)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_auto_is_vllm_where_installed_for_every_dtype_the_op_takes(with_vllm, dtype):
    assert resolve_kernel("auto", dtype, CPU, 2048) == "vllm"
    assert resolve_kernel("vllm", dtype, CPU, 2048) == "vllm"
    assert resolve_kernel("loop", dtype, CPU, 2048) == "loop"


def test_auto_is_loop_where_the_op_cannot_run_and_vllm_says_why(with_vllm):
    assert resolve_kernel("auto", torch.float64, CPU, 2048) == "loop"  # a dtype the op does not take
    assert resolve_kernel("auto", torch.bfloat16, CPU, 100) == "loop"  # hidden not a multiple of 32
    assert resolve_kernel("auto", torch.bfloat16, torch.device("meta"), 2048) == "loop"
    with pytest.raises(ConfigError, match="needs a hidden size divisible by 32, got 100"):
        resolve_kernel("vllm", torch.bfloat16, CPU, 100)
    with pytest.raises(ConfigError, match="takes .*, not torch.float64"):
        resolve_kernel("vllm", torch.float64, CPU, 2048)


def test_an_installed_vllm_whose_op_does_not_load_falls_back_under_auto_only(with_vllm, monkeypatch, caplog):
    def broken(device, dtype):
        raise AttributeError("'_OpNamespace' '_C' object has no attribute 'cpu_fused_moe'")

    monkeypatch.setattr(kernels, "load_op", broken)
    assert load_kernel("auto", torch.float32, CPU, 128) == "loop"
    assert "using loop" in caplog.text
    with pytest.raises(ConfigError, match="vLLM's fused MoE op does not load here"):
        load_kernel("vllm", torch.float32, CPU, 128)


def test_load_experts_builds_the_resolved_kernel(demo_dir, without_vllm):
    cfg = ModelConfig.from_pretrained(demo_dir)
    layers = load_experts(Checkpoint(demo_dir), cfg, [1, 4, 6], torch.float32, kernel="auto")
    assert set(layers) == set(cfg.moe_layer_ids) and kernel_of(layers) == "loop"
    assert all(isinstance(layer, StackedExperts) for layer in layers.values())


def test_one_process_runs_one_kernel():
    experts = StackedExperts(torch.zeros(1, 2, 4), torch.zeros(1, 4, 1), [0])
    assert kernel_of({}) == "loop" and kernel_of({0: experts}) == "loop"

    class Other:
        kernel = "vllm"

    with pytest.raises(ValueError, match=r"one expert kernel, got \['loop', 'vllm'\]"):
        kernel_of({0: experts, 1: Other()})
