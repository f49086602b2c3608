"""Counting the gate's choices per (layer, expert): an ExpertBackend wrapper in the data path.

The engine drains the counts once per step into moe_expert_tokens_total{layer, expert}, which makes
routing imbalance visible, and into its sliding window of expert load (serving/experts/load_window.py).
Counting stays on the device (one bincount per layer); the only host sync is the drain, once per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from serving.experts.backend import ExpertBackend, Routed

# T = tokens, K = experts per token, D = hidden, E = routed experts


class RoutingCounter:
    """Wraps an ExpertBackend and counts the gate's choices per (layer, expert) until `drain()`."""

    def __init__(self, backend: ExpertBackend, num_experts: int):
        self.backend, self.num_experts = backend, num_experts
        self.counts: dict[int, Tensor] = {}  # layer -> [E] token rows routed so far

    def __call__(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        self._count(layer, ids)
        return self.backend(layer, hidden, weights, ids)

    def start(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Routed:
        self._count(layer, ids)
        return self.backend.start(layer, hidden, weights, ids)

    def _count(self, layer: int, ids: Tensor) -> None:
        routed = torch.bincount(ids.flatten(), minlength=self.num_experts)  # [E]
        self.counts[layer] = self.counts.get(layer, 0) + routed

    def drain(self) -> tuple[list[int], Tensor]:
        """(layers, rows [len(layers), E] int64 on the host): the rows routed to each expert since the last
        drain, for the layers that ran (model layer ids, in the order they ran)."""
        if not self.counts:
            return [], torch.zeros(0, self.num_experts, dtype=torch.int64)
        layers = list(self.counts)
        rows = torch.stack([self.counts[layer] for layer in layers]).cpu()  # [layers, E]: the one host sync
        self.counts = {}
        return layers, rows
