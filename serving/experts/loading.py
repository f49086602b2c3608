"""Reading routed experts from a checkpoint: a process reads only the experts it holds.

>>> layers = load_experts(Checkpoint("demo/"), ModelConfig.from_pretrained("demo/"), [0, 1, 2, 3], torch.bfloat16)
>>> layers[0].gate_up.shape        # [4, 2I, D]: experts 0..3 of MoE layer 0 (expert_kernel loop)
>>> load_experts(ckpt, cfg, [0, 1, 2, 3], torch.bfloat16, "vllm")[0].kernel   # "vllm": packed for vLLM's op
"""

from __future__ import annotations

import torch

from serving.engine_client import ExpertKernel
from serving.errors import CheckpointError
from serving.experts.backend import LayerExperts
from serving.experts.kernels import build_layer_experts, load_kernel
from serving.experts.local import StackedExperts
from serving.model.checkpoint import Checkpoint
from serving.model.config import ModelConfig


def load_experts(
    ckpt: Checkpoint, cfg: ModelConfig, expert_ids: list[int], dtype: torch.dtype, kernel: ExpertKernel = "loop"
) -> dict[int, LayerExperts]:
    """The routed experts `expert_ids` of every MoE layer, stacked per layer, for the expert kernel `kernel`
    (auto, loop or vllm; resolved once here, see serving/experts/kernels.py). One layer's weights are
    packed for vLLM's op as soon as they are read, so memory peaks at the experts plus one layer."""
    held: dict[int, LayerExperts] = {}
    E, I, D = len(expert_ids), cfg.moe_intermediate_size, cfg.hidden_size
    chosen = load_kernel(kernel, dtype, torch.device("cpu"), D)  # experts are read onto the CPU
    for layer in cfg.moe_layer_ids:
        gate_up, down = ckpt.read_experts(layer, expert_ids, dtype)
        if tuple(gate_up.shape) != (E, 2 * I, D) or tuple(down.shape) != (E, D, I):
            raise CheckpointError(
                f"{ckpt.path}: layer {layer} experts: gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)}, "
                f"expected {(E, 2 * I, D)} / {(E, D, I)}"
            )
        if not (torch.isfinite(gate_up).all() and torch.isfinite(down).all()):
            raise CheckpointError(f"{ckpt.path}: layer {layer} experts hold NaN or infinite values")
        held[layer] = build_layer_experts(chosen, StackedExperts(gate_up=gate_up, down=down, expert_ids=expert_ids))
    return held
