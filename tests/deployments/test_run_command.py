"""`moe-serve run` as a user runs it (what `make run` starts: configs/demo.yaml, 2 expert shards, the Retriever
ingesting the project's docs on first start), one server for the module: it answers, answers RAG requests
from the docs, takes `moe-serve loadtest` with no failure and a full report, and on SIGTERM shuts down
leaving no processes. The last test stops it (tests run in file order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deployments.local_cluster import wait_ready
from tests.deployments.conftest import free_port
from tests.loadtests.test_runner import REPORT_FILES  # what a loadtest report holds

MOE_SERVE = str(Path(sys.executable).parent / "moe-serve")
REPO_ROOT = Path(__file__).resolve().parents[2]
LATENCIES = ("ttft_s", "itl_s", "tpot_s", "e2e_s")


def ray_processes() -> set[int]:
    """PIDs of running Ray daemons (raylet, GCS), from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"raylet" in cmdline or b"gcs_server" in cmdline:
                pids.add(int(entry.name))
    return pids


@dataclass
class DemoServer:
    url: str
    proc: subprocess.Popen
    ray_before: set[int]  # Ray daemons that ran before it started (the session's cluster)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, demo_dir):
    """`moe-serve run --config configs/demo.yaml` in its own cluster and data dir, on the session's demo
    checkpoint; stopped by the module's last test (or here, if that test did not run)."""
    before, port = ray_processes(), free_port()
    data_dir = tmp_path_factory.mktemp("data")
    proc = subprocess.Popen(
        [MOE_SERVE, "run", "--config", "configs/demo.yaml", "--model", str(demo_dir), "--data-dir", str(data_dir),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    server = DemoServer(f"http://127.0.0.1:{port}", proc, before)
    try:
        wait_ready(server.url, timeout_s=240)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)


def test_run_serves_the_demo(demo_server):
    url = demo_server.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_the_demo_answers_rag_requests_with_the_projects_docs(demo_server):
    """The README's RAG example: `make run` ingested README.md and docs/ on its first start."""
    # the Retriever answers once its first-start ingest of README.md and docs/ is done (~30 s on 2 cores)
    collections = httpx.get(f"{demo_server.url}/v1/collections", timeout=180).json()["data"]
    assert [c["name"] for c in collections] == ["docs"] and collections[0]["points"] > 20
    question = "How do I create the Secrets before applying an overlay on Kubernetes?"
    body = {"model": "demo-mixtral", "messages": [{"role": "user", "content": question}], "max_tokens": 8,
            "retrieval": {"top_k": 3}}  # fmt: skip
    r = httpx.post(f"{demo_server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    sources = [s["source"] for s in r.json()["retrieval"]["sources"]]
    assert sources[0] == "docs/kubernetes.md", sources


def test_moe_serve_loadtest_against_the_demo_app(demo_server, tmp_path):
    out = tmp_path / "report"
    args = ["loadtest", "--url", demo_server.url, "--users", "4", "--duration", "10", "--grace", "4", "--out", str(out),
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


def test_sigterm_shuts_it_down_cleanly_leaving_no_ray_daemons(demo_server):
    proc, url = demo_server.proc, demo_server.url
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "moe-serve is up" in out and f"{url}/v1" in out
    deadline = time.monotonic() + 30
    while ray_processes() - demo_server.ray_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - demo_server.ray_before, "Ray daemons left behind"
