"""RAG through the HTTP API in process (no Ray): real all-MiniLM-L6-v2 embeddings, the embedded Qdrant
store, and the real engine on the demo checkpoint. What reaches the engine is recorded and compared with
the one template (serving/retrieval/rag.py) applied to what the store returns; failures use a Qdrant URL
nobody listens on, and a retriever client that never answers (same protocol)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from serving.api.app import build_api
from serving.api.retrieval import Retrieval
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig
from serving.metrics import MemorySink
from serving.retrieval.embedder import Embedder
from serving.retrieval.rag import INSTRUCTION, fuse
from serving.retrieval.service import AsyncRetrieval, RetrievalService, RetrievalSettings
from serving.retrieval.store import VectorStore

MODEL = "demo-mixtral"
DOCS = {
    "bees.md": "# Bees\n\nA forager bee returning to the hive dances in a figure of eight. The angle of the waggle "
    "run tells the other bees the direction of the flowers, and its length tells the distance.",
    "soup.txt": "Chop an onion, two carrots and celery, soften them in olive oil, add lentils and stock, and "
    "simmer for half an hour. Season the soup with pepper and lemon.",
    "shards.md": "Each expert shard is a Ray Serve deployment on its own GPU. The router sends every shard the "
    "token rows routed to its experts and adds up the weighted results.",
}
BEES = "How do bees tell each other the direction of flowers?"
ADMIN, USER = "admin-key-1", "user-key-1"


class Recording:
    """An engine client that records the prompt ids it is sent, then passes the request on."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    def generate(self, prompt_ids, params, request_id=None):
        self.prompts.append(list(prompt_ids))
        return self.inner.generate(prompt_ids, params, request_id)


class NeverAnswers:
    """A retriever client whose searches hang (a Qdrant that accepts connections and never replies)."""

    async def retrieve(self, query, top_k, collection=None, sources=None):
        await asyncio.sleep(3600)

    async def ingest(self, documents, collection=None): ...

    async def delete(self, sources, collection=None): ...

    async def collections(self):
        return []


@pytest.fixture(scope="module")
def engine(demo_dir):
    llm = LLMEngine.from_pretrained(demo_dir, EngineConfig(kv_cache_mb=16))
    front = AsyncEngine(lambda: llm, name="rag-test")
    yield llm, front
    front.shutdown()


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def service(tmp_path, embedder):
    settings = RetrievalSettings(store_path=str(tmp_path / "qdrant"), collection="docs")
    service = RetrievalService(embedder, VectorStore(embedder.dim, path=settings.store_path), settings)
    client = AsyncRetrieval(service)
    yield service, client
    client.close()


def make_app(engine, retriever=None, *, timeout_s=10.0, sink=None, **kwargs):
    llm, front = engine
    recording = Recording(front)
    retrieval = None if retriever is None else Retrieval(retriever, "docs", timeout_s=timeout_s, metrics=sink)
    app = build_api(recording, llm.tokenizer, MODEL, max_model_len=llm.max_model_len, retrieval=retrieval, **kwargs)
    return app, recording


def http(app, key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers)


