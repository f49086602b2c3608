"""The expert-backend seam: where an MoE layer sends its routed tokens.

The model's MoE layer computes the gate, then calls an ``ExpertBackend``. ``LocalExpertBackend``
(serving/experts/local.py) computes the experts in this process; ``ShardedExpertBackend``
(serving/experts/sharded.py) sends them to expert shards over a transport. Both implement this
protocol, so a test runs one layer both ways and compares the numbers.

Behind either backend, one layer's experts held by one process are a ``LayerExperts``: the loop kernel
(``StackedExperts``, serving/experts/local.py) or vLLM's fused op (``VLLMFusedExperts``,
serving/experts/fused.py), chosen by ``engine_config.expert_kernel`` (serving/experts/kernels.py).

Usage::

    out = backend(layer, hidden, weights, ids)   # [T, D]
    routed = backend.start(layer, hidden, weights, ids)   # remote experts: the calls are on their way ...
    out = routed.result()                                  # ... while this thread did something else
    part = layer_experts.forward(hidden, local_rows, experts, weights)   # [R, D]
"""

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

# T = tokens, K = experts per token, D = hidden, R = rows sent to one process, A = (row, expert) assignments


class Routed(Protocol):
    """A layer's routed experts, started: ``result()`` gives ``out [T, D]`` (waiting for it if need be)."""

    def result(self) -> Tensor: ...


@dataclass(frozen=True)
class Computed:
    """Routed experts computed already (an in-process backend's ``start``: nothing runs in the background)."""

    out: Tensor  # [T, D]

    def result(self) -> Tensor:
        return self.out


class ExpertBackend(Protocol):
    def __call__(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Return ``out [T, D]`` (hidden's dtype) with
        ``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t])`` for MoE layer ``layer``.

        hidden: [T, D]; weights: [T, K] (the gate's output); ids: [T, K] global expert ids.
        """
        ...

    def start(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Routed:
        """The same, started: a backend whose experts are elsewhere sends them the rows and returns at once,
        so the caller computes meanwhile (the MoE block runs its shared expert); one in this process
        computes now. ``start(...).result()`` equals ``__call__(...)`` to the bit."""
        ...


class LayerExperts(Protocol):
    """One MoE layer's experts held by one process (a shard, or the router with every expert)."""

    kernel: str  # "loop" or "vllm": the expert kernel that computes them

    @property
    def expert_ids(self) -> Tensor:
        """[E_held] int64 global ids of the held experts, ascending."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights held."""
        ...

    @property
    def dtype(self) -> torch.dtype: ...

    def forward(self, hidden: Tensor, local_rows: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Weighted expert outputs summed per row: ``out [R, D]`` in hidden's dtype.

        hidden: [R, D]; local_rows, experts (global ids, all held here), weights: [A] assignments, where
        assignment a adds ``weights[a] * expert_{experts[a]}(hidden[local_rows[a]])`` to
        ``out[local_rows[a]]``. A row with no assignment stays zero; an expert not held is a ValueError.
        """
        ...
