"""Real faults under real load: SIGKILL a Router or ExpertShard replica process while clients stream,
and count what the clients saw (README, "Failures").

- one of 2 routers killed: its streams move to the other router; 0 failed, greedy text unchanged;
- one of 2 replicas of a shard killed: its calls are retried on the other; 0 failed, text unchanged;
- the only replica of a shard killed: requests hold until Serve restarts it, then finish unchanged;
- the only router killed: requests get 503 with Retry-After within failover.router_wait_s, never a 500
  or a hang, and the app serves again once Serve has restarted it.

First, before any fault (the 2-router app is here already): GET /v1/admin/expert-load adds up both routers'
windows, and `moe-serve rebalance --url --save` writes it; with a router killed it adds up the live one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field

import httpx
import pytest
from ray import serve

from benchmarks.resilience import SCENARIOS, analyse, run_scenario
from deployments.cli import main
from deployments.faults import kill_replica, replica_pids
from deployments.local_cluster import deploy_app
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import SamplingParams
from serving.expert_load import ROUTE, ExpertLoad
from serving.tokenizer import Tokenizer
from tests.polling import poll

PROMPTS = [f"Request {i} asks where the experts live" for i in range(6)]
MAX_TOKENS = 24
_names = itertools.count()


@dataclass
class Outcome:
    prompt: str
    status: int = 0
    text: str = ""
    error: str | None = None
    gaps: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str) -> Outcome:
    body = {"model": "demo", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    outcome, last = Outcome(prompt), None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        outcome.status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                outcome.error = event["error"]["message"]
                continue
            now = time.monotonic()
            if last is not None:
                outcome.gaps.append(now - last)
            last = now
            outcome.text += event["choices"][0]["text"]
    return outcome


def run_load(url: str, users: int, seconds: float, fault_at: float, fault) -> list[Outcome]:
    """`users` clients stream back to back; `fault()` runs (in a thread) at `fault_at`, and the load goes on
    for `seconds - fault_at` after it returns (finding the replica to kill may take seconds on a busy machine:
    the load must still be running when the fault lands)."""
    stop = {"at": float("inf")}

    async def user(client, i):
        outcomes = []
        for n in itertools.count():
            if time.monotonic() >= stop["at"]:
                return outcomes
            outcomes.append(await stream_one(client, url, PROMPTS[(i + n) % len(PROMPTS)]))

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            users_done = asyncio.gather(*(user(client, i) for i in range(users)))
            await asyncio.sleep(fault_at)
            await asyncio.to_thread(fault)
            stop["at"] = time.monotonic() + seconds - fault_at
            return [o for outcomes in await users_done for o in outcomes]

    return asyncio.run(main())


def deploy(serve_url: str, args: dict) -> tuple[str, str]:
    name = f"faults{next(_names)}"
    return deploy_app(serve_url, name, {"served_model_name": "demo", **args}, timeout_s=240), name


@pytest.fixture(scope="module")
def greedy_texts(demo_dir) -> dict[str, str]:
    """What each prompt gives undisturbed: the in-process engine's greedy text."""
    engine = LLMEngine.from_pretrained(demo_dir)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    results = engine.generate_batch([engine.tokenizer.encode(p) for p in PROMPTS], params)
    return {p: r.text for p, r in zip(PROMPTS, results, strict=True)}


@pytest.fixture(scope="module")
def redundant_app(serve_url, demo_dir):
    """2 routers and 2 replicas of each of 2 shards: every replica has a twin."""
    url, name = deploy(serve_url, {"model": str(demo_dir), "shards": 2, "routers": 2, "shard_replicas": 2})
    yield url, name
    serve.delete(name)


def check_nothing_lost(outcomes: list[Outcome], greedy_texts: dict[str, str]) -> None:
    failed = [o for o in outcomes if not o.ok]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {[(o.status, o.error) for o in failed][:3]}"
    changed = [o.prompt for o in outcomes if o.text != greedy_texts[o.prompt]]
    assert not changed, f"{len(changed)} outputs differ from an undisturbed run, e.g. {changed[0]!r}"


def wait_replicas(app: str, deployment: str, count: int) -> None:
    assert asyncio.run(poll(lambda: len(replica_pids(app, deployment)) == count, timeout=120)), (
        f"{deployment} did not get back to {count} replicas"
    )


