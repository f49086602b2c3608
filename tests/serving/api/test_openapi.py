"""/openapi.json tells the truth: schemathesis (every check, every operation) against a real HTTP server of the
app, and the document's own promises (no 422, OpenAI's error body, Retry-After, the Allow header).

The app is the real one (build_api, auth on, retrieval on) around fast fakes (tests/serving/api/fakes.py), so
a few hundred generated requests take seconds. What a schema cannot say is in schemathesis-baseline.json,
one entry per operation and finding, each with its reason.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serving.api.app import build_api
from serving.api.retrieval import Retrieval
from serving.tokenizer import Tokenizer
from tests.serving.api.fakes import FixedExpertLoad, MemoryRetriever, PlanningTarget, ScriptedEngine
from tests.serving.api.live_server import live_server

MODEL = "demo"
MAX_MODEL_LEN = 256
ADMIN_KEY, API_KEY = "admin-key", "api-key"
BASELINE = Path(__file__).with_name("schemathesis-baseline.json")
EXAMPLES = 40  # per operation and phase: ~15 s on 2 cores


def make_app(tokenizer_dir):
    tokenizer = Tokenizer(tokenizer_dir)
    engine = ScriptedEngine(tokenizer.vocab_size, MAX_MODEL_LEN)
    return build_api(
        engine, tokenizer, MODEL, max_model_len=MAX_MODEL_LEN, api_keys=frozenset({API_KEY}),
        admin_keys=frozenset({ADMIN_KEY}), retrieval=Retrieval(MemoryRetriever(), "docs"), max_body_bytes=1 << 16,
        expert_load=FixedExpertLoad(),
        rebalancer=PlanningTarget(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(tokenizer_dir):
    """The app on uvicorn at http://127.0.0.1:<free port>, in a thread of this process."""
    with live_server(make_app(tokenizer_dir)) as url:
        yield url


def test_schemathesis_finds_nothing_outside_the_baseline(server, tmp_path):
    st = Path(sys.executable).with_name("st")
    command = [
        str(st), "run", f"{server}/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", "1",
        "--workers", "1", "--header", f"Authorization: Bearer {ADMIN_KEY}", "--baseline", str(BASELINE),
        "--generation-database", "none",  # the same run wherever it runs: no examples kept from earlier runs
        "--report", "json", "--report-dir", str(tmp_path), "--no-color",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    [report] = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert report["operations"]["tested"] == report["operations"]["total"] == 10, "every operation"


def test_every_baseline_entry_says_why(server):
    entries = json.loads(BASELINE.read_text())["entries"]
    assert entries and all(len(e.get("reason", "")) > 20 for e in entries)


def get(server: str, path: str, key: str | None = ADMIN_KEY, method: str = "GET") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server}{path}", headers=headers, timeout=10)


def test_the_document_lists_the_errors_each_operation_gives(server):
    doc = get(server, "/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            assert "422" not in responses, f"{method} {path}: validation errors are 400s here"
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
            if path != "/healthz":
                assert "401" in responses and op["security"] == [{"bearer": []}], (method, path)
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert set(completions) == {"200", "400", "401", "404", "413", "429", "503"}
    assert "Retry-After" in completions["429"]["headers"] and "Retry-After" in completions["503"]["headers"]
    assert "text/event-stream" in completions["200"]["content"]
    assert "403" in doc["paths"]["/v1/documents"]["delete"]["responses"]
    admin = doc["paths"]["/v1/admin/expert-load"]["get"]["responses"]
    assert set(admin) == {"200", "401", "403", "404", "503"} and "Retry-After" in admin["503"]["headers"]
    request = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == [MODEL]
    assert {"type": "integer", "minimum": 0, "maximum": MAX_MODEL_LEN - 1} in request["max_tokens"]["anyOf"]


def test_allow_lists_every_method_of_the_path(server):
    r = get(server, "/v1/documents")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, POST"
    assert "use DELETE, POST" in r.json()["error"]["message"]


def test_schema_types_are_strict_but_integral_floats_are_ints(server):
    async def main():
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=server, headers=headers, timeout=10) as client:
            body = {"model": MODEL, "prompt": "Hi"}
            return [
                await client.post("/v1/completions", json={**body, "max_tokens": "3"}),
                await client.post("/v1/completions", json={**body, "echo": 1}),
                await client.post("/v1/completions", json={**body, "max_tokens": 2.0, "prompt": [1.0, 2]}),
            ]

    as_string, as_number, integral = asyncio.run(main())
    assert as_string.status_code == 400 and "max_tokens" in as_string.json()["error"]["message"]
    assert as_number.status_code == 400 and "echo" in as_number.json()["error"]["message"]
    assert integral.status_code == 200, integral.text
