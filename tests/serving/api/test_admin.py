"""GET /v1/admin/expert-load in process: the engine's window through the API, admin keys, and its errors."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serving.api.app import build_api
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig
from serving.errors import EngineUnavailableError
from serving.expert_load import ExpertLoad
from serving.tokenizer import Tokenizer
from tests.serving.api.fakes import FixedExpertLoad, ScriptedEngine

ROUTE = "/v1/admin/expert-load"
ADMIN, USER = "admin-key-1", "user-key-1"


def get(app, path: str = ROUTE, key: str | None = None, method: str = "GET") -> httpx.Response:
    async def main():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(main())


def fake_app(tokenizer_dir, source, **keys):
    tokenizer = Tokenizer(tokenizer_dir)
    engine = ScriptedEngine(tokenizer.vocab_size, 256)
    return build_api(engine, tokenizer, "demo", max_model_len=256, expert_load=source, **keys)


def test_the_engines_window_counts_every_routed_token(demo_dir):
    engine = LLMEngine.from_pretrained(demo_dir, EngineConfig(kv_cache_mb=16, expert_load_window_s=30))
    front = AsyncEngine(lambda: engine, name="admin-test")
    try:
        app = build_api(front, engine.tokenizer, "demo", max_model_len=engine.max_model_len, expert_load=front)
        assert sum(map(sum, get(app).json()["load"])) == 0
        prompt, new = "Experts live on", 5
        body = {"model": "demo", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True}

        async def complete():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await client.post("/v1/completions", json=body)

        assert asyncio.run(complete()).status_code == 200
        r = get(app)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["layers"] == [0, 1] and doc["num_experts"] == 8 and doc["window_s"] == 30 and doc["routers"] == 1
        tokens = len(engine.tokenizer.encode(prompt)) + new - 1  # the last token is sampled, never run
        assert [sum(row) for row in doc["load"]] == [tokens * 2, tokens * 2]  # top-2 in each MoE layer
    finally:
        front.shutdown()


def test_admin_keys_open_it_api_keys_do_not(tokenizer_dir):
    app = fake_app(tokenizer_dir, FixedExpertLoad(), api_keys=frozenset({USER}), admin_keys=frozenset({ADMIN}))
    assert get(app, key=ADMIN).status_code == 200
    refused = get(app, key=USER)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    assert "admin route" in refused.json()["error"]["message"]
    assert get(app).status_code == 401
    assert get(app, key=USER, method="HEAD").status_code == 405  # GET only


def test_without_keys_it_is_open_and_answers_the_sources_load(tokenizer_dir):
    r = get(fake_app(tokenizer_dir, FixedExpertLoad()))
    assert r.status_code == 200
    assert r.json() == FixedExpertLoad.LOAD.to_json()


def test_an_engine_that_does_not_measure_load_is_a_404_naming_why(tokenizer_dir):
    r = get(fake_app(tokenizer_dir, None))
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "expert_load_unavailable" and "engine: vllm" in error["message"]


class NoRouters:
    async def expert_load(self) -> ExpertLoad:
        raise EngineUnavailableError("expert load: no Router replica is up; retry later")


def test_no_router_answering_is_a_503_with_retry_after(tokenizer_dir):
    r = get(fake_app(tokenizer_dir, NoRouters()))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "no Router replica" in r.json()["error"]["message"]


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_other_methods_are_405(tokenizer_dir, method):
    assert get(fake_app(tokenizer_dir, FixedExpertLoad()), method=method).status_code == 405
