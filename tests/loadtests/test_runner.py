"""The runner end to end: locust in its own process against a fake OpenAI server (paced, an SLO missed).
`moe-serve loadtest` against `moe-serve run` serving the Mixtral demo (no failures, a full report) is in
tests/deployments/test_run_command.py, beside the other checks of that one server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loadtests.runner import LoadTest, run_loadtest
from loadtests.summary import parse_slos
from loadtests.workload import Workload
from tests.loadtests.fake_openai import FakeOpenAI

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT_FILES = ("summary.json", "requests.jsonl", "requests.csv", "locust_stats.csv", "locust_stats_history.csv",
                "report.html", "latency.png", "throughput.png")  # fmt: skip


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
