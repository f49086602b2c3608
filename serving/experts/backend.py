"""The expert-backend seam: where an MoE layer sends its routed tokens.

The model's MoE layer computes the gate, then calls an ``ExpertBackend``. ``LocalExpertBackend``
(serving/experts/local.py) computes the experts in this process; ``ShardedExpertBackend``
(serving/experts/sharded.py) sends them to expert shards over a transport. Both implement this
protocol, so a test runs one layer both ways and compares the numbers.

Usage::

    out = backend(layer, hidden, weights, ids)   # [T, D]
"""

from typing import Protocol

from torch import Tensor

# T = tokens, K = experts per token, D = hidden


class ExpertBackend(Protocol):
    def __call__(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Return ``out [T, D]`` (hidden's dtype) with
        ``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t])`` for MoE layer ``layer``.

        hidden: [T, D]; weights: [T, K] (the gate's output); ids: [T, K] global expert ids.
        """
        ...
