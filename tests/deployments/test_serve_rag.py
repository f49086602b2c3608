"""RAG on a real Ray cluster: the Retriever deployment with the embedded Qdrant store, ingest on first
start, the openai client with the `retrieval` extension (whole and streamed), `moe-serve ingest --url`,
a restart that keeps the store, a Retriever replica killed, and a Qdrant server that is down."""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from ray import serve

from deployments.app import build_app
from deployments.faults import kill_replica
from deployments.local_cluster import wait_ready
from tests.polling import poll

MODEL = "demo"
_names = itertools.count()
SEED_DOCS = {
    "bees.md": "# Bees\n\nA forager bee dances a figure of eight; the angle of the waggle run tells the other bees "
    "the direction of the flowers.",
    "soup.txt": "Soften an onion and carrots in olive oil, add lentils and stock, and simmer the soup for an hour.",
}
BEES = "How do bees tell each other where flowers are?"


def deploy(serve_url: str, args: dict) -> tuple[str, str]:
    name = f"rag{next(_names)}"
    serve.run(build_app({"served_model_name": MODEL, "shards": 1, **args}), name=name, route_prefix=f"/{name}",
              blocking=False)  # fmt: skip
    url = f"{serve_url}/{name}"
    wait_ready(url, timeout_s=240)
    return url, name


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed") / "handbook"
    folder.mkdir()
    for name, text in SEED_DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def rag_args(demo_dir, seed, tmp_path_factory):
    store = tmp_path_factory.mktemp("qdrant")
    return {"model": str(demo_dir), "retrieval": {"store_path": str(store), "ingest_on_start": [str(seed)]}}


@pytest.fixture(scope="module")
def rag_app(serve_url, rag_args):
    url, name = deploy(serve_url, rag_args)
    yield url, name
    serve.delete(name)


def points(url: str) -> dict[str, int]:
    r = httpx.get(f"{url}/v1/collections", timeout=30)
    assert r.status_code == 200, r.text
    return {c["name"]: c["points"] for c in r.json()["data"]}


def test_first_start_ingests_the_configured_docs(rag_app):
    url, _ = rag_app
    assert points(url) == {"docs": 2}
    r = httpx.post(f"{url}/v1/retrieve", json={"query": BEES, "top_k": 2}, timeout=30)
    assert r.status_code == 200, r.text
    # sources are named relative to the folder holding the configured path
    assert [h["source"] for h in r.json()["data"]] == ["handbook/bees.md", "handbook/soup.txt"]


def test_openai_client_chat_with_retrieval_whole_and_streamed(rag_app):
    url, _ = rag_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": BEES}]
    extra = {"retrieval": {"top_k": 1, "collection": "docs", "required": True}}
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                           extra_body=extra)  # fmt: skip
    info = whole.model_extra["retrieval"]
    assert info["used"] and [s["source"] for s in info["sources"]] == ["handbook/bees.md"]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert whole.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the passage went into the prompt
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                 extra_body=extra, stream=True))  # fmt: skip
    assert chunks[0].choices == [] and chunks[0].model_extra["retrieval"] == info
    assert "".join(c.choices[0].delta.content or "" for c in chunks[1:]) == whole.choices[0].message.content


def test_ingest_command_sends_files_to_the_server_and_deletes_them(rag_app, tmp_path):
    url, _ = rag_app
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "trains.md").write_text("The night train to the mountains leaves at nine from platform four.")
    (notes / "image.png").write_bytes(b"\x89PNG")
    cmd = [sys.executable, "-m", "deployments.cli", "ingest", str(notes), "--url", url, "--collection", "travel"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 files, 1 chunks" in done.stdout and "image.png" in done.stdout
    assert points(url)["travel"] == 1
    r = httpx.post(f"{url}/v1/retrieve", json={"query": "when does the train leave?", "collection": "travel"})
    assert r.json()["data"][0]["source"] == "notes/trains.md"
    done = subprocess.run(cmd + ["--delete"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "deleted 1 chunks" in done.stdout, done.stderr
    assert points(url)["travel"] == 0


def test_a_killed_retriever_gives_503_or_an_answer_without_context_then_comes_back(rag_app):
    url, name = rag_app
    body = {"model": MODEL, "messages": [{"role": "user", "content": BEES}], "max_tokens": 3}
    kill_replica(name, "Retriever")
    answers = {}
    for required in (True, False):  # right after the kill: the replica is dead or restarting
        started = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "retrieval": {"required": required}}, timeout=30)
        answers[required] = (r, time.monotonic() - started)
    (required, took), (optional, took_optional) = answers[True], answers[False]
    assert required.status_code in (200, 503), required.text  # 200 only if Serve restarted it that fast
    if required.status_code == 503:
        assert required.json()["error"]["code"] == "retrieval_unavailable" and required.headers["retry-after"] == "1"
    assert optional.status_code == 200, optional.text
    info = optional.json()["retrieval"]
    assert info["used"] is True or (info["used"] is False and info["error"]), info
    assert max(took, took_optional) < 10  # bounded by retrieval.timeout_s (2 s), never a hang
    assert asyncio.run(poll(lambda: _retrieves(url), timeout=120)), "the Retriever did not come back"


def _retrieves(url: str) -> bool:
    r = httpx.post(f"{url}/v1/retrieve", json={"query": BEES, "top_k": 1}, timeout=30)
    return r.status_code == 200 and bool(r.json()["data"])


def test_a_restart_keeps_the_store_and_does_not_ingest_again(serve_url, rag_app, rag_args, seed):
    url, name = rag_app
    added = {"documents": [{"source": "added.md", "text": "Added over HTTP before the restart."}]}
    assert httpx.post(f"{url}/v1/documents", json=added, timeout=60).status_code == 200
    before = points(url)
    (seed / "bees.md").write_text("Changed after the first start: a second start must not ingest this.")
    serve.delete(name)  # the Retriever closes the store; the next one opens the same folder
    url, name = deploy(serve_url, rag_args)
    try:
        assert points(url) == before
        hits = httpx.post(f"{url}/v1/retrieve", json={"query": BEES, "top_k": 3}, timeout=30).json()["data"]
        texts = {h["source"]: h["text"] for h in hits}
        assert texts["handbook/bees.md"] == SEED_DOCS["bees.md"] and "added.md" in texts
    finally:
        serve.delete(name)


def test_a_qdrant_server_that_is_down_gives_503_or_an_answer_without_context(serve_url, demo_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    url, name = deploy(serve_url, {"model": str(demo_dir), "retrieval": {"qdrant_url": down, "timeout_s": 3}})
    try:
        r = httpx.post(f"{url}/v1/retrieve", json={"query": BEES}, timeout=30)
        assert r.status_code == 503 and down in r.json()["error"]["message"], r.text
        body = {"model": MODEL, "messages": [{"role": "user", "content": BEES}], "max_tokens": 3}
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "retrieval": {"required": True}}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "retrieval_unavailable"
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "retrieval": {}}, timeout=30)
        assert (
            r.status_code == 200 and r.json()["retrieval"]["used"] is False and down in r.json()["retrieval"]["error"]
        )
    finally:
        serve.delete(name)
