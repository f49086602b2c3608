"""The API holds no memory per request: thousands of streamed completions and chats through the whole HTTP
app (routes, SSE, metrics middleware, metered client) leave Python's traced memory flat. (The soak in
benchmarks/resilience.py measures the Ingress replica's RSS; this pins our part of it.)"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import httpx

from serving.api.app import build_api
from serving.metrics import HttpMetrics, MeteredClient, NullSink
from serving.tokenizer import Tokenizer
from tests.serving.api.fakes import ScriptedEngine


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
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(2000):
                await one(i)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            return grown

    grown = asyncio.run(main())
    assert grown < 256 * 1024, f"2000 requests kept {grown / 1024:.0f} KiB"  # ~128 B a request at most
