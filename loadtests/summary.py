"""From per-request records to the numbers of a load test: percentiles, throughput, goodput, SLO verdicts.

A record is one JSON line the locustfile writes per finished request (seconds; see stream.py for how
TTFT, ITL, E2E, TPOT and output tokens are measured, with the definitions of vLLM's serving benchmark):
    {"start": unix time sent, "kind": "chat", "model": "demo", "status": 200, "prompt_words": 40,
     "ok": true, "error": null, "ttft": 0.21, "itl": [0.03, ...], "e2e": 0.74, "output_tokens": 16,
     "prompt_tokens": 93}

Over a run:
- elapsed: the first request sent -> the last request finished (failed requests included).
- request throughput: successful requests / elapsed; output throughput: their output tokens / elapsed.
- prompt tokens: the server's count (usage.prompt_tokens) for each successful request that reported
  one; the prompts are drawn in words, so this is how long they were in tokens.
- percentiles: numpy's linear interpolation over successful requests; ITL over every gap of every
  successful request (one distribution of chunk gaps, as vLLM reports it).
- SLOs, `--slo KEY=VALUE,...`:
      <metric>_<stat>=SECONDS   metric: ttft itl tpot e2e; stat: mean p50 p90 p95 p99 max;
                                met when the run's statistic is <= SECONDS
      errors=N                  met when at most N requests failed (a count, not a rate)
      error_rate=F              met when at most the fraction F of requests failed
  An unknown key is an error naming it. A latency SLO whose metric has no data (no successful
  request; no TPOT when every output is one token) is missed.
- goodput: successful requests per second of elapsed that each meet every latency SLO: the request's
  TTFT <= T for ttft_* keys, its TPOT <= T for tpot_*, the mean of its own ITL gaps <= T for itl_*,
  its E2E <= T for e2e_*. With several keys on one metric (ttft_p50, ttft_p99) the smallest T applies.
  A request with a single output token has no TPOT or ITL and passes those. Without latency SLOs,
  goodput equals request throughput. (vLLM's `--goodput ttft:MS tpot:MS e2el:MS` is the same test.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtests.stream import Timing

METRICS = ("ttft", "itl", "tpot", "e2e")
STATS = ("mean", "p50", "p90", "p95", "p99", "max")
ERROR_KEYS = ("errors", "error_rate")


class SloError(ValueError):
    """A --slo string that cannot be used; the message names the key or value."""


@dataclass(frozen=True)
class Slo:
    key: str  # "ttft_p99", "errors", ...
    threshold: float

    @property
    def metric(self) -> str | None:
        """The latency metric this SLO bounds ('ttft', ...), or None for errors / error_rate."""
        return None if self.key in ERROR_KEYS else self.key.split("_")[0]


def parse_slos(text: str) -> tuple[Slo, ...]:
    """'ttft_p99=2.0,itl_p99=0.2,errors=0' -> three Slo; '' -> none."""
    latency_keys = {f"{m}_{s}" for m in METRICS for s in STATS}
    slos: dict[str, Slo] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise SloError(f"--slo: expected KEY=VALUE, got {item!r}")
        if key not in latency_keys and key not in ERROR_KEYS:
            raise SloError(
                f"--slo: unknown key {key!r}; use <{'|'.join(METRICS)}>_<{'|'.join(STATS)}>=SECONDS, "
                f"errors=COUNT or error_rate=FRACTION"
            )
        try:
            threshold = float(value)
        except ValueError:
            raise SloError(f"--slo {key}: expected a number, got {value!r}") from None
        if threshold < 0 or (key == "error_rate" and threshold > 1):
            raise SloError(f"--slo {key}: {threshold} is out of range")
        if key in slos:
            raise SloError(f"--slo: {key} is given twice")
        slos[key] = Slo(key, threshold)
    return tuple(slos.values())


@dataclass(frozen=True)
class Record:
    """One request of a run."""

    start: float  # unix time the request was sent
    kind: str  # "completions" | "chat"
    timing: Timing

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        timing = Timing(ttft=d["ttft"], itl=list(d["itl"]), e2e=d["e2e"], output_tokens=d["output_tokens"],
                        prompt_tokens=d.get("prompt_tokens"),  # absent from records older than the field
                        error=None if d["ok"] else (d["error"] or "failed"))  # fmt: skip
        return cls(start=d["start"], kind=d["kind"], timing=timing)

    @property
    def ok(self) -> bool:
        return self.timing.error is None

    @property
    def end(self) -> float:
        return self.start + self.timing.e2e

    @property
    def mean_itl(self) -> float | None:
        return float(np.mean(self.timing.itl)) if self.timing.itl else None

    def per_request(self, metric: str) -> float | None:
        """This request's value of a latency metric, for goodput (itl: the mean of its own gaps)."""
        t = self.timing
        return {"ttft": t.ttft, "itl": self.mean_itl, "tpot": t.tpot, "e2e": t.e2e}[metric]


