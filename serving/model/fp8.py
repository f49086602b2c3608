"""Block-wise fp8 weights (DeepSeek-V3's layout): dequantize at load, and quantize the same way for demos.

A quantized linear weight W [out, in] is stored as float8_e4m3fn with a float32 `<name>_scale_inv`
of shape [ceil(out / B0), ceil(in / B1)], one scale per B0 x B1 block (B = weight_block_size, 128 x 128
in DeepSeek's checkpoints); the last block of a dimension that is not a multiple of B is partial:

    W[r, c] = W_fp8[r, c] * scale_inv[r // B0, c // B1]

Leading dimensions (fused experts: [E, 2I, D] with scales [E, ceil(2I/B0), ceil(D/B1)]) are batch dims.
The product is taken in float32, then cast once to the served dtype, as DeepSeek's weight_dequant does.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448: e4m3fn's largest finite value


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a weight of `shape` [..., R, C]: [..., ceil(R / B0), ceil(C / B1)]."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _per_element(scale: Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> Tensor:
    """scale [..., ceil(R/B0), ceil(C/B1)] -> [..., R, C]: each block's scale over its elements (edges cut)."""
    rows, cols = shape[-2:]
    scale = scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return scale.repeat_interleave(block[1], dim=-1)[..., :cols]


def dequantize(weight: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    """float32 W [..., R, C] from fp8 `weight` [..., R, C] and `scale_inv` [..., ceil(R/B0), ceil(C/B1)].

    Shapes must fit (`scale_shape`); the caller checks them and says which tensor is at fault.
    """
    out = weight.to(torch.float32)  # [..., R, C]: the only full-size tensor made
    # Each block row's scales spread over its columns, [..., ceil(R/B0), C]; then one in-place multiply
    # per block row, broadcast over its B0 rows (the last block row may be shorter).
    col_scale = scale_inv.float().repeat_interleave(block[1], dim=-1)[..., : out.shape[-1]]
    for i in range(col_scale.shape[-2]):
        out[..., i * block[0] : (i + 1) * block[0], :].mul_(col_scale[..., i : i + 1, :])
    return out


def quantize(weight: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(fp8 weight, float32 scale_inv) of `weight` [..., R, C], per block as DeepSeek quantizes.

    scale_inv = amax(|block|) / 448 and W_fp8 = W / scale_inv (DeepSeek's weight_quant), so that
    `dequantize(*quantize(w, b), b)` is w to within e4m3's 3 mantissa bits. An all-zero block gets
    scale 1 (DeepSeek's formula would divide by zero; any scale dequantizes its zeros to zeros).
    """
    w = weight.float()
    rows, cols = w.shape[-2:]
    grid = scale_shape(tuple(w.shape), block)
    pad_r, pad_c = grid[-2] * block[0] - rows, grid[-1] * block[1] - cols
    # Zero-pad to whole blocks ([..., nR, B0, nC, B1]), so partial edge blocks take the max of what they hold.
    padded = torch.nn.functional.pad(w.abs(), (0, pad_c, 0, pad_r))
    blocks = padded.reshape(*grid[:-2], grid[-2], block[0], grid[-1], block[1])
    amax = blocks.amax(dim=(-3, -1))  # [..., nR, nC]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = w / _per_element(scale_inv, tuple(w.shape), block)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_inv
