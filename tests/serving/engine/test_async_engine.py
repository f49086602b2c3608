"""The asyncio front: streams, refusals, and cancellation freeing the cache."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig, SamplingParams
from serving.errors import EngineUnavailableError, RequestError, StepFailedError
from tests.polling import poll

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engines(mixtral):
    model, experts = mixtral
    engine = LLMEngine(model, experts, None, EngineConfig())
    front = AsyncEngine(lambda: engine)
    yield engine, front
    front.shutdown()


def test_concurrent_streams_match_offline_generation(engines, mixtral):
    engine, front = engines
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10] * 20]
    model, experts = mixtral
    want = LLMEngine(model, experts, None, EngineConfig()).generate_batch(prompts, GREEDY)

    async def collect(p):
        tokens, last = [], None
        async for out in front.generate(p, GREEDY):
            tokens += out.new_token_ids
            last = out
        return tokens, last.finish_reason

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    got = asyncio.run(main())
    assert [t for t, _ in got] == [c.token_ids for c in want]
    assert all(reason == "length" for _, reason in got)


def test_refused_request_raises_before_streaming(engines):
    _, front = engines

    async def main():
        async for _ in front.generate([], GREEDY):
            pass

    with pytest.raises(RequestError, match="empty"):
        asyncio.run(main())


def test_leaving_a_stream_early_aborts_and_frees_the_cache(engines):
    engine, front = engines
    free = engine.allocator.num_free

    async def main():
        async for _ in front.generate(list(range(30)), SamplingParams(max_tokens=200, ignore_eos=True)):
            break  # client went away after the first token

    asyncio.run(main())
    deadline = asyncio.run(poll(lambda: engine.allocator.num_free == free and not engine.has_unfinished()))
    assert deadline, "the aborted request still holds cache blocks"


class FailingOnce:
    """An ExpertBackend whose first call fails as a shard down past its bound does."""

    def __init__(self, backend):
        self.backend, self.failed = backend, False

    def __call__(self, layer, hidden, weights, ids):
        return self.start(layer, hidden, weights, ids).result()

    def start(self, layer, hidden, weights, ids):
        if not self.failed:
            self.failed = True
            raise EngineUnavailableError("expert shard(s) [1] answered no call")
        return self.backend.start(layer, hidden, weights, ids)


def test_a_failed_step_fails_its_requests_and_the_queued_ones_go_on(mixtral):
    model, experts = mixtral
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    want = LLMEngine(model, experts, None, EngineConfig()).generate_batch(prompts, GREEDY)
    engine = LLMEngine(model, FailingOnce(experts), None, EngineConfig(max_running=2))
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    with pytest.raises(StepFailedError) as failed:
        engine.step()  # the first two run in it; the third waits for a place
    assert failed.value.request_ids == ids[:2] and isinstance(failed.value.cause, EngineUnavailableError)
    assert engine.allocator.num_free == engine.allocator.num_blocks  # their cache is freed
    [third] = [c for c in _drain(engine) if c]
    assert third == want[2].token_ids


def test_streams_of_a_failed_step_get_its_error_and_the_others_complete(mixtral):
    model, experts = mixtral
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    want = LLMEngine(model, experts, None, EngineConfig()).generate_batch(prompts, GREEDY)
    front = AsyncEngine(lambda: LLMEngine(model, FailingOnce(experts), None, EngineConfig(max_running=2)))

    async def collect(p):
        try:
            return [t async for out in front.generate(p, GREEDY) for t in out.new_token_ids]
        except EngineUnavailableError as e:
            return e

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    try:
        got = asyncio.run(main())
        assert front.alive  # the engine goes on
    finally:
        front.shutdown()
    failed = [i for i, g in enumerate(got) if isinstance(g, EngineUnavailableError)]
    assert 1 <= len(failed) <= 2  # the first step's requests (which ones depends on arrival)
    assert all(got[i] == want[i].token_ids for i in range(3) if i not in failed)


def _drain(engine):
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return list(tokens.values())


def test_the_engine_is_built_on_its_own_thread_and_a_failed_build_raises_to_the_caller(mixtral):
    """Loading and stepping share one thread (one OpenMP pool: async_engine.py says why it matters)."""
    model, experts = mixtral
    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return LLMEngine(model, experts, None, EngineConfig())

    front = AsyncEngine(build, name="built-here")
    try:
        stepped_on = []
        front.engine.runner.run = _recording(front.engine.runner.run, stepped_on)

        async def main():
            return [t async for out in front.generate([1, 2, 3], GREEDY) for t in out.new_token_ids]

        assert len(asyncio.run(main())) == GREEDY.max_tokens
    finally:
        front.shutdown()
    assert built_on == ["built-here-loop"] and set(stepped_on) == {"built-here-loop"}

    def broken():
        raise ValueError("no checkpoint at /nowhere")

    with pytest.raises(ValueError, match="no checkpoint at /nowhere"):
        AsyncEngine(broken, name="broken")


def _recording(fn, threads: list[str]):
    def wrapped(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return fn(*args, **kwargs)

    return wrapped
