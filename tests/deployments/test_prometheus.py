"""End to end through a real Prometheus server: the app's metrics are scraped from Ray's metrics port
and read back through Prometheus' HTTP API."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from ray import serve

from deployments.app import build_app
from deployments.local_cluster import wait_ready
from serving.tokenizer import Tokenizer
from tests.deployments.conftest import free_port

MODEL = "prom-test"


def ensure_prometheus() -> str:
    """Debian's prometheus binary, installed with apt-get when missing (CI runs as root)."""
    if shutil.which("prometheus") is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "prometheus"], capture_output=True, timeout=600)
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("needs Debian's `prometheus` package (apt-get install prometheus), which could not be installed")
    return path


@pytest.fixture(scope="module")
def prometheus(ray_metrics_port, tmp_path_factory):
    binary = ensure_prometheus()
    root = tmp_path_factory.mktemp("prometheus")
    (root / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: ['127.0.0.1:{ray_metrics_port}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prometheus: str, promql: str) -> float | None:
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for(prometheus: str, promql: str, want, timeout_s: float = 90.0) -> float | None:
    deadline, value = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        value = query(prometheus, promql)
        if value is not None and want(value):
            return value
        time.sleep(1)
    return value


def metric(name: str, **labels: str) -> str:
    """A selector that matches the name with or without the `ray_` prefix Ray's exporter adds."""
    matchers = "".join(f',{k}="{v}"' for k, v in labels.items())
    return f'{{__name__=~"(ray_)?{name}",model="{MODEL}"{matchers}}}'


def test_metrics_reach_prometheus_and_expert_counts_add_up(serve_url, prometheus, demo_dir, tmp_path):
    name = "prometheus"
    args = {"model": str(demo_dir), "shards": 2, "served_model_name": MODEL,
            "retrieval": {"store_path": str(tmp_path / "qdrant")}}  # fmt: skip
    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    try:
        url = f"{serve_url}/{name}"
        wait_ready(url, timeout_s=240)
        prompt, max_tokens = "Experts live on separate replicas", 6
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens

        # Every token that runs through the model (the prompt, and each generated token but the last)
        # is routed to top_k experts in each of the demo's 2 MoE layers.
        tokens = len(Tokenizer(demo_dir).encode(prompt)) + max_tokens - 1
        want = tokens * 2 * 2
        routed = wait_for(prometheus, f"sum({metric('moe_expert_tokens_total')})", lambda v: v >= want)
        names = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"]
        assert routed == want, f"per-expert counters sum to {routed}, want {want}; moe names: " + str(
            [n for n in names if "moe_" in n]
        )
        histograms = ("moe_time_to_first_token_seconds", "moe_e2e_request_latency_seconds",
                      "moe_inter_token_latency_seconds", "moe_engine_step_seconds", "moe_dispatch_seconds")  # fmt: skip
        for histogram in histograms:
            count = wait_for(prometheus, f"sum({metric(histogram + '_count')})", lambda v: v > 0)
            assert count and count > 0, histogram
        # The expert plane: every routed (token, expert) row was computed by exactly one shard, so the rows
        # per shard add up to the same count (the counter: a histogram's _sum is Ray's estimate); balancedness
        # is set for each of the 2 MoE layers by the one router; replicas per shard are Ray Serve's own gauge
        # (the dashboard's PromQL).
        rows = wait_for(prometheus, f"sum({metric('moe_shard_rows_total')})", lambda v: v >= want)
        assert rows == want
        # at least one call per step (the prefill and max_tokens - 1 decodes) and MoE layer, at most one per shard
        calls = wait_for(prometheus, f"sum({metric('moe_shard_call_rows_count')})", lambda v: v >= max_tokens * 2)
        assert calls is not None and max_tokens * 2 <= calls <= max_tokens * 2 * 2
        # Each call went over one transport: direct (the default) once the router knew the shards' ports,
        # handles before that (the router's first second); every attempt is counted, none was retried here.
        sent = wait_for(prometheus, f"sum({metric('moe_shard_calls_total')})", lambda v: v >= calls)
        assert sent == calls
        direct = query(prometheus, f"sum({metric('moe_shard_calls_total', transport='direct')})")
        assert direct >= calls / 2
        # Each direct answer carried the shard's own time: the round trip split into compute and hop, once per call.
        for part in ("moe_shard_compute_seconds_count", "moe_shard_hop_seconds_count"):
            assert wait_for(prometheus, f"sum({metric(part)})", lambda v: v >= direct) == direct, part
        # One wait per step and MoE layer, however many shards it called: the prefill and max_tokens - 1 decodes.
        waits = wait_for(
            prometheus, f"sum({metric('moe_layer_dispatch_seconds_count')})", lambda v: v >= max_tokens * 2
        )
        assert waits == max_tokens * 2
        assert query(prometheus, f"count({metric('moe_layer_dispatch_seconds_count')})") == 2  # a series per layer
        layers = wait_for(prometheus, f"count({metric('moe_expert_balancedness_ratio')})", lambda v: v >= 2)
        assert layers == 2
        assert 0 < query(prometheus, f"min({metric('moe_expert_balancedness_ratio')})") <= 1
        shards = f'application="{name}",deployment=~"ExpertShard-.*"'
        healthy = f'{{__name__=~"(ray_)?serve_deployment_replica_healthy",{shards}}}'
        assert wait_for(prometheus, f"sum({healthy})", lambda v: v >= 2) == 2
        # Each of the 2 shards says once which expert kernel it runs (the default, loop).
        kernels = wait_for(prometheus, f"sum({metric('moe_expert_kernel_info', kernel='loop')})", lambda v: v >= 2)
        assert kernels == 2
        completions_ok = metric("moe_http_requests_total", route="/v1/completions", status="200")
        http = wait_for(prometheus, f"sum({completions_ok})", lambda v: v >= 1)
        assert http == 1

        # Retrieval: two searches timed, one unknown collection counted as an error by reason.
        document = {"documents": [{"source": "a.md", "text": "Experts live on shards."}]}
        assert httpx.post(f"{url}/v1/documents", json=document, timeout=60).status_code == 200
        for collection, status in (("docs", 200), ("docs", 200), ("nope", 404)):
            r = httpx.post(f"{url}/v1/retrieve", json={"query": "experts", "collection": collection}, timeout=30)
            assert r.status_code == status, r.text
        searches = wait_for(prometheus, f"sum({metric('moe_retrieval_seconds_count')})", lambda v: v >= 2)
        assert searches == 2
        errors = metric("moe_retrieval_errors_total", reason="unknown_collection")
        assert wait_for(prometheus, f"sum({errors})", lambda v: v >= 1) == 1
    finally:
        serve.delete(name)
