"""Online rebalancing on a real Ray cluster: a skewed demo under streaming load rebalances by itself
(rebalance.auto_below), new shards come up with the planned experts, and no client sees a failure or a
changed token."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from deployments.app import build_app
from deployments.local_cluster import wait_ready
from router.placement import Placement
from serving.demo import make_demo
from serving.model.config import ModelConfig

APP = "rebalance"
PROMPTS = ["Experts live on", "The router sends each shard", "Hello there", "A sparse layer"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def skewed_demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("skewed") / "demo", "mixtral", progress=False, router_skew="zipf:1.2")


def _complete(url: str, prompt: str) -> tuple[int, str, str | None]:
    """(status, text, finish_reason) of a streamed greedy completion: streaming, so a rolling update can land
    in the middle of one."""
    body = {
        "model": "demo",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    text, finish = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode(), None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return 200, "".join(text), finish


def _wait_for(condition, timeout_s: float) -> bool:
    """True as soon as condition() holds (checked twice a second: it calls the cluster), False at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def _expert_ids(shard: int) -> dict:
    return serve.get_deployment_handle(f"ExpertShard-{shard}", APP).info.remote().result(timeout_s=30)["expert_ids"]


def test_a_skewed_app_rebalances_by_itself_under_load_and_no_client_sees_it(serve_url, skewed_demo):
    args = {
        "model": str(skewed_demo),
        "served_model_name": "demo",
        "shards": 2,
        "engine_config": {"expert_load_window_s": 3},
        "rebalance": {"redundant": 2, "auto_below": 0.99, "min_gain": 0.01, "check_every_s": 1, "min_rows": 200},
        "failover": {"router_drain_s": 5, "ingress_drain_s": 30},
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    url = f"{serve_url}/{APP}"
    wait_ready(url, timeout_s=240)
    try:
        before = _expert_ids(0)
        e = ModelConfig.from_pretrained(skewed_demo).num_experts
        assert all(ids == list(Placement.contiguous(e, 2).experts_of(0)) for ids in before.values())
        want = {p: _complete(url, p) for p in PROMPTS}  # greedy answers under the contiguous placement
        assert all(status == 200 and finish == "length" for status, _, finish in want.values()), want

        seen: list[tuple[str, tuple]] = []
        stop = threading.Event()

        def client(prompt: str) -> None:
            while not stop.is_set():
                seen.append((prompt, _complete(url, prompt)))

        threads = [threading.Thread(target=client, args=(p,), daemon=True) for p in PROMPTS]
        for t in threads:
            t.start()

        def rebalanced() -> bool:
            status = serve.status().applications[APP].status
            return status == "RUNNING" and _expert_ids(0) != before

        try:
            assert _wait_for(rebalanced, timeout_s=240), "the app did not rebalance"
            settled = len(seen)  # let the clients run a while on the new placement too
            assert _wait_for(lambda: len(seen) >= settled + len(PROMPTS), timeout_s=120)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        failed = [(p, got) for p, got in seen if got[0] != 200 or got[2] != "length"]
        assert failed == [], failed[:3]
        changed = [(p, got[1], want[p][1]) for p, got in seen if got[1] != want[p][1]]
        assert changed == [], changed[:3]
        after = _expert_ids(0), _expert_ids(1)
        assert any(set(after[0][layer]) & set(after[1][layer]) for layer in after[0]), after  # 2 redundant slots

        outcome = httpx.post(f"{url}/v1/admin/rebalance", json={"dry_run": True}, timeout=60)
        assert outcome.status_code in (200, 409), outcome.text  # 409: the new routers' window is still thin
    finally:
        serve.delete(APP)
