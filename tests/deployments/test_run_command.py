"""`moe-serve run` as a user runs it: serves, answers, and on SIGTERM shuts down leaving no processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deployments.local_cluster import wait_ready
from tests.deployments.conftest import free_port

MOE_SERVE = str(Path(sys.executable).parent / "moe-serve")


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


def test_run_serves_the_demo_and_shuts_down_cleanly(tmp_path, demo_dir):
    before = ray_processes()
    port = free_port()
    proc = subprocess.Popen(
        [MOE_SERVE, "run", "--model", str(demo_dir), "--shards", "2", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout_s=240)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "moe-serve is up" in out and f"{url}/v1" in out
    deadline = time.monotonic() + 30
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, "Ray daemons left behind"
