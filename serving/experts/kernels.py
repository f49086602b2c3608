"""Choosing the expert kernel, in one place: `engine_config.expert_kernel` (auto | loop | vllm) -> loop | vllm.

    kernel = resolve_kernel("auto", torch.bfloat16, torch.device("cpu"), hidden_size=2048)  # "vllm" if installed
    layer = build_layer_experts(kernel, gate_up, down, expert_ids)                          # a LayerExperts

- loop: StackedExperts (serving/experts/local.py), one matmul pair per expert in torch (on CPU in bfloat16
  on weights packed for oneDNN); always available.
- vllm: VLLMFusedExperts (serving/experts/fused.py), vLLM's fused MoE op; needs vLLM installed.
- auto: vllm where vLLM is installed and its op takes the dtype, device and hidden size, else loop.

`resolve_kernel` is cheap and imports no vLLM (whether it is installed is importlib's find_spec), so the
startup banner can call it; `load_kernel` is what a process that holds experts calls: it also loads the op.
The resolved name, never "auto", is what the metrics (moe_expert_kernel_info) and the banner show.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from serving.engine_client import EXPERT_KERNELS
from serving.errors import ConfigError
from serving.experts.backend import LayerExperts
from serving.experts.fused import VLLMFusedExperts, load_op, unsupported
from serving.experts.local import StackedExperts
from serving.model.prepack import can_prepack
from serving.vllm_engine import INSTALL_HINT

log = logging.getLogger(__name__)

KernelName = Literal["loop", "vllm"]


def vllm_problem(dtype: torch.dtype, device: torch.device, hidden_size: int) -> str | None:
    """Why the vllm kernel cannot run here (not installed, or dtype, device or shape unsupported), or None."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed; {INSTALL_HINT}"
    return unsupported(dtype, device, hidden_size)


def resolve_kernel(name: str, dtype: torch.dtype, device: torch.device, hidden_size: int) -> KernelName:
    """The kernel `name` (auto, loop or vllm) means for experts of this dtype, device and hidden size.

    auto -> vllm when `vllm_problem` finds none, else loop. vllm where it cannot run is a ConfigError
    saying why; an unknown name is a ConfigError naming the field.
    """
    if name not in EXPERT_KERNELS:
        raise ConfigError(f"expert_kernel={name!r}: expected one of {', '.join(EXPERT_KERNELS)}")
    if name == "loop":
        return "loop"
    problem = vllm_problem(dtype, device, hidden_size)
    if name == "vllm" and problem:
        raise ConfigError(f"expert_kernel: vllm: {problem}; use expert_kernel: loop (or auto)")
    return "loop" if problem else "vllm"


def load_kernel(name: str, dtype: torch.dtype, device: torch.device, hidden_size: int) -> KernelName:
    """`resolve_kernel`, then load vLLM's op if it chose vllm (seconds: vLLM's import), once per process.

    An installed vLLM whose op does not load (a vLLM built for CUDA on a CPU host) is a ConfigError with
    `vllm`; with `auto` the experts run on loop instead, with a warning, so a shard still serves.
    """
    kernel = resolve_kernel(name, dtype, device, hidden_size)
    if kernel == "loop":
        return kernel
    try:
        load_op(device, dtype)
    except (ImportError, AttributeError, RuntimeError) as e:
        if name == "vllm":
            raise ConfigError(f"expert_kernel: vllm: vLLM's fused MoE op does not load here: {e!r}") from e
        log.warning("expert_kernel auto: vLLM is installed but its fused MoE op does not load (%r); using loop", e)
        return "loop"
    return kernel


def build_layer_experts(kernel: KernelName, gate_up: Tensor, down: Tensor, expert_ids: list[int]) -> LayerExperts:
    """One layer's experts for a resolved kernel: vLLM's op over the stack (vllm), or the stack itself
    (loop), its weights packed for oneDNN where that applies (CPU, bfloat16: StackedExperts' `prepack`)."""
    if kernel == "vllm":
        return VLLMFusedExperts(StackedExperts(gate_up, down, expert_ids))
    return StackedExperts(gate_up, down, expert_ids, prepack=can_prepack(gate_up.dtype, gate_up.device))


def kernel_of(layers: Mapping[int, LayerExperts]) -> str:
    """The kernel a process's experts run ("loop" for a model without MoE layers)."""
    kernels = {experts.kernel for experts in layers.values()}
    if len(kernels) > 1:
        raise ValueError(f"one process runs one expert kernel, got {sorted(kernels)}")
    return kernels.pop() if kernels else "loop"
