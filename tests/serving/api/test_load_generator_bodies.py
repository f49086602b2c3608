"""What the field's load generators send is accepted: `vllm bench serve` (repetition_penalty=1.0,
logprobs=null) and guidellm (stream_options.continuous_usage_stats, GET /health before a run). The
bodies are the ones those tools build (vllm/benchmarks/lib/endpoint_request_func.py, guidellm's
openai request handlers), so a field one of them adds shows up here as a 400 first."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serving.api.app import build_api
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig

MODEL = "demo-mixtral"
PROMPT = "Experts live on"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(demo_dir):
    engine = LLMEngine.from_pretrained(demo_dir, EngineConfig(kv_cache_mb=16))
    front = AsyncEngine(lambda: engine, name="load-generator-bodies")
    yield engine, front
    front.shutdown()


@pytest.fixture(scope="module")
def app(served):
    engine, front = served
    return build_api(front, engine.tokenizer, MODEL, max_model_len=engine.max_model_len, api_keys=frozenset({"k"}))


def call(app, method: str, path: str, body: dict | None = None) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer k"}
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            return await client.request(method, path, json=body)

    return asyncio.run(main())


def chunks(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    *events, done = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert done == "[DONE]"
    return [json.loads(e) for e in events]


VLLM_COMPLETIONS = {  # vllm bench serve --backend openai (vllm 0.32), with --ignore-eos
    "model": MODEL, "prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": MAX_TOKENS, "logprobs": None,
    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
}  # fmt: skip
VLLM_CHAT = {  # --backend openai-chat
    "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
    "max_completion_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
}  # fmt: skip
GUIDELLM_STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
GUIDELLM_COMPLETIONS = {  # guidellm 0.8 openai_http, request_format /v1/completions, synthetic data
    "model": MODEL, "stream": True, "stream_options": GUIDELLM_STREAM_OPTIONS, "max_tokens": MAX_TOKENS,
    "ignore_eos": True, "prompt": PROMPT,
}  # fmt: skip
GUIDELLM_CHAT = {  # request_format /v1/chat/completions
    "model": MODEL, "stream": True, "stream_options": GUIDELLM_STREAM_OPTIONS, "max_completion_tokens": MAX_TOKENS,
    "ignore_eos": True, "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
}  # fmt: skip
BODIES = {
    "vllm completions": ("/v1/completions", VLLM_COMPLETIONS),
    "vllm chat": ("/v1/chat/completions", VLLM_CHAT),
    "guidellm completions": ("/v1/completions", GUIDELLM_COMPLETIONS),
    "guidellm chat": ("/v1/chat/completions", GUIDELLM_CHAT),
}


@pytest.mark.parametrize("tool", BODIES)
def test_a_load_generators_body_streams_every_token_it_asked_for(app, tool):
    path, body = BODIES[tool]
    *content, last = chunks(call(app, "POST", path, body))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == MAX_TOKENS


@pytest.mark.parametrize("tool", ["guidellm completions", "guidellm chat"])
def test_continuous_usage_counts_the_tokens_sent_so_far_on_every_chunk(app, tool):
    path, body = BODIES[tool]
    *content, last = chunks(call(app, "POST", path, body))
    assert all(c["usage"] is not None for c in content), "every chunk carries usage"
    sent = [c["usage"]["completion_tokens"] for c in content]
    assert sent == sorted(sent) and sent[-1] == MAX_TOKENS == last["usage"]["completion_tokens"]
    assert {c["usage"]["prompt_tokens"] for c in content} == {last["usage"]["prompt_tokens"]}
    if tool == "guidellm chat":
        assert content[0]["choices"][0]["delta"]["role"] == "assistant" and sent[0] == 0, "the role chunk: no token"
    # without include_usage, continuous_usage_stats does nothing (as vLLM): no usage anywhere
    quiet = chunks(call(app, "POST", path, {**body, "stream_options": {"continuous_usage_stats": True}}))
    assert all(c["usage"] is None for c in quiet)


def test_health_is_served_under_vllms_name_too_without_a_key(app):
    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/health"), await client.get("/v1/models")

    health, models = asyncio.run(main())
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert models.status_code == 401, "the other routes still need the key"
    assert "/health" not in call(app, "GET", "/openapi.json").json()["paths"], "documented once, as /healthz"


def test_a_repetition_penalty_that_would_change_the_output_is_refused(app):
    r = call(app, "POST", "/v1/completions", {**VLLM_COMPLETIONS, "repetition_penalty": 1.2})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "repetition_penalty" and "send 1" in r.json()["error"]["message"]
