"""The API holds no memory per request: a thousand streamed completions and chats through the whole HTTP
app (routes, SSE, metrics middleware, metered client) leave Python's traced memory flat. (The soak in
benchmarks/resilience.py measures the Ingress replica's RSS; this pins our part of it.)"""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc

import httpx

from serving.api.app import build_api
from serving.metrics import HttpMetrics, MeteredClient, NullSink
from serving.tokenizer import Tokenizer
from tests.serving.api.fakes import ScriptedEngine

REQUESTS = 1000
FRAMES = 16  # deep enough that most background threads' tracebacks reach threading.py


def test_thousands_of_streamed_requests_leave_traced_memory_flat(tokenizer_dir):
    tokenizer = Tokenizer(tokenizer_dir)
    engine = MeteredClient(ScriptedEngine(tokenizer.vocab_size, 512, max_new=8), NullSink(), "demo")
    api = build_api(engine, tokenizer, "demo", max_model_len=512)
    app = HttpMetrics(api, NullSink(), "demo", frozenset({"/v1/completions", "/v1/chat/completions"}))

    async def main() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:

            async def one(i: int) -> None:
                if i % 2:
                    body = {"model": "demo", "prompt": f"request {i}", "max_tokens": 8, "stream": True}
                    r = await client.post("/v1/completions", json=body)
                else:
                    body = {"model": "demo", "messages": [{"role": "user", "content": f"request {i}"}], "stream": True}
                    r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text

            for i in range(300):  # warm-up: caches of the tokenizer, regexes, pydantic
                await one(i)
            gc.collect()
            tracemalloc.start(FRAMES)
            before = this_thread(tracemalloc.take_snapshot())
            for i in range(REQUESTS):
                await one(i)
            gc.collect()
            after = this_thread(tracemalloc.take_snapshot())
            tracemalloc.stop()
            return after.compare_to(before, "traceback")

    diff = asyncio.run(main())
    grown = sum(stat.size_diff for stat in diff)
    top = "\n".join(str(stat) for stat in diff[:5])  # where it grew, if it did
    assert grown < REQUESTS * 128, f"{REQUESTS} requests kept {grown / 1024:.0f} KiB; most at:\n{top}"  # 128 B each


def this_thread(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    """Only what the test's own thread allocated: threads left by other tests in this process (an engine loop,
    a uvicorn server, Ray's driver) would count too. Their stacks start in threading.py; the test's does not."""
    return snapshot.filter_traces([tracemalloc.Filter(False, threading.__file__, all_frames=True)])
