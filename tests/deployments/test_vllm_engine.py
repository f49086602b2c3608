"""engine: vllm against engine: native on the session cluster, over HTTP: the same demo checkpoint in
float32 gives the same greedy tokens and text, streamed or not, with the same stop strings, max_tokens,
logprobs and refusals. Skipped only where vLLM is not installed (`make test` installs it)."""

from __future__ import annotations

import importlib.util
import json
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from deployments.app import build_app
from deployments.local_cluster import wait_ready

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (`make install-vllm`; `make test` does it)"
)

MODEL = "demo"
ENGINE_CONFIG = {"dtype": "float32", "max_model_len": 512}  # the same limits for both engines
COMPLETIONS = ["Experts live on", "The router sends each shard", "Hello", "a b c d e f g"]
CHATS = [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Where do experts live?"}]]  # fmt: skip


@pytest.fixture(scope="module")
def urls(serve_url, demo_dir):
    """{"native": url, "vllm": url}: the demo checkpoint behind each engine, each under its own prefix."""
    apps = {
        "native": {"shards": 2},
        "vllm": {"engine": "vllm", "vllm": {"enforce_eager": True}, "router_resources": {"num_cpus": 0.5}},
    }
    for name, args in apps.items():
        args = {"model": str(demo_dir), "served_model_name": MODEL, "engine_config": ENGINE_CONFIG, **args}
        serve.run(build_app(args), name=f"eng-{name}", route_prefix=f"/eng-{name}", blocking=False)
    urls = {name: f"{serve_url}/eng-{name}" for name in apps}
    for url in urls.values():
        wait_ready(url, timeout_s=300)
    yield urls
    for name in apps:
        serve.delete(f"eng-{name}")


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}", json={"model": MODEL, **body}, timeout=120)


def both(urls: dict[str, str], route: str, body: dict) -> tuple[httpx.Response, httpx.Response]:
    return post(urls["native"], route, body), post(urls["vllm"], route, body)


def answer(response: httpx.Response) -> tuple:
    """What must match between engines: status, and text, finish reason and usage (or the error)."""
    body = response.json()
    if response.status_code != 200:
        return response.status_code, body["error"]["message"]
    [choice] = body["choices"]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return 200, text, choice["finish_reason"], body["usage"]


def test_greedy_completions_and_chat_are_identical(urls):
    for prompt in COMPLETIONS:
        native, vllm = both(urls, "completions", {"prompt": prompt, "max_tokens": 32, "temperature": 0})
        assert answer(native) == answer(vllm), prompt
        assert native.json()["usage"]["completion_tokens"] > 0
    for messages in CHATS:
        native, vllm = both(urls, "chat/completions", {"messages": messages, "max_tokens": 32, "temperature": 0})
        assert answer(native) == answer(vllm), messages


def test_ignore_eos_runs_to_max_tokens_with_the_same_tokens(urls):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    native, vllm = both(urls, "completions", body)
    assert answer(native) == answer(vllm)
    assert native.json()["usage"]["completion_tokens"] == 48


