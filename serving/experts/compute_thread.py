"""One thread for a process's parallel torch work, where torch runs more than one OpenMP thread.

    >>> compute = ComputeThread("shard-compute")
    >>> layers = compute.run(load_experts, ckpt, cfg, ids, dtype, device, kernel)   # loaded on that thread...
    >>> out = compute.run(run_shard_call, layers, layer, call)                       # ...and computed there

Why: GNU OpenMP, which CPU torch uses, keeps a pool of worker threads per thread that ever ran a parallel
region. A replica that loads on one thread (Serve's init) and computes on others (Serve's request thread, a
ShardServer connection per router) holds several pools, more OpenMP threads than its cores, and libgomp then
lets idle workers spin only briefly: each small op wakes a sleeping worker. Measured on bench, half the
experts of 3 MoE layers, 2 threads: a call of 1 / 8 / 32 rows took 2.6-3.3 / 16.0-20.6 / 30.0-33.9 ms on
the loader's thread and 4.7-5.0 / 24.7-28.7 / 51.2-51.3 ms on another. (The Router replica has the same
rule for its engine: serving/engine/async_engine.py.)

With one OpenMP thread there is no pool, so `run` calls on the caller's thread and saves the handoff
(~50 us a call here).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name) if torch.get_num_threads() > 1 else None

    @property
    def threaded(self) -> bool:
        """Whether calls run on the one compute thread (torch runs more than one OpenMP thread here)."""
        return self._pool is not None

    def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the compute thread (or the caller's), blocking the caller; its exception is raised here.
        Calls from several threads run one at a time, in the order they arrive."""
        if self._pool is None:
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
