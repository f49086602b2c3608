"""Routed-expert calls off the engine thread, one at a time in the order they were submitted.

    >>> pipeline = ExpertPipeline(backend)
    >>> pending = pipeline.submit(layer, hidden, weights, ids)   # returns at once
    >>> ...                                                       # the engine thread computes something else
    >>> out = pending.result()                                    # [T, D], as backend(layer, ...) gives it

This is what lets a step keep two micro-batches in flight (MoEForCausalLM.forward_overlapped): while the
expert shards compute one micro-batch's rows, the engine thread runs the other's attention. One worker
thread makes every call, so the backend (its transport's streams, its retry state, the routing counts)
is still used by one thread at a time, in submission order: micro-batch A's call of a layer, then B's.
The worker waits on sockets most of the time, with the GIL released.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from serving.experts.backend import ExpertBackend


class ExpertPipeline:
    def __init__(self, backend: ExpertBackend):
        self.backend = backend
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-pipeline")

    def submit(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Future[Tensor]:
        return self._worker.submit(self._call, layer, hidden, weights, ids)

    def _call(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        with torch.inference_mode():  # grad mode is per thread: the engine thread's does not reach this one
            return self.backend(layer, hidden, weights, ids)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
