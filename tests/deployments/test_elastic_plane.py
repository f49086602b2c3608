"""The elastic expert plane on the session's cluster, one skewed demo app for both halves:
- per-shard autoscaling (deployments/autoscaling.py): the policy and the rate it reads, without Ray; then the
  hot shard gains a replica under load, the cold one does not, the router's calls reach both replicas of the
  hot shard, and the hot shard scales back once idle;
- online rebalancing (deployments/rebalancer.py): POST /v1/admin/rebalance under streaming load deploys a
  plan with replicated experts as a rolling update; no client sees a failure or a changed token.
The automatic trigger's decisions are tested without a cluster (test_rebalancer.py)."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import httpx
import pytest
from ray import serve
from ray.serve._private.common import ReplicaState

from deployments.autoscaling import EXPERT_ROWS_PER_S, ExpertRowsPolicy, RowRate
from deployments.local_cluster import deploy_app
from serving.demo import CORPUS, make_demo
from serving.model.config import ModelConfig
from serving.router_skew import rank_orders
from tests.polling import poll, wait_until


def context(rates: dict[str, float] | None, current: int = 1) -> SimpleNamespace:
    """The fields of Serve's AutoscalingContext that the policy reads."""
    metrics = None if rates is None else {EXPERT_ROWS_PER_S: rates}
    return SimpleNamespace(aggregated_metrics=metrics, target_num_replicas=current)


def test_policy_asks_for_the_replicas_the_shards_rows_need():
    policy = ExpertRowsPolicy(target_expert_rows_per_s=100)
    assert policy(context({"a": 250.0}))[0] == 3  # ceil(250 / 100)
    assert policy(context({"a": 60.0, "b": 70.0}, current=2))[0] == 2  # the replicas' rates add up
    assert policy(context({"a": 0.0, "b": 0.0}, current=2))[0] == 1  # idle: Serve's min_replicas bounds it
    assert policy(context(None, current=2))[0] == 2  # nothing reported yet: keep the current target
    assert policy(context({}, current=3))[0] == 3


def test_row_rate_is_rows_per_second_since_the_last_ask():
    now = [10.0]
    rate = RowRate(clock=lambda: now[0])
    rate.add(30)
    rate.add(20)
    now[0] = 12.0
    assert rate.rate() == 25.0
    now[0] = 13.0
    assert rate.rate() == 0.0 and rate.total == 50


def skewed_demo(folder) -> dict:
    """App args of the skewed Mixtral demo on 2 shards: in each MoE layer the 6 hottest experts on shard 0 and
    the 2 coldest on shard 1, so shard 0 computes ~7x the expert rows (measured: deployments/autoscaling.py)."""
    demo = make_demo(folder / "demo-skewed", "mixtral", router_skew="zipf:1.43", progress=False)
    model = ModelConfig.from_pretrained(demo)
    orders = rank_orders(model.num_experts, len(model.moe_layer_ids), seed=0)  # make_demo's default seed
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"placement": [[sorted(order[:6]), sorted(order[6:])] for order in orders]}))
    return {"model": str(demo), "served_model_name": "demo", "shards": 2, "placement": "file",
            "placement_file": str(plan)}  # fmt: skip


def running(app: str, deployment: str) -> int:
    return serve.status().applications[app].deployments[deployment].replica_states.get(ReplicaState.RUNNING, 0)


async def rows_by_replica(handle, calls: int = 8) -> dict[str, int]:
    """{replica tag: expert rows it computed} of the replicas that `calls` info() calls reached."""
    return {i["replica"]: i["expert_rows"] for i in await asyncio.gather(*(handle.info.remote() for _ in range(calls)))}


# 4 users, each starting a request every second (or at once when the last took longer): at most ~4 requests/s
# of ~30 tokens. Paced, not closed-loop, so the rows per second are set by the load, not by the machine's speed,
# as long as the machine keeps the pace: then the hot shard computes ~520 rows/s and the cold one ~100 (measured
# 2026-12-06; an older, slower engine kept only part of the pace and saw ~230 and ~30). TARGET sits between
# them with room both ways: the hot shard passes it from ~31% of the pace, and the cold one would need ~1.6x
# the pace, more than 4 paced users can send in a 2 s look-back (a late request and the next one: 1.5x).
USERS, PACE_S, TARGET = 4, 1.0, 160.0


SCALING = {"min_replicas": 1, "max_replicas": 2, "target_expert_rows_per_s": TARGET, "upscale_delay_s": 1,
           "downscale_delay_s": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5}  # fmt: skip
APP = "elastic"


@pytest.fixture(scope="module")
def skewed_app(serve_url, tmp_path_factory):
    """The skewed demo on 2 shards, hot experts on shard 0, autoscaled shards; its URL."""
    args = {**skewed_demo(tmp_path_factory.mktemp("elastic")), "shard_autoscaling": SCALING}
    args["failover"] = {"router_drain_s": 3, "ingress_drain_s": 20}  # a rolling update here ends sooner
    yield deploy_app(serve_url, APP, args, timeout_s=240)
    serve.delete(APP)


