"""The asyncio front: streams, refusals, and cancellation freeing the cache."""

from __future__ import annotations

import asyncio

import pytest

from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig, SamplingParams
from serving.errors import RequestError
from tests.polling import poll

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engines(mixtral):
    model, experts = mixtral
    engine = LLMEngine(model, experts, None, EngineConfig())
    front = AsyncEngine(engine)
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