def stream_text(url: str, route: str, body: dict) -> tuple[str, str, int]:
    """(text, finish_reason, chunks with text) of a streamed request."""
    text, finish, chunks = "", None, 0
    body = {"model": MODEL, **body, "stream": True}
    with httpx.stream("POST", f"{url}/v1/{route}", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            [choice] = json.loads(line[6:])["choices"]
            delta = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            text, chunks = text + delta, chunks + bool(delta)
            finish = choice.get("finish_reason") or finish
    return text, finish, chunks


def test_streams_carry_the_same_text_as_whole_responses(urls):
    for route, body in [
        ("completions", {"prompt": "Experts live on", "max_tokens": 24, "temperature": 0}),
        ("chat/completions", {"messages": CHATS[1], "max_tokens": 24, "temperature": 0}),
    ]:
        whole = answer(post(urls["native"], route, body))
        for engine, url in urls.items():
            text, finish, chunks = stream_text(url, route, body)
            assert (text, finish) == whole[1:3], engine
            assert chunks > 1, f"{engine} sent the text in one chunk"


def test_stop_strings_cut_the_text_the_same_way(urls):
    body = {"prompt": "The router sends each shard", "max_tokens": 32, "temperature": 0}
    full = answer(post(urls["native"], "completions", body))[1]
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters from the middle of the greedy text
    assert stop.strip(), full
    native, vllm = both(urls, "completions", {**body, "stop": [stop, "never-generated"]})
    assert answer(native) == answer(vllm)
    assert native.json()["choices"][0]["finish_reason"] == "stop"
    assert native.json()["choices"][0]["text"] == full[: full.index(stop)]
    streamed = [stream_text(url, "completions", {**body, "stop": stop})[:2] for url in urls.values()]
    assert streamed == [(full[: full.index(stop)], "stop")] * 2


def test_max_tokens_ends_with_length(urls):
    for max_tokens in (1, 5):
        native, vllm = both(urls, "completions", {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
                                                  "ignore_eos": True})  # fmt: skip
        assert answer(native) == answer(vllm)
        assert native.json()["usage"]["completion_tokens"] == max_tokens
        assert native.json()["choices"][0]["finish_reason"] == "length"


def test_logprobs_agree(urls):
    native, vllm = both(urls, "chat/completions", {"messages": CHATS[0], "max_tokens": 8, "temperature": 0,
                                                   "logprobs": True, "top_logprobs": 3})  # fmt: skip
    a, b = (r.json()["choices"][0]["logprobs"]["content"] for r in (native, vllm))
    assert [t["token"] for t in a] == [t["token"] for t in b]
    for x, y in zip(a, b, strict=True):
        assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
        assert [t["logprob"] for t in x["top_logprobs"]] == pytest.approx([t["logprob"] for t in y["top_logprobs"]],
                                                                          abs=1e-4)  # fmt: skip


@pytest.mark.parametrize("max_tokens", [0, 2], ids=["scoring only", "with generation"])
def test_echo_prompt_logprobs_agree_across_ray_serve(urls, max_tokens):
    """What lm-evaluation-harness sends: the prompt's logprobs cross Serve from each engine's replica."""
    body = {"prompt": "Experts live on every shard", "echo": True, "logprobs": 2, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "prompt_logprobs": 1}  # fmt: skip
    native, vllm = both(urls, "completions", body)
    assert native.status_code == vllm.status_code == 200, (native.text, vllm.text)
    a, b = (r.json()["choices"][0] for r in (native, vllm))
    assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
    assert a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"]
    assert a["logprobs"]["token_logprobs"][0] is None and b["logprobs"]["token_logprobs"][0] is None
    assert a["logprobs"]["token_logprobs"][1:] == pytest.approx(b["logprobs"]["token_logprobs"][1:], abs=1e-4)
    for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:], strict=True):
        assert list(x) == list(y) and [v["rank"] for v in x.values()] == [v["rank"] for v in y.values()]
    assert native.json()["usage"] == vllm.json()["usage"]


@pytest.mark.parametrize(
    "route, body, status",
    [
        ("completions", {"prompt": [7] * 600, "max_tokens": 4}, 400),  # longer than max_model_len=512
        ("completions", {"prompt": [7] * 500, "max_tokens": 20}, 400),  # prompt + max_tokens too long
        ("completions", {"prompt": [5000], "max_tokens": 4}, 400),  # outside the vocabulary
        ("completions", {"prompt": "Hi", "temperature": 3}, 400),
        ("completions", {"prompt": "Hi", "model": "other"}, 404),
        ("chat/completions", {"messages": [{"role": "user", "content": "x " * 600}]}, 400),  # fills the context
    ],
)
def test_bad_requests_get_the_same_errors(urls, route, body, status):
    native, vllm = both(urls, route, body)
    assert answer(native) == answer(vllm)
    assert native.status_code == status


def test_openai_client_streams_from_vllm(urls):
    client = openai.OpenAI(base_url=f"{urls['vllm']}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.list().data[0].model_extra.get("max_model_len") == 512
    chunks = client.completions.create(model=MODEL, prompt="Experts live on", max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == answer(post(urls["native"], "completions", {"prompt": "Experts live on", "max_tokens": 8,
                                                                "temperature": 0}))[1]  # fmt: skip


def test_expert_load_is_the_native_engines_and_vllm_says_so(urls):
    native = httpx.get(f"{urls['native']}/v1/admin/expert-load", timeout=30)
    assert native.status_code == 200 and native.json()["routers"] == 1
    vllm = httpx.get(f"{urls['vllm']}/v1/admin/expert-load", timeout=30)
    assert vllm.status_code == 404 and vllm.json()["error"]["code"] == "expert_load_unavailable"


def test_engine_metrics_reach_rays_metrics_port(urls, ray_metrics_port):
    """The vLLM replica's stat logger records the moe_ engine gauges, labelled with its replica id."""
    [replica] = [a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::eng-vllm#VLLMEngine#")]  # fmt: skip
    post(urls["vllm"], "completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    wanted = ("ray_moe_requests_running", "ray_moe_requests_waiting", "ray_moe_kv_cache_usage_ratio")
    deadline, missing = time.monotonic() + 30, wanted
    while missing and time.monotonic() < deadline:
        page = httpx.get(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=10).text
        lines = [line for line in page.splitlines() if f'replica="{replica}"' in line]
        missing = [name for name in wanted if not any(line.startswith(name + "{") for line in lines)]
        time.sleep(0.5)
    assert not missing
