"""Reading routed experts from a checkpoint: a process reads only the experts it holds.

>>> cfg = ModelConfig.from_pretrained("demo/")
>>> layers = load_experts(Checkpoint("demo/", cfg.fp8_block), cfg, [0, 1, 2, 3], torch.float32)
>>> layers[0].gate_up.shape        # [4, 2I, D]: experts 0..3 of MoE layer 0 (expert_kernel loop)
>>> load_experts(ckpt, cfg, [0, 1, 2, 3], torch.bfloat16, kernel="vllm")[0].kernel   # "vllm": packed for vLLM's op
>>> load_experts(ckpt, cfg, {0: [0, 1], 1: [2, 3, 5]}, torch.bfloat16)   # other experts in each MoE layer

A block-wise fp8 checkpoint is dequantized to `dtype` as the experts are read (Checkpoint.read_experts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from serving.engine_client import ExpertKernel
from serving.errors import CheckpointError
from serving.experts.backend import LayerExperts
from serving.experts.kernels import build_layer_experts, load_kernel
from serving.model.checkpoint import Checkpoint
from serving.model.config import ModelConfig


def load_experts(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    expert_ids: Sequence[int] | Mapping[int, Sequence[int]],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    kernel: ExpertKernel = "loop",
) -> dict[int, LayerExperts]:
    """The routed experts `expert_ids` of every MoE layer (or {model layer index: ids} for other experts in
    each layer), stacked per layer, on `device` (copied there layer by layer as they are read, so host memory
    holds one layer's share at a time), for the expert kernel `kernel` (auto, loop or vllm; resolved once
    here, see serving/experts/kernels.py). One layer's weights are packed for vLLM's op as soon as they are
    read, so memory peaks at the experts plus one layer."""
    per_layer = expert_ids if isinstance(expert_ids, Mapping) else dict.fromkeys(cfg.moe_layer_ids, expert_ids)
    if missing := sorted(set(cfg.moe_layer_ids) - set(per_layer)):
        raise CheckpointError(f"load_experts: no expert ids for MoE layers {missing} of {ckpt.path}")
    held: dict[int, LayerExperts] = {}
    I, D = cfg.moe_intermediate_size, cfg.hidden_size
    chosen = load_kernel(kernel, dtype, torch.device(device), D)
    for layer in cfg.moe_layer_ids:
        ids = list(per_layer[layer])
        E = len(ids)
        gate_up, down = (t.to(device) for t in ckpt.read_experts(layer, ids, dtype))  # host -> device
        if tuple(gate_up.shape) != (E, 2 * I, D) or tuple(down.shape) != (E, D, I):
            raise CheckpointError(
                f"{ckpt.path}: layer {layer} experts: gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)}, "
                f"expected {(E, 2 * I, D)} / {(E, D, I)}"
            )
        if not (torch.isfinite(gate_up).all() and torch.isfinite(down).all()):
            raise CheckpointError(f"{ckpt.path}: layer {layer} experts hold NaN or infinite values")
        held[layer] = build_layer_experts(chosen, gate_up, down, ids)
    return held