def call(app, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    async def main():
        async with http(app, key) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(main())


def ingest(app, docs: dict[str, str], **kwargs) -> httpx.Response:
    body = {"documents": [{"source": s, "text": t} for s, t in docs.items()]}
    return call(app, "POST", "/v1/documents", json=body, **kwargs)


def chat(content: str = BEES, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
            **fields}  # fmt: skip


def points(app) -> dict[str, int]:
    return {c["name"]: c["points"] for c in call(app, "GET", "/v1/collections").json()["data"]}


# -- the routes -------------------------------------------------------------------------------------


def test_retrieve_ranks_the_right_document_first_and_filters_by_source(engine, service):
    app, _ = make_app(engine, service[1])
    r = ingest(app, DOCS)
    assert r.status_code == 200, r.text
    assert r.json() == {**r.json(), "collection": "docs", "documents": 3, "chunks": 3, "stale_deleted": 0}
    r = call(app, "POST", "/v1/retrieve", json={"query": BEES, "top_k": 3})
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert [h["index"] for h in hits] == [1, 2, 3] and hits[0]["source"] == "bees.md"
    assert hits[0]["text"] == DOCS["bees.md"] and hits[0]["chunk"] == 0
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    only = call(app, "POST", "/v1/retrieve", json={"query": BEES, "filter": {"source": ["soup.txt", "shards.md"]}})
    assert {h["source"] for h in only.json()["data"]} == {"soup.txt", "shards.md"}


def test_ingest_is_idempotent_replaces_shorter_documents_and_deletes(engine, service):
    app, _ = make_app(engine, service[1])
    long_text = "\n\n".join(f"Paragraph {i} is about rivers, trains and mountain villages. " * 10 for i in range(6))
    first = ingest(app, {**DOCS, "long.md": long_text}).json()
    assert first["chunks"] > 4
    again = ingest(app, {**DOCS, "long.md": long_text}).json()
    assert again["chunks"] == first["chunks"] and points(app) == {"docs": first["chunks"]}  # nothing duplicated
    shorter = ingest(app, {"long.md": "Only one short paragraph now."}).json()
    assert shorter["stale_deleted"] == first["chunks"] - 3 - 1 and points(app) == {"docs": 4}
    r = call(app, "DELETE", "/v1/documents", params=[("source", "long.md"), ("source", "soup.txt")])
    assert r.status_code == 200 and r.json() == {"collection": "docs", "deleted": 2}
    hits = call(app, "POST", "/v1/retrieve", json={"query": "onion soup", "top_k": 5}).json()["data"]
    assert {h["source"] for h in hits} == {"bees.md", "shards.md"}
    missing = call(app, "DELETE", "/v1/documents", params={"source": "x.md", "collection": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "collection_not_found"


def test_ingest_into_a_named_collection_is_listed_with_counts(engine, service):
    app, _ = make_app(engine, service[1])
    ingest(app, DOCS)
    r = call(app, "POST", "/v1/documents", json={"collection": "recipes", "documents": [
        {"source": "soup.txt", "text": DOCS["soup.txt"]}]})  # fmt: skip
    assert r.status_code == 200 and r.json()["collection"] == "recipes"
    assert points(app) == {"docs": 3, "recipes": 1}
    hits = call(app, "POST", "/v1/retrieve", json={"query": BEES, "collection": "recipes"}).json()["data"]
    assert [h["source"] for h in hits] == ["soup.txt"]


# -- RAG in chat and completions ----------------------------------------------------------------------


def test_chat_prompt_is_the_template_applied_to_the_retrieved_passages(engine, service):
    svc, client = service
    app, recording = make_app(engine, client)
    ingest(app, DOCS)
    r = call(app, "POST", "/v1/chat/completions", json=chat(retrieval={"top_k": 2}))
    assert r.status_code == 200, r.text
    info = r.json()["retrieval"]
    passages = svc.retrieve(BEES, 2)  # what the store returns for the same question
    assert info["used"] and info["collection"] == "docs" and info["error"] is None
    assert [(s["source"], s["chunk"]) for s in info["sources"]] == [(p.source, p.chunk) for p in passages]
    messages = [{"role": "user", "content": BEES}]
    want = engine[0].tokenizer.apply_chat_template(fuse(messages, passages))
    assert recording.prompts[-1] == want
    text = engine[0].tokenizer.decode(want, skip_special_tokens=False)
    assert "[1] (source: bees.md)" in text and "waggle run" in text and INSTRUCTION in text


def test_completion_prompt_gets_the_sources_before_it_and_plain_requests_none(engine, service):
    svc, client = service
    app, recording = make_app(engine, client)
    ingest(app, DOCS)
    prompt = "Soup needs"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    r = call(app, "POST", "/v1/completions", json={**body, "retrieval": {"top_k": 1, "filter": {"source": "soup.txt"}}})
    assert r.status_code == 200, r.text
    assert [s["source"] for s in r.json()["retrieval"]["sources"]] == ["soup.txt"]
    assert recording.prompts[-1] == engine[0].tokenizer.encode(
        fuse(prompt, svc.retrieve(prompt, 1, sources=["soup.txt"]))
    )
    plain = call(app, "POST", "/v1/completions", json=body)
    assert "retrieval" not in plain.json() and recording.prompts[-1] == engine[0].tokenizer.encode(prompt)


def test_streams_send_the_sources_first(engine, service):
    app, _ = make_app(engine, service[1])
    ingest(app, DOCS)
    r = call(app, "POST", "/v1/chat/completions", json=chat(stream=True, retrieval={"top_k": 2}))
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    first, second = json.loads(events[0]), json.loads(events[1])
    assert first["choices"] == [] and first["retrieval"]["sources"][0]["source"] == "bees.md"
    assert second["choices"][0]["delta"] == {"role": "assistant", "content": ""} and "retrieval" not in second
    assert events[-1] == "[DONE]"

    async def with_openai():
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http(app), max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt=BEES, max_tokens=4, temperature=0, stream=True,
                                                 extra_body={"retrieval": {"top_k": 1}})  # fmt: skip
        return [chunk async for chunk in stream]

    chunks = asyncio.run(with_openai())
    assert chunks[0].choices == [] and chunks[0].model_extra["retrieval"]["sources"][0]["source"] == "bees.md"
    assert "".join(c.choices[0].text for c in chunks[1:]) and chunks[-1].choices[0].finish_reason == "length"


# -- failures -----------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nobody listens there


def test_unreachable_qdrant_is_503_or_an_answer_without_context(engine, embedder, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    store = VectorStore(embedder.dim, url=url, timeout_s=1)
    client = AsyncRetrieval(RetrievalService(embedder, store, RetrievalSettings(qdrant_url=url)))
    sink = MemorySink()
    app, recording = make_app(engine, client, sink=sink)
    r = call(app, "POST", "/v1/retrieve", json={"query": BEES})
    assert r.status_code == 503 and r.json()["error"]["code"] == "retrieval_unavailable", r.text
    assert url in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
    r = call(app, "POST", "/v1/chat/completions", json=chat(retrieval={"required": True}))
    assert r.status_code == 503 and r.json()["error"]["param"] == "retrieval"
    assert recording.prompts == []  # nothing reached the engine
    r = call(app, "POST", "/v1/chat/completions", json=chat(retrieval={"required": False}))
    assert r.status_code == 200, r.text
    info = r.json()["retrieval"]
    assert not info["used"] and info["sources"] == [] and url in info["error"]
    assert recording.prompts == [engine[0].tokenizer.apply_chat_template([{"role": "user", "content": BEES}])]
    assert call(app, "POST", "/v1/chat/completions", json=chat()).status_code == 200  # still serving
    reasons = [labels["reason"] for name, _, labels in sink.records if name == "moe_retrieval_errors_total"]
    assert reasons == ["unavailable"] * 3
    client.close()


def test_a_search_that_never_answers_times_out(engine):
    app, _ = make_app(engine, NeverAnswers(), timeout_s=0.5)
    start = time.monotonic()
    r = call(app, "POST", "/v1/retrieve", json={"query": BEES})
    assert r.status_code == 503 and "within 0.5 s" in r.json()["error"]["message"]
    streamed = call(app, "POST", "/v1/chat/completions", json=chat(stream=True, retrieval={}))
    first = json.loads(streamed.text.split("\n\n")[0].removeprefix("data: "))
    assert first["retrieval"]["used"] is False and "within 0.5 s" in first["retrieval"]["error"]
    assert time.monotonic() - start < 10


def test_bad_retrieval_input_is_a_4xx_that_names_it(engine, service):
    app, _ = make_app(engine, service[1])
    ingest(app, DOCS)
    cases = [
        ("/v1/retrieve", {"query": " "}, 400, "query"),
        ("/v1/retrieve", {"query": BEES, "top_k": 0}, 400, "top_k"),
        ("/v1/retrieve", {"query": BEES, "top_k": 21}, 400, "top_k"),
        ("/v1/retrieve", {"query": BEES, "collection": "nope"}, 404, "nope"),
        ("/v1/retrieve", {"query": BEES, "filter": {"path": "x"}}, 400, "filter.path"),
        ("/v1/chat/completions", chat(retrieval={"top_k": 2, "mode": "x"}), 400, "retrieval.mode"),
        ("/v1/chat/completions", chat(retrieval={"collection": "nope"}), 404, "nope"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2], "retrieval": {}}, 400, "text prompt"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": BEES, "echo": True, "logprobs": 1, "retrieval": {}},
            400,
            "prompt scoring",
        ),  # fmt: skip
        ("/v1/documents", {"documents": []}, 400, "documents"),
        ("/v1/documents", {"documents": [{"source": "a", "text": "x"}, {"source": "a", "text": "y"}]}, 400, "twice"),
    ]
    for path, body, status, words in cases:
        r = call(app, "POST", path, json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], (path, body, r.text)
    assert call(app, "DELETE", "/v1/documents").status_code == 400  # no source
    assert call(app, "POST", "/v1/retrieve", json={"query": BEES}).status_code == 200


def test_a_prompt_made_too_long_by_passages_says_so(engine, service):
    app, _ = make_app(engine, service[1])
    long_text = "\n\n".join(
        f"Bees dance number {i}: the waggle run points at flowers far away. " * 12 for i in range(40)
    )
    ingest(app, {"bees-long.md": long_text})
    r = call(app, "POST", "/v1/chat/completions", json=chat(retrieval={"top_k": 20}, max_tokens=None))
    assert r.status_code == 400 and "lower retrieval.top_k" in r.json()["error"]["message"], r.text


def test_retrieval_off_answers_404_and_400(engine):
    app, _ = make_app(engine)
    r = call(app, "POST", "/v1/retrieve", json={"query": BEES})
    assert r.status_code == 404 and "retrieval is not enabled" in r.json()["error"]["message"]
    r = call(app, "POST", "/v1/chat/completions", json=chat(retrieval={}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "retrieval"
    assert call(app, "POST", "/v1/chat/completions", json=chat()).status_code == 200


def test_writes_need_an_admin_key_reads_an_api_key(engine, service):
    app, _ = make_app(engine, service[1], api_keys=frozenset({USER}), admin_keys=frozenset({ADMIN}))
    assert ingest(app, DOCS).status_code == 401
    refused = ingest(app, DOCS, key=USER)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    assert call(app, "DELETE", "/v1/documents", key=USER, params={"source": "bees.md"}).status_code == 403
    assert ingest(app, DOCS, key=ADMIN).status_code == 200
    for key in (USER, ADMIN):
        assert call(app, "POST", "/v1/retrieve", key=key, json={"query": BEES}).status_code == 200
        assert call(app, "GET", "/v1/collections", key=key).status_code == 200


def test_searches_are_timed(engine, service):
    sink = MemorySink()
    app, _ = make_app(engine, service[1], sink=sink)
    ingest(app, DOCS)
    call(app, "POST", "/v1/retrieve", json={"query": BEES})
    call(app, "POST", "/v1/chat/completions", json=chat(retrieval={}))
    call(app, "POST", "/v1/chat/completions", json=chat())
    assert len(sink.values("moe_retrieval_seconds")) == 2 and all(
        0 < v < 30 for v in sink.values("moe_retrieval_seconds")
    )
