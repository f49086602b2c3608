"""Reading Hugging Face safetensors checkpoints: only the tensors asked for, checked on the way in.

A checkpoint folder has config.json, one or many *.safetensors files (with model.safetensors.index.json
when sharded) and tokenizer files. Tensors are addressed by *canonical* names, the names our modules
use (which are those of transformers' fused layout); older spellings on disk are mapped to them:

    block_sparse_moe.*      (Mixtral's original layout)   -> mlp.*
    mlp.shared_experts.*    (DeepSeek)                     -> mlp.shared_expert.*

Routed experts come in two on-disk layouts, both read by `read_experts`:
    per expert: ...mlp.experts.{e}.gate_proj/up_proj/down_proj.weight  (Mixtral: w1/w3/w2)
    fused:      ...mlp.experts.gate_up_proj [E, 2I, D] (gate rows first), ...mlp.experts.down_proj [E, D, I]

Block-wise fp8 checkpoints (DeepSeek-V3's layout, `ModelConfig.fp8_block`): a tensor stored as
float8_e4m3fn comes with `<stored name>_scale_inv` (`...weight_scale_inv`, fused: `...gate_up_proj_scale_inv`),
and every read path returns it dequantized (serving/model/fp8.py), reading only the scales of the
tensors it reads. What is quantized is whatever is stored as fp8 (DeepSeek: the linear layers' weights;
embeddings, norms, gates and lm_head stay bf16), so `modules_to_not_convert` needs no handling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from serving.errors import CheckpointError
from serving.model.fp8 import FP8_DTYPE, dequantize, scale_shape

_ALIASES = (("block_sparse_moe.", "mlp."), ("mlp.shared_experts.", "mlp.shared_expert."))
_MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def canonical_name(stored: str) -> str:
    for old, new in _ALIASES:
        stored = stored.replace(old, new)
    parts = stored.split(".")
    # Mixtral's per-expert w1/w3/w2 -> gate_proj/up_proj/down_proj
    if len(parts) >= 2 and parts[-2] in _MIXTRAL_EXPERT_NAMES and ".experts." in stored:
        parts[-2] = _MIXTRAL_EXPERT_NAMES[parts[-2]]
    return ".".join(parts)


class Checkpoint:
    """Lazy, checked access to the tensors of one checkpoint folder.

    >>> ckpt = Checkpoint("demo/")
    >>> w = ckpt.read("model.norm.weight", shape=(256,), dtype=torch.float32)
    >>> gate_up, down = ckpt.read_experts(layer=1, expert_ids=[0, 1], dtype=torch.float32)
    >>> fp8 = Checkpoint("DeepSeek-V3/", fp8_block=(128, 128))   # ModelConfig.fp8_block: dequantized on read

    `fp8_block` None: a tensor stored in fp8 is a CheckpointError (it would be read without its scales).
    """

    def __init__(self, path: str | Path, fp8_block: tuple[int, int] | None = None):
        self.path = Path(path)
        self.fp8_block = fp8_block
        self._where = self._index()  # canonical name -> (file, stored name)
        self.bytes_read = 0  # bytes of tensor data read so far, scales included (shards check their share)

    def _index(self) -> dict[str, tuple[Path, str]]:
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_file}: unreadable index ({e})") from e
            stored = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
            stored = {}
            for file in files:
                for name in self._keys(file):
                    stored[name] = file
        return {canonical_name(name): (file, name) for name, file in stored.items()}

    @staticmethod
    def _keys(file: Path) -> list[str]:
        try:
            with safe_open(file, "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e

    def has(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The tensor `name` (canonical), checked to have `shape`, converted to `dtype` (dequantized if fp8)."""
        file, stored = self._locate(name)
        where = f"{file.name}: tensor {stored!r}"
        tensor = self._load(file, stored, lambda f: f.get_tensor(stored))
        if tuple(tensor.shape) != tuple(shape):  # before its scale is looked at: the weight is what is wrong
            raise CheckpointError(f"{where} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        return self._checked(self._dequantized(name, file, stored, tensor, _whole), dtype, where)

    def read_experts(self, layer: int, expert_ids: list[int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Routed experts `expert_ids` of `layer`, stacked: gate_up [E, 2I, D] and down [E, D, I].

        Reads only those experts' bytes (and, fp8, only their scales), from either on-disk layout.
        """
        prefix = f"model.layers.{layer}.mlp.experts"
        if self.has(f"{prefix}.gate_up_proj"):
            return self._read_fused(prefix, expert_ids, dtype)
        gate_up, down = [], []
        for e in expert_ids:
            gate = self._read_unchecked(f"{prefix}.{e}.gate_proj.weight")  # [I, D]
            up = self._read_unchecked(f"{prefix}.{e}.up_proj.weight")  # [I, D]
            d = self._read_unchecked(f"{prefix}.{e}.down_proj.weight")  # [D, I]
            where = f"layer {layer} expert {e}"
            if gate.shape != up.shape or d.shape != gate.shape[::-1]:
                raise CheckpointError(
                    f"{self.path}: {where}: gate_proj {tuple(gate.shape)}, up_proj {tuple(up.shape)} and "
                    f"down_proj {tuple(d.shape)} do not fit together"
                )
            gate_up.append(torch.cat([gate, up], dim=0).to(dtype))
            down.append(d.to(dtype))
        return torch.stack(gate_up), torch.stack(down)

    def _read_fused(self, prefix: str, expert_ids: list[int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Fused layout; fp8 scales are [E, ceil(rows/B0), ceil(cols/B1)], sliced by expert like the weights."""

        def rows(f: Any, file: Path, stored: str) -> Tensor:
            sl = f.get_slice(stored)
            if max(expert_ids) >= sl.get_shape()[0]:
                raise CheckpointError(
                    f"{file.name}: tensor {stored!r} holds {sl.get_shape()[0]} experts, "
                    f"expert {max(expert_ids)} asked for"
                )
            return torch.cat([sl[e : e + 1] for e in expert_ids])  # only these experts' bytes

        out = []
        for part in ("gate_up_proj", "down_proj"):
            name = f"{prefix}.{part}"
            file, stored = self._locate(name)
            weight = self._load(file, stored, lambda f, file=file, stored=stored: rows(f, file, stored))
            out.append(self._dequantized(name, file, stored, weight, rows).to(dtype))
        return out[0], out[1]

    def _locate(self, name: str) -> tuple[Path, str]:
        """(file, stored name) of canonical tensor `name`."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self._where[name]

    def _read_unchecked(self, name: str) -> Tensor:
        """Tensor `name` as stored, or dequantized to float32 if stored in fp8; shape unchecked."""
        file, stored = self._locate(name)
        tensor = self._load(file, stored, lambda f: f.get_tensor(stored))
        return self._dequantized(name, file, stored, tensor, _whole)

    def _dequantized(self, name: str, file: Path, stored: str, weight: Tensor, read_scale: _ScaleReader) -> Tensor:
        """`weight` (canonical `name`, read from `file` as `stored`) dequantized to float32 if fp8, else as it is.

        `read_scale(open file, its path, stored scale name)` reads the part of the scale that matches
        the part of the weight that was read (all of it, or some experts' rows).
        """
        where = f"{file.name}: tensor {stored!r}"
        scale_name, scale_stored = f"{name}_scale_inv", f"{stored}_scale_inv"
        if not (weight.is_floating_point() and weight.element_size() == 1):  # not fp8 of any kind
            if self.has(scale_name):
                raise CheckpointError(f"{where} has a scale {scale_stored!r} but is stored as {weight.dtype}, not fp8")
            return weight
        if weight.dtype != FP8_DTYPE:
            raise CheckpointError(f"{where} is {weight.dtype}; only {FP8_DTYPE} with block scales is supported")
        if self.fp8_block is None:
            raise CheckpointError(
                f"{where} is {FP8_DTYPE} but config.json has no block-wise fp8 quantization_config to read it by"
            )
        if not self.has(scale_name):
            raise CheckpointError(f"{where} is {FP8_DTYPE} but its scale {scale_stored!r} is missing")
        scale_file, scale_stored = self._locate(scale_name)
        scale_where = f"{scale_file.name}: tensor {scale_stored!r}"
        scale = self._load(scale_file, scale_stored, lambda f: read_scale(f, scale_file, scale_stored))
        expected = scale_shape(tuple(weight.shape), self.fp8_block)
        if tuple(scale.shape) != expected:
            raise CheckpointError(
                f"{scale_where} has shape {tuple(scale.shape)}, expected {expected}: one scale per "
                f"{self.fp8_block[0]}x{self.fp8_block[1]} block of {stored!r} {tuple(weight.shape)}"
            )
        if not scale.is_floating_point() or not torch.isfinite(scale.float()).all():
            raise CheckpointError(f"{scale_where} ({scale.dtype}) is not a finite floating-point scale")
        return dequantize(weight, scale, self.fp8_block)

    def _load(self, file: Path, stored: str, get: Callable[[Any], Tensor]) -> Tensor:
        try:
            with safe_open(file, "pt") as f:
                tensor = get(f)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {stored!r} ({e})") from e
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    @staticmethod
    def _checked(tensor: Tensor, dtype: torch.dtype, where: str) -> Tensor:
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where} has dtype {tensor.dtype}, expected a floating-point tensor")
        tensor = tensor.to(dtype)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where} holds NaN or infinite values")
        return tensor


_ScaleReader = Callable[[Any, Path, str], Tensor]  # (open safetensors file, its path, stored name) -> tensor


def _whole(f: Any, file: Path, stored: str) -> Tensor:
    return f.get_tensor(stored)
