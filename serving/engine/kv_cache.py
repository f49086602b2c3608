"""The paged KV cache: a block allocator (no tensors) and the cache tensors it indexes.

The cache is cut into blocks of `block_size` token slots. A sequence holds a list of blocks; token
i of the sequence lives in slot blocks[i // block_size] * block_size + i % block_size, in every layer.
The allocator is pure bookkeeping, so the scheduler can reason about memory without touching tensors.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor


class BlockAllocator:
    """Hands out and takes back cache blocks.

    >>> alloc = BlockAllocator(num_blocks=4, block_size=16)
    >>> blocks = alloc.allocate(2)
    >>> alloc.release(blocks)
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache: {n} blocks asked, {len(self._free)} free")  # scheduler checks first
        return [self._free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class KVCache:
    """Cache tensors: for each layer, one [num_slots, *row] tensor per row shape the layer asks for."""

    def __init__(
        self,
        shapes: list[list[tuple[int, ...]]],
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        slots = num_blocks * block_size
        self.layers: list[list[Tensor]] = [
            [torch.zeros(slots, *shape, dtype=dtype, device=device) for shape in layer] for layer in shapes
        ]

    @staticmethod
    def bytes_per_token(shapes: list[list[tuple[int, ...]]], dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(shape) * itemsize for layer in shapes for shape in layer)

    @classmethod
    def blocks_in_budget(
        cls, shapes: list[list[tuple[int, ...]]], budget_bytes: int, block_size: int, dtype: torch.dtype
    ) -> int:
        """How many blocks fit in `budget_bytes` of cache memory."""
        return budget_bytes // (cls.bytes_per_token(shapes, dtype) * block_size)
