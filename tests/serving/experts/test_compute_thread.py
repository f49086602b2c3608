"""ComputeThread: with several OpenMP threads every call runs on one thread (the one that loaded), whichever
thread asks; with one OpenMP thread on the caller's; an exception reaches the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from serving.experts.compute_thread import ComputeThread


@pytest.fixture
def omp_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _from_threads(compute: ComputeThread, n: int) -> set[int]:
    seen: set[int] = set()
    alive = threading.Barrier(n)  # all callers live at once, so no two share a thread id

    def call():
        seen.add(compute.run(threading.get_ident))
        alive.wait(10)

    callers = [threading.Thread(target=call) for _ in range(n)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(10)
    return seen


def test_with_several_openmp_threads_every_call_runs_on_the_thread_that_loaded(omp_threads):
    omp_threads(2)
    compute = ComputeThread("test-compute")
    loader = compute.run(threading.get_ident)  # what a replica's load does first
    assert compute.threaded and loader != threading.get_ident()
    assert _from_threads(compute, 4) == {loader}  # e.g. Serve's thread and one ShardServer thread per router
    with pytest.raises(ValueError, match="stale"):
        compute.run(lambda: (_ for _ in ()).throw(ValueError("stale")))
    compute.close()


def test_with_one_openmp_thread_calls_run_on_the_callers_thread(omp_threads):
    omp_threads(1)
    compute = ComputeThread("test-compute")
    assert not compute.threaded and compute.run(threading.get_ident) == threading.get_ident()
    assert len(_from_threads(compute, 3)) == 3
