"""`moe-serve loadtest`: locust, headless in its own process, against any OpenAI-compatible URL; then a report.

    from loadtests.runner import LoadTest, run_loadtest
    from loadtests.summary import parse_slos
    from loadtests.workload import Workload

    code = run_loadtest(LoadTest(url="http://127.0.0.1:8000", out=Path(".data/loadtest"), users=8,
                                 duration_s=60, workload=Workload(max_tokens=64),
                                 slos=parse_slos("ttft_p99=2.0,itl_p99=0.2,errors=0")))

Writes into `out` (see summary.py for every definition):
    summary.json        the numbers: requests, failures, throughput, TTFT/ITL/TPOT/E2E percentiles,
                        goodput, SLO verdicts, and the run's settings
    requests.jsonl      one line of timings per request, as the locustfile wrote them
    requests.csv        the same, one row per request (ITL as count and mean)
    locust_*.csv        locust's own CSVs (stats, stats history, failures, exceptions)
    report.html         locust's HTML report (TTFT / ITL / TPOT / E2E rows per kind)
    latency.png, throughput.png
Returns 0 when every SLO is met, 1 when one is missed, 2 when the run failed (locust did not start or
did not finish in time, or no request finished).

Locust runs in a subprocess because importing it monkey-patches the process with gevent, which breaks
Ray (and qdrant-client) in the same process. It stops itself after `duration_s` (-t) and gives running
requests up to `grace_s` to finish (--stop-timeout); the runner kills it if it is still alive
STARTUP_S after that. Requests still running then are in no record.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.plots import plot_latency, plot_throughput
from loadtests.summary import Record, Slo, summarize
from loadtests.workload import Workload

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO_ROOT = Path(__file__).resolve().parents[1]  # on the locust process's path: `import loadtests`
STARTUP_S = 60  # locust's start and the report, on top of duration and grace, before the runner kills it
OK, SLO_MISSED, RUN_FAILED = 0, 1, 2


@dataclass(frozen=True)
class LoadTest:
    """One load test run: where to send, how hard, for how long, what to send, what must hold."""

    url: str  # the server's base URL (without /v1)
    out: Path  # report folder, created if missing; earlier files of the same names are replaced
    users: int = 8  # concurrent simulated users
    duration_s: float = 30.0
    spawn_rate: float | None = None  # users started per second (default: all within the first second)
    grace_s: float = 10.0  # how long running requests may finish after duration_s
    workload: Workload = field(default_factory=Workload)
    slos: Sequence[Slo] = ()

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url: expected http://HOST:PORT, got {self.url!r}")
        if self.users < 1:
            raise ValueError(f"--users: must be >= 1, got {self.users}")
        if self.duration_s <= 0:
            raise ValueError(f"--duration: must be > 0 seconds, got {self.duration_s}")

    def locust_command(self) -> list[str]:
        spawn_rate = self.spawn_rate or self.users
        return [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "--host", self.url.rstrip("/"), "-u", str(self.users), "-r", str(spawn_rate),
            "-t", f"{self.duration_s:g}s", "--stop-timeout", f"{self.grace_s:g}",
            "--csv", str(self.out / "locust"), "--html", str(self.out / "report.html"),
            "--exit-code-on-error", "0",  # failed requests are judged by the SLOs, not by locust
            "--records-file", str(self.out / "requests.jsonl"), *self.workload.to_args(),
        ]  # fmt: skip


def run_loadtest(test: LoadTest) -> int:
    """Run locust, write the report into test.out, print a short summary; returns the exit code."""
    test.out.mkdir(parents=True, exist_ok=True)
    records_file = test.out / "requests.jsonl"
    records_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    limit_s = test.duration_s + test.grace_s + STARTUP_S
    print(f"moe-serve loadtest: {test.users} users for {test.duration_s:g} s against {test.url}", flush=True)
    try:
        locust = subprocess.run(test.locust_command(), env=env, timeout=limit_s, check=False)
        run_error = None if locust.returncode == 0 else f"locust exited with code {locust.returncode}"
    except subprocess.TimeoutExpired:
        run_error = f"locust was still running {limit_s:g} s after it started and was killed"
    records = read_records(records_file)
    if not records:
        print(f"error: {run_error or 'no request finished'} (see locust's output above)", file=sys.stderr)
        return RUN_FAILED
    summary = {**settings(test), **summarize(records, test.slos), "run_error": run_error}
    (test.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_csv(records, test.out / "requests.csv")
    plot_latency(records, summary, test.out / "latency.png")
    plot_throughput(records, summary, test.out / "throughput.png")
    print(report_text(summary, test.out), flush=True)
    if run_error:
        print(f"error: {run_error}", file=sys.stderr)
        return RUN_FAILED
    return OK if summary["slos_met"] else SLO_MISSED


def read_records(path: Path) -> list[Record]:
    if not path.exists():
        return []
    with path.open() as f:
        return [Record.from_json(json.loads(line)) for line in f if line.strip()]


def settings(test: LoadTest) -> dict[str, Any]:
    return {"url": test.url, "users": test.users, "duration_s": test.duration_s, "workload": test.workload.describe()}


def write_csv(records: Sequence[Record], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["start", "kind", "ok", "ttft_s", "itl_count", "itl_mean_s", "tpot_s", "e2e_s", "output_tokens",
                    "prompt_tokens", "error"])  # fmt: skip
        for r in records:
            t = r.timing
            w.writerow([f"{r.start:.3f}", r.kind, r.ok, t.ttft, len(t.itl), r.mean_itl, t.tpot, t.e2e, t.output_tokens,
                        t.prompt_tokens, t.error or ""])  # fmt: skip


def report_text(summary: dict[str, Any], out: Path) -> str:
    """The few lines printed after a run."""
    lines = [
        f"{summary['requests']} requests, {summary['failures']} failed, in {summary['elapsed_s']:.1f} s -> {out}/",
        f"  throughput {summary['request_throughput_rps']:.2f} req/s, {summary['output_throughput_tok_s']:.1f} "
        f"output tok/s; goodput {summary['goodput_rps']:.2f} req/s",
    ]
    counts = (("prompt", summary["prompt_tokens"]), ("output", summary["output_tokens"]))
    tokens = ", ".join(f"{what} {s['mean']:.1f}" for what, s in counts if s)
    if tokens:
        lines.append(f"  tokens per request (mean): {tokens}")
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        s = summary[key]
        ms = "n/a" if s is None else " / ".join(f"{s[p] * 1000:.0f}" for p in ("p50", "p90", "p99"))
        lines.append(f"  {label:<5} p50/p90/p99 {ms} ms")
    for v in summary["slos"]:
        value = "no data" if v["value"] is None else f"{v['value']:.4g}"
        lines.append(f"  SLO {v['key']} <= {v['threshold']:g}: {value} {'met' if v['met'] else 'MISSED'}")
    for error, count in summary["errors"].items():
        lines.append(f"  {count} x {error}")
    return "\n".join(lines)
