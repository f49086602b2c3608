"""The OpenAI HTTP API in process (no Ray): a real engine on the demo checkpoint, called through httpx's
ASGI transport and through the official `openai` client, plus fake engine clients for failure paths."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing

import httpx
import openai
import pytest

from serving.api.app import build_api, load_api_keys
from serving.api.requests import MAX_STOP_STRINGS
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig, RequestOutput, SamplingParams
from tests.polling import poll

MODEL = "demo-mixtral"
PROMPT = "Experts live on"
CONFIG = EngineConfig(kv_cache_mb=16)
MAX_BODY = 64 * 1024
JSON_HEADERS = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def served(demo_dir):
    """(LLMEngine, AsyncEngine) shared by the module; the engine thread stops at teardown."""
    engine = LLMEngine.from_pretrained(demo_dir, CONFIG)
    front = AsyncEngine(lambda: engine, name="api-test")
    yield engine, front
    front.shutdown()


@pytest.fixture(scope="module")
def reference(demo_dir) -> LLMEngine:
    """A second engine on the same checkpoint, driven offline: what the API must reproduce."""
    return LLMEngine.from_pretrained(demo_dir, CONFIG)


@pytest.fixture(scope="module")
def app(served):
    engine, front = served
    return build_api(front, engine.tokenizer, MODEL, max_model_len=engine.max_model_len, max_body_bytes=MAX_BODY)


def run(coro):
    return asyncio.run(coro)


def http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def openai_client(app, api_key: str = "x") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=api_key, http_client=http(app), max_retries=0)


def sse_events(body: str) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    assert body.endswith("\n\n"), "every event ends with a blank line"
    return [line.removeprefix("data: ") for line in body.split("\n\n") if line]


async def post(app, path: str, body: dict, **kwargs) -> httpx.Response:
    async with http(app) as client:
        return await client.post(path, json=body, **kwargs)


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **fields}


def chat(content: str = "Which experts?", **fields) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
        **fields,
    }


# -- good requests ----------------------------------------------------------------------------------


def test_models_and_health(app, served):
    async def main():
        async with http(app) as client:
            return await client.get("/v1/models"), await client.get("/healthz")

    models, health = run(main())
    assert models.status_code == 200
    [card] = models.json()["data"]
    assert (card["id"], card["object"], card["max_model_len"]) == (MODEL, "model", served[0].max_model_len)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize("prompt_as", ["text", "ids", "list of one"])
def test_greedy_completion_is_the_engines_token_for_token(app, reference, prompt_as):
    ids = reference.tokenizer.encode(PROMPT)
    prompt = {"text": PROMPT, "ids": ids, "list of one": [PROMPT]}[prompt_as]
    [want] = reference.generate_batch([ids], SamplingParams(max_tokens=12, temperature=0))
    r = run(post(app, "/v1/completions", completion(prompt=prompt, max_tokens=12)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["system_fingerprint"] is None
    [choice] = body["choices"]
    assert (choice["text"], choice["finish_reason"]) == (want.text, want.finish_reason)
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(want.token_ids),
        "total_tokens": len(ids) + len(want.token_ids),
    }


def test_up_to_sixteen_stop_strings_end_text_as_the_engine_does(app, reference):
    """lm-evaluation-harness sends a task's `until` strings and the EOS string (HumanEval: 5 + 1), past OpenAI's 4."""
    ids = reference.tokenizer.encode(PROMPT)
    [free] = reference.generate_batch([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    cut = free.text[len(free.text) // 2 :].strip()[:2]  # a stop string the greedy text reaches halfway
    assert cut, f"the greedy text {free.text!r} has nothing to stop at"
    stop = [f"<never {i}>" for i in range(MAX_STOP_STRINGS - 1)] + [cut]
    [want] = reference.generate_batch(
        [ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=tuple(stop))
    )
    r = run(post(app, "/v1/completions", completion(max_tokens=12, ignore_eos=True, stop=stop)))
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert (choice["text"], choice["finish_reason"]) == (want.text, "stop")
    assert len(want.text) < len(free.text) and cut not in want.text, "the last of the 16 strings ended it"


def test_openai_client_completion_and_its_stream_agree(app, reference):
    [want] = reference.generate_batch([reference.tokenizer.encode(PROMPT)], SamplingParams(max_tokens=8, temperature=0))

    async def main():
        client = openai_client(app)
        whole = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        return whole, [chunk async for chunk in stream]

    whole, chunks = run(main())
    assert whole.choices[0].text == want.text
    assert whole.usage.completion_tokens == len(want.token_ids)
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert text_chunks[-1].choices[0].finish_reason == want.finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_openai_client_chat_and_its_stream_agree(app, reference):
    tok = reference.tokenizer
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": "Which experts?"}])
    [want] = reference.generate_batch([prompt_ids], SamplingParams(max_tokens=6, temperature=0))

    async def main():
        client = openai_client(app)
        messages = [{"role": "user", "content": "Which experts?"}]
        whole = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        return whole, [chunk async for chunk in stream]

    whole, chunks = run(main())
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].finish_reason == want.finish_reason
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), len(want.token_ids))
    first, *deltas, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == want.text
    assert deltas[-1].choices[0].finish_reason == want.finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_text_parts_are_joined_as_chat_content(app):
    parts = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    plain = run(post(app, "/v1/chat/completions", {**parts, "messages": [{"role": "user", "content": "Hi"}]}))
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    split = run(post(app, "/v1/chat/completions", {**parts, "messages": as_parts}))
    assert plain.status_code == split.status_code == 200
    assert plain.json()["choices"][0]["message"] == split.json()["choices"][0]["message"]


def test_raw_completion_stream_is_server_sent_events(app):
    r = run(post(app, "/v1/completions", completion(stream=True, echo=True)))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    *events, done = sse_events(r.text)
    assert done == "[DONE]"
    chunks = [json.loads(e) for e in events]
    assert chunks[0]["choices"][0]["text"] == PROMPT, "echo sends the prompt first"
    assert all(c["usage"] is None for c in chunks), "no usage chunk without include_usage"
    whole = run(post(app, "/v1/completions", completion(echo=True))).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert whole["choices"][0]["text"].startswith(PROMPT)


def test_completion_logprobs_have_openais_shape(app, reference):
    ids = reference.tokenizer.encode(PROMPT)
    [want] = reference.generate_batch([ids], SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True))
    body = run(post(app, "/v1/completions", completion(logprobs=2, ignore_eos=True))).json()
    lp = body["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert lp["token_logprobs"] == pytest.approx([e.logprob for e in want.logprobs])
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert 1 <= len(top) <= 3 and top[token] == pytest.approx(logprob), "the N best and the chosen token"
        assert max(top.values()) <= 0
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def test_echo_with_logprobs_scores_the_prompt_then_the_output(app, reference):
    ids = reference.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=2, prompt_logprobs=2, ignore_eos=True)
    [want] = reference.generate_batch([ids], params)
    r = run(post(app, "/v1/completions", completion(echo=True, logprobs=2, max_tokens=4, ignore_eos=True)))
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None, "nothing predicts the first token"
    assert lp["token_logprobs"][1:] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:] + want.logprobs])
    assert all(len(top) <= 3 for top in lp["top_logprobs"][1:]), "the 2 best and the token itself"
    assert choice["text"] == PROMPT + want.text == "".join(lp["tokens"])
    starts = [0]
    for token in lp["tokens"][:-1]:
        starts.append(starts[-1] + len(token))
    assert lp["text_offset"] == starts, "each token starts where the previous one ended, from the prompt's start"
    assert "prompt_logprobs" not in choice, "the extension field only when asked for"


def test_max_tokens_zero_with_echo_scores_token_ids_without_generating(app, reference):
    """Scoring token ids without generating: echo, logprobs, max_tokens 0 (lm-eval 0.4 sends max_tokens 1 and
    drops the generated token: tests/serving/api/test_lm_eval.py)."""
    ids = reference.tokenizer.encode(PROMPT)
    [want] = reference.generate_batch([ids], SamplingParams(max_tokens=0, prompt_logprobs=1))

    async def main():
        client = openai_client(app)
        return await client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=0)

    result = run(main())
    [choice] = result.choices
    assert choice.text == reference.tokenizer.decode(ids) and choice.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), 0)
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:]])


def test_echo_logprobs_stream_like_the_whole_body(app):
    fields = completion(echo=True, logprobs=1, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    whole = run(post(app, "/v1/completions", fields)).json()["choices"][0]
    streamed = run(post(app, "/v1/completions", {**fields, "stream": True}))
    *events, done = sse_events(streamed.text)
    choices = [json.loads(e)["choices"][0] for e in events]
    assert choices[0]["text"] == PROMPT and choices[0]["logprobs"]["token_logprobs"][0] is None
    assert choices[0]["prompt_logprobs"] == whole["prompt_logprobs"], "on the first chunk with a choice"
    assert all("prompt_logprobs" not in c for c in choices[1:])
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in choices for v in c["logprobs"][key]] == whole["logprobs"][key], key
    assert "".join(c["text"] for c in choices) == whole["text"]


def test_prompt_logprobs_extension_has_vllms_shape(app, reference):
    ids = reference.tokenizer.encode(PROMPT)
    [want] = reference.generate_batch([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))
    r = run(post(app, "/v1/completions", completion(prompt=ids, max_tokens=0, prompt_logprobs=2)))
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["text"] == "" and choice["logprobs"] is None
    first, *rest = choice["prompt_logprobs"]
    assert first is None and len(rest) == len(ids) - 1
    for token_id, position, entry in zip(ids[1:], rest, want.prompt_logprobs[1:], strict=True):
        assert list(position)[0] == str(token_id), "the prompt's own token first, keyed by its id"
        assert position[str(token_id)]["logprob"] == pytest.approx(entry.logprob)
        assert position[str(token_id)]["rank"] == entry.rank
        assert {int(t) for t in position} == {token_id, *(t for t, _ in entry.top)}
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in position.values())


def test_chat_logprobs_have_openais_shape(app):
    async def main():
        return await openai_client(app).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body={"ignore_eos": True},
        )

    result = run(main())
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob, "the best alternative is at least as likely"
        if "\ufffd" not in entry.token:  # a token holding part of a character shows U+FFFD; bytes stay exact
            assert bytes(entry.bytes).decode() == entry.token


def test_chat_without_max_tokens_may_fill_the_context(served):
    engine, _ = served
    fake = RecordingClient()
    app = build_api(fake, engine.tokenizer, MODEL, max_model_len=100)
    r = run(post(app, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}))
    assert r.status_code == 200, r.text
    prompt_ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert fake.params.max_tokens == 100 - len(prompt_ids)


# -- bad requests -----------------------------------------------------------------------------------

LONG_TEXT = "experts " * 2100  # more tokens than the demo's 2048-token context
BAD_REQUESTS = [
    ("unknown field", "/v1/completions", completion(foo=1), 400, "foo: unknown"),
    ("n=2", "/v1/completions", completion(n=2), 400, "n: 2: only one choice"),
    ("bad type", "/v1/completions", completion(temperature="hot"), 400, "temperature:"),
    ("out of range", "/v1/completions", completion(top_p=0), 400, "top_p:"),
    ("penalty", "/v1/chat/completions", {**chat(), "presence_penalty": 0.5}, 400, "presence_penalty:"),
    ("two prompts", "/v1/completions", completion(prompt=["a", "b"]), 400, "prompt: 2 prompts"),
    ("17 stop strings", "/v1/completions", completion(stop=[str(i) for i in range(17)]), 400, "at most 16"),
    ("empty prompt", "/v1/completions", completion(prompt=[]), 400, "prompt: empty"),
    ("token id past vocab", "/v1/completions", completion(prompt=[10**6]), 400, "outside the vocabulary"),
    ("prompt too long", "/v1/completions", completion(prompt=LONG_TEXT), 400, "maximum context length"),
    ("chat prompt fills context", "/v1/chat/completions", {**chat(LONG_TEXT), "max_tokens": None}, 400, "fills"),
    ("max_tokens 0, nothing to score", "/v1/completions", completion(max_tokens=0), 400, "max_tokens: 0 only scores"),
    ("max_tokens 0, echo alone", "/v1/completions", completion(max_tokens=0, echo=True), 400, "max_tokens: 0 only"),
    ("negative max_tokens", "/v1/completions", completion(max_tokens=-1), 400, "max_tokens:"),
    ("prompt_logprobs past 20", "/v1/completions", completion(prompt_logprobs=21), 400, "prompt_logprobs:"),
    ("chat max_tokens 0", "/v1/chat/completions", {**chat(), "max_tokens": 0}, 400, "max_tokens:"),
    ("tool role", "/v1/chat/completions", {**chat(), "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    (
        "image part",
        "/v1/chat/completions",
        {**chat(), "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "image_url",
    ),
    ("top_logprobs alone", "/v1/chat/completions", {**chat(), "top_logprobs": 2}, 400, "top_logprobs: needs logprobs"),
    ("unknown model", "/v1/completions", completion(model="gpt-4"), 404, MODEL),
    ("unknown route", "/v1/embeddings", {"model": MODEL, "input": "x"}, 404, "no route"),
    ("big body", "/v1/completions", completion(prompt="x" * MAX_BODY), 413, "max_body_bytes"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "says"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_its_status_and_the_next_request_succeeds(app, path, body, status, says):
    bad = run(post(app, path, body))
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says in error["message"]
    good = run(post(app, "/v1/completions", completion(max_tokens=2)))
    assert good.status_code == 200, good.text


def test_raw_body_errors(app):
    async def chunked_body() -> AsyncIterator[bytes]:  # no Content-Length: the size is counted as it arrives
        for _ in range(MAX_BODY // 1024 + 1):
            yield b" " * 1024

    async def main():
        async with http(app) as client:
            return (
                await client.post(
                    "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}
                ),
                await client.post("/v1/completions", content=b""),
                await client.post("/v1/completions", content=json.dumps(completion()).encode()),  # no Content-Type
                await client.post("/v1/completions", content=chunked_body()),
                await client.get("/v1/completions"),
                await client.post("/v1/completions", json=completion(max_tokens=2)),
            )

    bad_json, empty, untyped, chunked, wrong_method, good = run(main())
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert empty.status_code == 400 and "request body" in empty.json()["error"]["message"]
    assert untyped.status_code == 400 and "Content-Type: application/json" in untyped.json()["error"]["message"]
    assert chunked.status_code == 413
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert good.status_code == 200


def test_overloaded_engine_answers_429_with_retry_after(demo_dir):
    engine = LLMEngine.from_pretrained(demo_dir, CONFIG.model_copy(update={"max_waiting": 0}))
    front = AsyncEngine(lambda: engine, name="api-test-full")
    try:
        app = build_api(front, engine.tokenizer, MODEL, max_model_len=engine.max_model_len)
        for _ in range(2):  # refused, and the app keeps answering
            r = run(post(app, "/v1/completions", completion()))
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "engine_overloaded"
        assert run(post(app, "/v1/chat/completions", {**chat(), "stream": True})).status_code == 429
    finally:
        front.shutdown()


def test_api_keys(served):
    engine, front = served
    app = build_api(front, engine.tokenizer, MODEL, max_model_len=engine.max_model_len, api_keys=frozenset({"k1"}))

    async def main():
        async with http(app) as client:
            missing = await client.get("/v1/models")
            wrong = await client.get("/v1/models", headers={"Authorization": "Bearer k2"})
            health = await client.get("/healthz")
        with pytest.raises(openai.AuthenticationError):
            await openai_client(app, api_key="k2").models.list()
        good = await openai_client(app, api_key="k1").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        return missing, wrong, health, good

    missing, wrong, health, good = run(main())
    assert missing.status_code == wrong.status_code == 401
    assert "missing API key" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert health.status_code == 200
    assert good.usage.completion_tokens >= 1


def test_load_api_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_SERVE_API_KEYS", raising=False)
    assert load_api_keys() == frozenset(), "no keys configured: no default key"
    monkeypatch.setenv("MOE_SERVE_API_KEYS", " a, b ,,")
    keys = tmp_path / "keys"
    keys.write_text("# comment\nc\n\n  d  \n")
    assert load_api_keys(file=str(keys)) == {"a", "b", "c", "d"}


# -- failures and disconnects -----------------------------------------------------------------------


class RecordingClient:
    """A fake engine client: one finished output; records the params, or fails as told."""

    def __init__(self, fail_before: Exception | None = None, fail_after: Exception | None = None):
        self.params: SamplingParams | None = None
        self.fail_before, self.fail_after = fail_before, fail_after

    async def generate(self, prompt_ids, params, request_id=None) -> AsyncIterator[RequestOutput]:
        self.params = params
        if self.fail_before:
            raise self.fail_before
        done = self.fail_after is None
        yield RequestOutput(request_id, [5], "five", [], done, "length" if done else None, len(prompt_ids), 1)
        if self.fail_after:
            raise self.fail_after


def test_engine_failures_become_openai_errors(served):
    engine, _ = served
    before = build_api(RecordingClient(fail_before=RuntimeError("boom")), engine.tokenizer, MODEL, max_model_len=99)
    after = build_api(RecordingClient(fail_after=RuntimeError("boom")), engine.tokenizer, MODEL, max_model_len=99)
    r = run(post(before, "/v1/completions", completion()))
    assert r.status_code == 500 and "boom" not in r.text, "a generic message; the details go to the log"
    assert r.json()["error"]["type"] == "server_error"
    assert run(post(before, "/v1/completions", completion(model="other"))).status_code == 404, "still serving"
    streamed = run(post(after, "/v1/chat/completions", {**chat(), "stream": True}))
    *events, error, done = sse_events(streamed.text)
    assert json.loads(events[-1])["choices"][0]["delta"] == {"content": "five"}
    assert json.loads(error)["error"]["type"] == "server_error" and done == "[DONE]"


class CountingClient:
    """Wraps an engine client and counts the outputs the API pulled from it."""

    def __init__(self, inner):
        self.inner, self.outputs = inner, 0

    async def generate(self, prompt_ids, params, request_id=None) -> AsyncIterator[RequestOutput]:
        async with aclosing(self.inner.generate(prompt_ids, params, request_id)) as outputs:
            async for out in outputs:
                self.outputs += 1
                yield out


@pytest.mark.parametrize(
    ("stream", "spec"),
    [(True, "2.0"), (True, "2.4"), (False, "2.0")],
    ids=["stream, disconnect event", "stream, failed send (ASGI 2.4)", "not streamed"],
)
def test_client_disconnect_aborts_the_engine_request(served, stream, spec, caplog):
    engine, front = served
    client = CountingClient(front)
    app = build_api(client, engine.tokenizer, MODEL, max_model_len=engine.max_model_len)
    free = engine.allocator.num_free
    body = json.dumps(completion(max_tokens=1000, ignore_eos=True, stream=stream)).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "server": ("test", 80),
        "client": ("client", 1),
    }
    sent: list[dict] = []

    async def main() -> bool:
        first_chunk = asyncio.Event()
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive():
            if (message := next(messages, None)) is not None:
                return message
            if stream:
                await first_chunk.wait()  # streaming: leave after the first event
            return {"type": "http.disconnect"}  # not streaming: leave as soon as the request is sent

        async def send(message):
            if message["type"] == "http.response.body" and first_chunk.is_set() and spec == "2.4":
                raise OSError("connection closed")  # how ASGI 2.4 servers report a gone client
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_chunk.set()

        await app(scope, receive, send)
        return await poll(lambda: not engine.has_unfinished() and engine.allocator.num_free == free)

    assert run(main()), "the engine request still holds the cache after the client left"
    assert client.outputs < 100, f"{client.outputs} outputs: the request ran on after the client left"
    if not stream:
        assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a client leaving is not an error"


def test_validation_error_names_every_bad_field(app):
    r = run(post(app, "/v1/chat/completions", {**chat(), "temperature": 3, "messages": [{"role": "bot"}]}))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "temperature", "the first bad field"
    for field in ("temperature", "messages[0].role", "messages[0].content"):
        assert f"{field}:" in error["message"]
