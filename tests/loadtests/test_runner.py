"""The runner end to end: locust in its own process against a fake OpenAI server (paced, an SLO missed),
and `moe-serve loadtest` against `moe-serve run` serving the Mixtral demo (no failures, a full report)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deployments.local_cluster import wait_ready
from loadtests.runner import LoadTest, run_loadtest
from loadtests.summary import parse_slos
from loadtests.workload import Workload
from tests.deployments.conftest import free_port
from tests.loadtests.fake_openai import FakeOpenAI

MOE_SERVE = str(Path(sys.executable).parent / "moe-serve")
REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT_FILES = ("summary.json", "requests.jsonl", "requests.csv", "locust_stats.csv", "locust_stats_history.csv",
                "report.html", "latency.png", "throughput.png")  # fmt: skip
LATENCIES = ("ttft_s", "itl_s", "tpot_s", "e2e_s")


def test_paced_run_against_a_fake_server_reports_a_missed_slo(tmp_path):
    slos = parse_slos("ttft_p99=0.000001,errors=0")  # no server answers in a microsecond
    with FakeOpenAI(token_delay_s=0.002) as server:
        test = LoadTest(url=f"{server.url}/", out=tmp_path, users=2, duration_s=3, grace_s=2,
                        workload=Workload(max_tokens=8, rate=10.0), slos=slos)  # fmt: skip
        assert run_loadtest(test) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["output_tokens"]["p50"] == 8
    assert 5 <= summary["requests"] <= 10 * 3 + 2  # paced to ~10 req/s, not as fast as the server answers
    assert [(v["key"], v["met"]) for v in summary["slos"]] == [("ttft_p99", False), ("errors", True)]
    assert summary["good_requests"] == 0 and summary["goodput_rps"] == 0.0 and not summary["slos_met"]
    assert summary["workload"]["rate"] == 10.0 and summary["run_error"] is None
    assert all((tmp_path / name).stat().st_size > 0 for name in REPORT_FILES)


def test_cli_rejects_an_unknown_slo_without_importing_ray_or_locust():
    code = (
        "import sys; from deployments.cli import main\n"
        "rc = main(['loadtest', '--url', 'http://127.0.0.1:9', '--slo', 'ttft_p99=1,latency=2'])\n"
        "assert 'ray' not in sys.modules and 'locust' not in sys.modules and 'gevent' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown key 'latency'" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, demo_dir):
    """What `make run` starts (configs/demo.yaml: 2 expert shards, the Retriever ingesting the project's
    docs on first start), in its own cluster and data dir, serving the session's demo checkpoint."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("data")
    proc = subprocess.Popen(
        [MOE_SERVE, "run", "--config", "configs/demo.yaml", "--model", str(demo_dir), "--data-dir", str(data_dir),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout_s=240)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)


def test_the_demo_answers_rag_requests_with_the_projects_docs(demo_server):
    """The README's RAG example: `make run` ingested README.md and docs/ on its first start."""
    collections = httpx.get(f"{demo_server}/v1/collections", timeout=30).json()["data"]
    assert [c["name"] for c in collections] == ["docs"] and collections[0]["points"] > 20
    question = "How do I create the Secrets before applying an overlay on Kubernetes?"
    body = {"model": "demo-mixtral", "messages": [{"role": "user", "content": question}], "max_tokens": 8,
            "retrieval": {"top_k": 3}}  # fmt: skip
    r = httpx.post(f"{demo_server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    sources = [s["source"] for s in r.json()["retrieval"]["sources"]]
    assert sources[0] == "docs/kubernetes.md", sources


def test_moe_serve_loadtest_against_the_demo_app(demo_server, tmp_path):
    out = tmp_path / "report"
    args = ["loadtest", "--url", demo_server, "--users", "4", "--duration", "10", "--grace", "4", "--out", str(out),
            "--max-tokens", "16", "--ignore-eos", "--prompt-words", "4:24", "--slo", "errors=0,e2e_max=60",
            "--rag"]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run([MOE_SERVE, *args], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert took < 45, f"the load test took {took:.0f} s"  # 10 s of load, locust's start, up to 4 s of grace, slack

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["completed"] == summary["requests"] >= 4
    assert set(summary["requests_by_kind"]) == {"chat", "completions"}
    assert summary["output_tokens"]["p50"] == summary["output_tokens"]["max"] == 16  # ignore_eos: exactly 16
    for key in LATENCIES:
        assert all(summary[key][p] > 0 for p in ("mean", "p50", "p90", "p99")), key
    assert summary["ttft_s"]["p50"] < summary["e2e_s"]["p50"]
    assert summary["output_throughput_tok_s"] > 0 and summary["request_throughput_rps"] > 0
    assert summary["goodput_rps"] == pytest.approx(summary["request_throughput_rps"])  # all within e2e_max=60
    assert summary["slos_met"] and summary["run_error"] is None
    assert all((out / name).stat().st_size > 0 for name in REPORT_FILES)
    assert "TTFT" in (out / "locust_stats.csv").read_text()  # the custom metrics reached locust
    assert "goodput" in result.stdout
