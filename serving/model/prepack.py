"""Linears on weights packed once for oneDNN: bfloat16 GEMMs of few rows near memory speed on CPU.

    model, ckpt = load_model(path, torch.bfloat16, "cpu")   # load_model packs the dense linears itself
    prepack_linears(model)                                  # or by hand: every nn.Linear -> PackedLinear
    y = linear(x, packed_weight(w))                         # one weight (the loop expert kernel's experts)

Why: `F.linear` in bfloat16 on CPU takes the weight as stored on every call; reordering it into oneDNN's
own layout once, at load, makes each call faster and gives the same output bits (tests/serving/model/
test_prepack.py checks 1 to 512 rows; we did not find F.linear documented to round this way, so the test is
what holds it). Measured on the CI machine (2 cores, AVX-512 BF16, torch 2.13), 2048 -> N, ms per call:

    rows   N = 2048      N = 10944     N = 32000 (an LM head)
    1      0.13 -> 0.05  1.20 -> 0.48  4.13 -> 2.28
    32     0.35 -> 0.27  2.30 -> 1.70  7.22 -> 5.14
    128    1.05 -> 0.98  7.01 -> 6.28  18.1 -> 16.3

So a decode step, whose dense GEMMs have one row per sequence, gains most; a prefill chunk little.
Applied from outside to a built model (as gpt-fast applies tensor parallelism), only on CPU in bfloat16:
in float32 the packed path rounds differently from F.linear (~1e-6, measured), and float16 needs
AVX512-FP16, which CPUs of this kind lack. GPUs are untouched. A packed weight is the only copy kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def packed_weight(weight: Tensor) -> Tensor:
    """A linear weight [out, in] reordered for oneDNN: an opaque tensor that only `linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for a plain weight or a `packed_weight`: [..., in] -> [..., out]."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    # oneDNN reads the input as dense rows: a strided view must be copied first.
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`nn.Linear` (no grad) on a weight in oneDNN's layout: same outputs, same bits, for bfloat16 inputs.

    The packed weight is an opaque oneDNN tensor, not a parameter: it is not in `state_dict()` (the model
    is loaded before it is packed, and never saved after)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.packed = packed_weight(layer.weight)  # [out, in], opaque
        self.bias = None if layer.bias is None else layer.bias.detach()  # [out]

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.packed, self.bias)  # [..., in] -> [..., out]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `prepack_linears` applies: bfloat16 on a CPU whose oneDNN runs bfloat16."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def prepack_linears(model: nn.Module, keep: tuple[nn.Module, ...] = ()) -> int:
    """Replace every `nn.Linear` of `model` (but those in `keep`) by a PackedLinear; returns how many.

    `keep`: linears whose weight something else also holds (a tied LM head shares the embedding's), so
    that packing them would keep a second copy of the weight."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and not any(child is k for k in keep)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