def expert_load(url: str) -> dict:
    r = httpx.get(f"{url}{ROUTE}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_expert_load_route_adds_up_both_routers_and_rebalance_saves_it(redundant_app, demo_dir, tmp_path):
    url, name = redundant_app
    before = expert_load(url)  # empty: this module runs this test first, before any load

    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            bodies = [{"model": "demo", "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
                      for p in PROMPTS + PROMPTS]  # fmt: skip
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    assert all(r.status_code == 200 for r in asyncio.run(send_all()))
    after = expert_load(url)
    # Each token that ran (the prompt's, and each generated one but the last) took top-2 experts per MoE layer.
    tokens = 2 * sum(len(Tokenizer(demo_dir).encode(p)) + 6 - 1 for p in PROMPTS)
    added = [sum(now) - sum(then) for now, then in zip(after["load"], before["load"], strict=True)]
    assert added == [tokens * 2, tokens * 2] and after["routers"] == 2 and after["layers"] == [0, 1]
    # ... the sum of the two routers' own windows, and both served some of the requests
    windows = serve.get_deployment_handle("Router", name).broadcast("expert_load").results(timeout_s=30)
    assert len(windows) == 2 and ExpertLoad.total(windows).load == tuple(map(tuple, after["load"]))
    assert all(sum(map(sum, w.load)) > 0 for w in windows), "Serve sent every request to one router"

    saved = tmp_path / "load.json"
    assert main(["rebalance", "--url", url, "--save", str(saved)]) == 0
    assert json.loads(saved.read_text())["load"] == after["load"]


@pytest.mark.parametrize("deployment", ["Router", "ExpertShard-0"])
def test_killing_one_of_two_replicas_under_load_loses_no_request(redundant_app, greedy_texts, deployment):
    """A dead router's streams move to the other router; a dead shard replica's calls are retried on its twin."""
    url, name = redundant_app
    killed = []
    fault = lambda: killed.append(kill_replica(name, deployment))  # noqa: E731
    outcomes = run_load(url, users=6, seconds=10, fault_at=2.0, fault=fault)
    assert killed and len(outcomes) >= 12
    check_nothing_lost(outcomes, greedy_texts)
    longest = max(g for o in outcomes for g in o.gaps)
    assert longest < 5.0, f"a stream stalled {longest:.1f} s (a migration or a retry takes well under 1 s)"
    if deployment == "Router":  # the dead router's window is gone; the live one's still answers
        assert 1 <= expert_load(url)["routers"] <= 2
    wait_replicas(name, deployment, 2)  # Serve restarts it; the next test starts whole


@pytest.mark.parametrize("scenario", ["router"])
def test_the_shortest_resilience_scenarios_lose_no_request_under_locust(redundant_app, scenario, tmp_path):
    """benchmarks/resilience.py's router scenario, shortened: locust, a kill, 0 failed. (The shard replica's
    kill under the same load is the test above; this one checks the benchmark's own path on the cluster.)"""
    url, name = redundant_app
    deployment = SCENARIOS[scenario].deployment
    result = run_scenario(url, name, SCENARIOS[scenario], tmp_path, users=4, duration_s=8, fault_at_s=3)
    row = analyse(result, window_s=5)
    # 0 failed, with the load spanning the fault: tokens streamed in the window after the kill (a count of
    # requests would measure the machine: 4 users finish 8-20 in 8 s here, fewer when it is busy)
    assert row["failed"] == 0 and row["requests"] >= 4 and row["itl_p99_window_s"] is not None, row
    assert result.replicas_back_s is not None, f"{deployment} did not get its replica back"
    wait_replicas(name, deployment, 2)


@pytest.fixture(scope="module")
def bare_app(serve_url, demo_dir):
    """One router and one replica of each shard: nothing redundant. Short router wait, long shard wait."""
    failover = {"router_wait_s": 2.0, "shard_wait_s": 90.0}
    url, name = deploy(serve_url, {"model": str(demo_dir), "shards": 2, "failover": failover})
    yield url, name
    serve.delete(name)


def test_killing_the_only_shard_replica_holds_requests_until_serve_restarts_it(bare_app, greedy_texts):
    url, name = bare_app
    # Exactly one live replica to kill: one that Serve is still replacing (a slow start on a busy machine)
    # would leave its twin serving, and nothing would wait.
    wait_replicas(name, "ExpertShard-1", 1)
    before = replica_pids(name, "ExpertShard-1")
    killed = []
    fault = lambda: killed.append(kill_replica(name, "ExpertShard-1"))  # noqa: E731
    outcomes = run_load(url, users=4, seconds=6, fault_at=1.5, fault=fault)
    check_nothing_lost(outcomes, greedy_texts)
    longest = max(g for o in outcomes for g in o.gaps)
    assert longest > 1.0, (
        f"no stream waited for the restart: {len(outcomes)} requests, longest gap {longest:.3f} s; "
        f"replicas before {before}, killed {killed}, now {replica_pids(name, 'ExpertShard-1')}"
    )


def test_with_no_router_up_requests_get_503_with_retry_after_then_service_returns(bare_app):
    url, name = bare_app
    wait_replicas(name, "ExpertShard-1", 1)
    kill_replica(name, "Router")
    body = {"model": "demo", "prompt": "anyone there?", "max_tokens": 4, "temperature": 0}
    answers = []
    start = time.monotonic()
    for _ in range(3):  # while Serve restarts the router
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        answers.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - t0))
        if r.status_code == 200:
            break
    unavailable = [a for a in answers if a[0] == 503]
    assert unavailable, f"no 503 while the only router was down: {answers}"
    assert all(status in (200, 503) for status, _, _ in answers), answers  # never a 500
    assert all(retry == "1" and took < 10 for _, retry, took in unavailable), answers
    assert time.monotonic() - start < 60
    deadline = time.monotonic() + 120
    while (r := httpx.post(f"{url}/v1/completions", json=body, timeout=60)).status_code == 503:
        assert time.monotonic() < deadline, "the router did not come back"
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