def test_the_hot_shard_scales_up_under_load_and_back_down_the_cold_one_stays(skewed_app):
    url, name = skewed_app, APP
    words = CORPUS.read_text().split()  # text like what the gates' skew was fitted on
    cold_counts: list[int] = []

    async def user(client: httpx.AsyncClient, i: int, stop: asyncio.Event) -> None:
        loop, k = asyncio.get_running_loop(), 0
        while not stop.is_set():
            k, started = k + 1, loop.time()
            prompt = " ".join(words[(37 * i + 11 * k) % 500 :][:12])
            body = {"model": "demo", "prompt": prompt, "max_tokens": 16, "temperature": 0}
            r = await client.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
            try:  # the pace, ended early by stop
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, started + PACE_S - loop.time()))
            except TimeoutError:
                pass

    def hot_scaled_up() -> bool:
        cold_counts.append(running(name, "ExpertShard-1"))
        return running(name, "ExpertShard-0") == 2

    async def main() -> None:
        hot, cold = (serve.get_deployment_handle(f"ExpertShard-{i}", name) for i in (0, 1))
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as client:
            users = [asyncio.create_task(user(client, i, stop)) for i in range(USERS)]
            try:
                loop = asyncio.get_running_loop()
                started, before = loop.time(), await asyncio.gather(rows_by_replica(hot, 1), rows_by_replica(cold, 1))
                if not await poll(hot_scaled_up, timeout=90, interval=0.25):  # then each still has one replica
                    after = await asyncio.gather(rows_by_replica(hot, 1), rows_by_replica(cold, 1))
                    rates = [
                        (sum(a.values()) - sum(b.values())) / (loop.time() - started)
                        for b, a in zip(before, after, strict=True)
                    ]
                    raise AssertionError(f"the hot shard did not gain a replica; expert rows/s, hot and cold: {rates}")
                # The router's calls reach both replicas of the hot shard (each counts the rows it computed).
                seen: dict[str, int] = {}
                for _ in range(60):
                    seen |= {r: n for r, n in (await rows_by_replica(hot)).items() if n > 0}
                    if len(seen) == 2:
                        break
                    await asyncio.sleep(0.5)
                assert len(seen) == 2, f"only replica(s) {seen} of the hot shard computed rows"
                cold_counts.append(running(name, "ExpertShard-1"))
            finally:
                stop.set()
                await asyncio.gather(*users)
        assert set(cold_counts) == {1}, f"the cold shard's running replicas under load: {cold_counts}"
        idle = await poll(lambda: running(name, "ExpertShard-0") == 1, timeout=60, interval=0.25)
        assert idle, "the hot shard kept 2 replicas after the load stopped"

    asyncio.run(main())


REBALANCE_PROMPTS = ["Experts live on", "The router sends each shard", "Hello there", "A sparse layer"]


def stream_completion(url: str, prompt: str) -> tuple[int, str, str | None]:
    """(status, text, finish_reason) of a streamed greedy completion: streamed, so a rolling update can land
    in the middle of one."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True, "ignore_eos": True}
    text, finish = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode(), None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return 200, "".join(text), finish


def expert_ids(shard: int) -> dict[int, list[int]]:
    """{MoE layer: expert ids} a live replica of ExpertShard-<shard> holds."""
    handle = serve.get_deployment_handle(f"ExpertShard-{shard}", APP)
    return handle.info.remote().result(timeout_s=30)["expert_ids"]


def test_a_rebalance_under_streaming_load_loses_nothing_and_changes_no_token(skewed_app):
    url = skewed_app
    before = expert_ids(0)
    seen: dict[str, list[tuple]] = {p: [] for p in REBALANCE_PROMPTS}
    stop = threading.Event()

    def client(prompt: str) -> None:
        while not stop.is_set():
            seen[prompt].append(stream_completion(url, prompt))

    threads = [threading.Thread(target=client, args=(p,), daemon=True) for p in REBALANCE_PROMPTS]
    for t in threads:
        t.start()
    try:
        # each prompt answered once on the placement served (its greedy reference), then the rebalance
        assert wait_until(lambda: all(seen.values()), timeout=120), "no answer before the rebalance"
        r = httpx.post(f"{url}/v1/admin/rebalance", json={"redundant": 2}, timeout=60)
        assert r.status_code == 200, r.text
        outcome = r.json()
        assert outcome["applied"] and outcome["balancedness"] > outcome["current_balancedness"], outcome

        def rebalanced() -> bool:
            return serve.status().applications[APP].status == "RUNNING" and expert_ids(0) != before

        assert wait_until(rebalanced, timeout=240), "the plan was not rolled out"
        answered = sum(map(len, seen.values()))  # and the new version answers too
        assert wait_until(lambda: sum(map(len, seen.values())) >= answered + len(REBALANCE_PROMPTS), timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    failed = [(p, got) for p, outs in seen.items() for got in outs if got[0] != 200 or got[2] != "length"]
    assert failed == [], failed[:3]
    changed = [(p, got[1], outs[0][1]) for p, outs in seen.items() for got in outs if got[1] != outs[0][1]]
    assert changed == [], changed[:3]
    planned = [[sorted(ids) for ids in shards] for shards in outcome["placement"]]
    after = [expert_ids(0), expert_ids(1)]
    assert [[after[s][layer] for s in (0, 1)] for layer in sorted(after[0])] == planned  # the plan, as served
    assert any(set(a) & set(b) for a, b in planned), f"2 redundant slots and no expert replicated: {planned}"
