"""Reading Hugging Face safetensors checkpoints: only the tensors asked for, checked on the way in.

A checkpoint folder has config.json, one or many *.safetensors files (with model.safetensors.index.json
when sharded) and tokenizer files. Tensors are addressed by *canonical* names, the names our modules
use (which are those of transformers' fused layout); older spellings on disk are mapped to them:

    block_sparse_moe.*      (Mixtral's original layout)   -> mlp.*
    mlp.shared_experts.*    (DeepSeek)                     -> mlp.shared_expert.*

Routed experts come in two on-disk layouts, both read by `read_experts`:
    per expert: ...mlp.experts.{e}.gate_proj/up_proj/down_proj.weight  (Mixtral: w1/w3/w2)
    fused:      ...mlp.experts.gate_up_proj [E, 2I, D] (gate rows first), ...mlp.experts.down_proj [E, D, I]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from serving.errors import CheckpointError

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
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._where = self._index()  # canonical name -> (file, stored name)
        self.bytes_read = 0  # bytes of tensor data read so far (shards check their share)

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
        """The tensor `name` (canonical), checked to have `shape`, converted to `dtype`."""
        file, stored = self._locate(name)
        tensor = self._load(file, stored, lambda f: f.get_tensor(stored))
        return self._checked(tensor, shape, dtype, f"{file.name}: tensor {stored!r}")

    def read_experts(self, layer: int, expert_ids: list[int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Routed experts `expert_ids` of `layer`, stacked: gate_up [E, 2I, D] and down [E, D, I].

        Reads only those experts' bytes, from either on-disk layout.
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
        out = []
        for part in ("gate_up_proj", "down_proj"):
            file, stored = self._locate(f"{prefix}.{part}")

            def rows(f, stored=stored, file=file):
                sl = f.get_slice(stored)
                if max(expert_ids) >= sl.get_shape()[0]:
                    raise CheckpointError(
                        f"{file.name}: tensor {stored!r} holds {sl.get_shape()[0]} experts, "
                        f"expert {max(expert_ids)} asked for"
                    )
                return torch.cat([sl[e : e + 1] for e in expert_ids])  # only these experts' bytes

            out.append(self._load(file, stored, rows).to(dtype))
        return out[0], out[1]

    def _locate(self, name: str) -> tuple[Path, str]:
        """(file, stored name) of canonical tensor `name`."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self._where[name]

    def _read_unchecked(self, name: str) -> Tensor:
        file, stored = self._locate(name)
        return self._load(file, stored, lambda f: f.get_tensor(stored))

    def _load(self, file: Path, stored: str, get) -> Tensor:
        try:
            with safe_open(file, "pt") as f:
                tensor = get(f)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {stored!r} ({e})") from e
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    @staticmethod
    def _checked(tensor: Tensor, shape: tuple[int, ...], dtype: torch.dtype, where: str) -> Tensor:
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{where} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where} has dtype {tensor.dtype}, expected a floating-point tensor")
        tensor = tensor.to(dtype)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where} holds NaN or infinite values")
        return tensor