def describe(values: Sequence[float]) -> dict[str, float] | None:
    """mean, p50, p90, p95, p99, max of `values` (None when there are none)."""
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p95": float(p95),
            "p99": float(p99), "max": float(a.max())}  # fmt: skip


def is_good(record: Record, slos: Iterable[Slo]) -> bool:
    """Successful and within every latency SLO's threshold, judged on this request alone."""
    if not record.ok:
        return False
    limits: dict[str, float] = {}
    for slo in slos:
        if slo.metric is not None:
            limits[slo.metric] = min(slo.threshold, limits.get(slo.metric, slo.threshold))
    for metric, limit in limits.items():
        value = record.per_request(metric)
        if value is not None and value > limit:
            return False
    return True


def summarize(records: Sequence[Record], slos: Sequence[Slo] = ()) -> dict[str, Any]:
    """The run's numbers (JSON-ready); raises ValueError when there are no records at all."""
    if not records:
        raise ValueError("no request finished: nothing to summarize")
    ok = [r for r in records if r.ok]
    elapsed = max(r.end for r in records) - min(r.start for r in records)
    per_s = 1.0 / elapsed if elapsed > 0 else 0.0
    output_tokens = sum(r.timing.output_tokens for r in ok)
    good = sum(is_good(r, slos) for r in ok)
    errors = Counter(r.timing.error[:160] for r in records if not r.ok)
    summary: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failures": len(records) - len(ok),
        "error_rate": (len(records) - len(ok)) / len(records),
        "elapsed_s": elapsed,
        "request_throughput_rps": len(ok) * per_s,
        "output_throughput_tok_s": output_tokens * per_s,
        "total_output_tokens": output_tokens,
        "good_requests": good,
        "goodput_rps": good * per_s,
        "ttft_s": describe([r.timing.ttft for r in ok]),
        "itl_s": describe([gap for r in ok for gap in r.timing.itl]),
        "tpot_s": describe([r.timing.tpot for r in ok if r.timing.tpot is not None]),
        "e2e_s": describe([r.timing.e2e for r in ok]),
        "output_tokens": describe([r.timing.output_tokens for r in ok]),
        "prompt_tokens": describe([r.timing.prompt_tokens for r in ok if r.timing.prompt_tokens is not None]),
        "requests_by_kind": dict(Counter(r.kind for r in records)),
        "errors": dict(errors.most_common(10)),
    }
    summary["slos"] = [verdict(summary, slo) for slo in slos]
    summary["slos_met"] = all(v["met"] for v in summary["slos"])
    return summary


def verdict(summary: dict[str, Any], slo: Slo) -> dict[str, Any]:
    """{"key", "threshold", "value", "met"} for one SLO against a summary."""
    if slo.key == "errors":
        value: float | None = summary["failures"]
    elif slo.key == "error_rate":
        value = summary["error_rate"]
    else:
        metric, stat = slo.key.split("_")
        stats = summary[f"{metric}_s"]
        value = None if stats is None else stats[stat]
    met = value is not None and value <= slo.threshold
    return {"key": slo.key, "threshold": slo.threshold, "value": value, "met": met}
