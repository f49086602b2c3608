"""The scheduler and block allocator, without a model."""

from __future__ import annotations

from serving.engine.kv_cache import BlockAllocator
from serving.engine.sampler import make_generator
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence, Status
from serving.engine_client import SamplingParams


def seq(name: str, n: int) -> Sequence:
    return Sequence(name, list(range(n)), SamplingParams(), make_generator(0), 0)


def test_prefill_is_chunked_to_the_token_budget_and_decodes_go_first():
    sched = Scheduler(BlockAllocator(num_blocks=64, block_size=4), max_batched_tokens=10, max_running=8)
    a, b = seq("a", 3), seq("b", 25)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert [(c.seq.request_id, c.num_new) for c in first] == [("a", 3), ("b", 7)]
    for c in first:
        c.seq.num_cached += c.num_new
    a.token_ids.append(0)  # a sampled its first token; b is still prefilling
    second = sched.schedule()
    assert [(c.seq.request_id, c.num_new) for c in second] == [("a", 1), ("b", 9)]


def test_new_requests_wait_while_their_prompt_does_not_fit():
    alloc = BlockAllocator(num_blocks=4, block_size=4)  # 16 tokens of cache
    sched = Scheduler(alloc, max_batched_tokens=64, max_running=8)
    big, small = seq("big", 12), seq("small", 8)
    sched.add(big)
    sched.add(small)
    assert [c.seq.request_id for c in sched.schedule()] == ["big"]
    assert small.status is Status.WAITING and alloc.num_free == 1
    sched.remove(big)
    assert alloc.num_free == 4
    assert [c.seq.request_id for c in sched.schedule()] == ["small"]


def test_decode_that_needs_memory_preempts_the_newest_sequence():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    sched = Scheduler(alloc, max_batched_tokens=64, max_running=8)
    old, new = seq("old", 8), seq("new", 8)
    sched.add(old)
    sched.add(new)
    for c in sched.schedule():
        c.seq.num_cached += c.num_new
        c.seq.token_ids.append(1)
    assert alloc.num_free == 0
    # both now need a third block for their 9th token: old gets new's blocks, new is requeued
    chunks = sched.schedule()
    assert [c.seq.request_id for c in chunks] == ["old"]
    assert new.status is Status.WAITING and new.num_cached == 0 and sched.waiting[0] is new
    assert new.num_uncached == 9  # prompt and its output so far are recomputed on readmission
