"""PNG plots of a load test, drawn from its per-request records (matplotlib Figures, never a window).

    latency.png      left: p50 / p90 / p99 of TTFT, ITL, TPOT and E2E (ms, log scale);
                     right: every request's TTFT and E2E against the time it was sent (failures in red)
    throughput.png   output tokens/s and requests/s (completed, failed) per time bin

Tokens are placed at the times their chunks arrived (sent + TTFT + the ITL gaps), a request's tokens
spread evenly over its content chunks, so the token curve shows when work was delivered.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no backend, no global figure state

from loadtests.summary import Record

PERCENTILES = ("p50", "p90", "p99")
LATENCIES = (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))


def _title(summary: dict[str, Any]) -> str:
    return (
        f"{summary['completed']} ok / {summary['failures']} failed in {summary['elapsed_s']:.1f} s: "
        f"{summary['request_throughput_rps']:.2f} req/s, {summary['output_throughput_tok_s']:.1f} output tok/s, "
        f"goodput {summary['goodput_rps']:.2f} req/s"
    )


def plot_latency(records: Sequence[Record], summary: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(13, 4.8))
    bars, scatter = fig.subplots(1, 2, width_ratios=(1, 1.3))
    width = 0.8 / len(PERCENTILES)
    for i, stat in enumerate(PERCENTILES):
        values = [(summary[key] or {}).get(stat, 0.0) * 1000 for key, _ in LATENCIES]
        xs = np.arange(len(LATENCIES)) + (i - 1) * width
        drawn = bars.bar(xs, values, width, label=stat)
        bars.bar_label(drawn, fmt="%.0f", fontsize=7, padding=1)
    bars.set_xticks(np.arange(len(LATENCIES)), [label for _, label in LATENCIES])
    bars.set_yscale("log")
    bars.set_ylabel("ms (log scale)")
    bars.set_title("latency percentiles")
    bars.legend()

    t0 = min(r.start for r in records)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    scatter.scatter([r.start - t0 for r in ok], [r.timing.e2e * 1000 for r in ok], s=8, label="E2E")
    scatter.scatter([r.start - t0 for r in ok], [r.timing.ttft * 1000 for r in ok], s=8, label="TTFT")
    if failed:
        scatter.scatter([r.start - t0 for r in failed], [r.timing.e2e * 1000 for r in failed], s=14, marker="x",
                        color="red", label="failed (E2E)")  # fmt: skip
    scatter.set_xlabel("request sent at (s)")
    scatter.set_ylabel("ms")
    scatter.set_title("per request")
    scatter.legend()
    fig.suptitle(_title(summary), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _token_times(record: Record) -> tuple[np.ndarray, float]:
    """Arrival times of a successful request's content chunks, and the tokens each carried."""
    t = record.timing
    times = record.start + t.ttft + np.concatenate([[0.0], np.cumsum(t.itl)])
    return times, t.output_tokens / len(times)


def plot_throughput(records: Sequence[Record], summary: dict[str, Any], path: Path) -> Path:
    t0 = min(r.start for r in records)
    elapsed = max(max(r.end for r in records) - t0, 1e-3)
    bins = max(1, min(60, round(elapsed)))  # equal bins of about a second (at most 60) spanning the run exactly
    edges = np.linspace(0.0, elapsed, bins + 1)
    bin_s = elapsed / bins
    tokens = np.zeros(bins)
    for r in records:
        if r.ok:
            times, per_chunk = _token_times(r)
            tokens += np.histogram(times - t0, bins=edges)[0] * per_chunk
    done = np.histogram([r.end - t0 for r in records if r.ok], bins=edges)[0]
    failed = np.histogram([r.end - t0 for r in records if not r.ok], bins=edges)[0]

    fig = Figure(figsize=(10, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    centers = edges[:-1] + bin_s / 2
    top.plot(centers, tokens / bin_s, marker="o", markersize=3)
    top.set_ylabel("output tokens/s")
    top.set_title("throughput over time")
    bottom.bar(centers, done / bin_s, bin_s * 0.9, label="completed")
    bottom.bar(centers, failed / bin_s, bin_s * 0.9, bottom=done / bin_s, color="red", label="failed")
    bottom.set_ylabel("requests/s")
    bottom.set_xlabel(f"time since the first request (s), {bin_s:.2g} s bins")
    bottom.legend()
    fig.suptitle(_title(summary), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
