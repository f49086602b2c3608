"""An online rebalance under load: the skewed demo on 2 shards, locust streaming the whole time, and
`POST /v1/admin/rebalance` in the middle; what the shards and the clients saw before, during and after.

    python -m benchmarks.rebalance [--skew zipf:1.4] [--users 8] [--before 40] [--after 40] [--redundant 2]
                                   [--out benchmarks/results]

The app: the Mixtral demo with `make-demo --router-skew` gates (`--model bench`: `make-demo --arch deepseek_v3
--size bench --router-skew`, experts of 2048 x 1408 in bf16, each layer's 32 hottest experts on shard 0), 2 shards
on contiguous placement (the tiny demo), 1 router.
Phases: `before` (from 10 s after the load starts to the rebalance), `during` (the rebalance call to the app
RUNNING again on the new version), `after` (from 5 s after that to the end). Per phase:
- balancedness as the traffic measured it: mean / max of the rows each shard computed
  (moe_shard_rows_total, an exact counter, scraped from Ray's metrics port at each phase's ends), per MoE
  layer and averaged over layers;
- dispatch latency per shard: p50 and p95 of one MoE layer's call to one shard (moe_dispatch_seconds,
  interpolated within its buckets; a layer waits for the slower of its shards), and p50 of the part the shard
  itself spent on the call (moe_shard_compute_seconds; the rest is the hop);
- output tokens/s (tokens arriving in the phase, whatever request they belong to), ITL p50, failed requests.
The rebalance's own answer gives the planned and served balancedness from the routers' window.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import machine_meta, write_report
from benchmarks.resilience import app_running, gaps, local_cluster
from deployments.local_cluster import deploy_app, free_port
from loadtests.runner import LoadTest, read_records, run_loadtest
from loadtests.workload import Workload
from serving.demo import make_demo
from serving.model.config import ModelConfig
from serving.rebalancing import post_rebalance
from serving.router_skew import rank_orders

APP = "rebalance"
_SAMPLE = re.compile(r"^(ray_)?(?P<name>moe_\w+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def scrape(metrics_url: str) -> dict[tuple[str, frozenset], float]:
    """{(metric name, labels): value} of every moe_ series on Ray's metrics port, summed over the series that
    differ only in process tags (Ray exports one per worker)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[tuple[str, frozenset], float] = defaultdict(float)
    for line in text.splitlines():
        if (m := _SAMPLE.match(line)) is None:
            continue
        labels = dict(kv.split("=", 1) for kv in re.findall(r'\w+="[^"]*"', m["labels"]))
        keep = frozenset((k, v.strip('"')) for k, v in labels.items() if k in ("shard", "layer", "le"))
        out[(m["name"], keep)] += float(m["value"])
    return out


def delta(a: dict, b: dict, name: str) -> dict[frozenset, float]:
    """Series of `name` between two scrapes: b - a."""
    return {labels: v - a.get((n, labels), 0.0) for (n, labels), v in b.items() if n == name}


def rows_balancedness(rows: dict[frozenset, float]) -> tuple[float | None, list[float]]:
    """(mean over layers, per layer) of mean shard rows / max shard rows."""
    by_layer: dict[str, dict[str, float]] = defaultdict(dict)
    for labels, v in rows.items():
        d = dict(labels)
        by_layer[d["layer"]][d["shard"]] = v
    per_layer = [
        (sum(s.values()) / len(s)) / max(s.values()) for _, s in sorted(by_layer.items()) if max(s.values()) > 0
    ]
    return (float(np.mean(per_layer)) if per_layer else None), per_layer


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram {upper bound: count}, linear within a bucket (as PromQL)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def shard_quantiles(hist: dict[frozenset, float]) -> dict[str, dict[str, float | None]]:
    """{shard: {"p50": s, "p95": s}} of a per-shard histogram (moe_dispatch_seconds, moe_shard_compute_seconds)
    between two scrapes."""
    per_shard: dict[str, dict[float, float]] = defaultdict(dict)
    for labels, v in hist.items():
        d = dict(labels)
        per_shard[d["shard"]][float(d["le"].replace("+Inf", "inf"))] = v
    return {s: {"p50": quantile(b, 0.5), "p95": quantile(b, 0.95)} for s, b in sorted(per_shard.items())}


def tokens_between(records, t0: float, t1: float) -> tuple[float, float | None, int]:
    """(output tokens/s, ITL p50 s, failed requests started) in [t0, t1)."""
    tokens, itls = 0, []
    for r in records:
        if not r.ok or r.timing.ttft is None:
            continue
        first = r.start + r.timing.ttft
        tokens += t0 <= first < t1
        for at, gap in gaps(r):
            if t0 <= at < t1:
                tokens += 1
                itls.append(gap)
    failed = sum(1 for r in records if not r.ok and t0 <= r.start < t1)
    return tokens / (t1 - t0), (float(np.median(itls)) if itls else None), failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skew", default=None, help="make-demo --router-skew (default: zipf:1.4 on the demo, "
                        "zipf:0.8 on bench: with top-6 of 64 experts one takes at most 1/6 of the rows)")  # fmt: skip
    parser.add_argument("--model", default="demo", choices=("demo", "bench"),
                        help="demo: the Mixtral demo; bench: the deepseek_v3 demo of size bench (experts 2048 x 1408, "
                        "bf16) (default: demo)")  # fmt: skip
    parser.add_argument("--users", type=int, default=8, help="locust users (default: 8)")
    parser.add_argument("--before", type=float, default=40.0, help="seconds of load before the rebalance")
    parser.add_argument("--after", type=float, default=40.0, help="seconds of load once the new version runs")
    parser.add_argument("--redundant", type=int, default=2, help="redundant slots a layer for the plan")
    parser.add_argument("--out", default="benchmarks/results", help="folder for rebalance.json")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="rebalance-"))
    if args.model == "demo":
        args.skew = args.skew or "zipf:1.4"
        model = make_demo(folder / "demo", "mixtral", progress=False, router_skew=args.skew)
        sizes: dict[str, Any] = {}
    else:
        # 64 experts: halves in expert id order carry about the same load whatever the skew, so the run starts
        # from the placement a skew makes worst: each layer's 32 hottest experts on shard 0.
        args.skew = args.skew or "zipf:0.8"
        model = make_demo(folder / "bench", "deepseek_v3", progress=False, router_skew=args.skew, size="bench")
        cfg = ModelConfig.from_pretrained(model)
        hot_first = rank_orders(cfg.num_experts, len(cfg.moe_layer_ids), seed=0)  # what make_demo fitted (seed 0)
        half = cfg.num_experts // 2
        sizes = {"router_resources": {"num_cpus": 2}, "shard_resources": {"num_cpus": 1}, "placement": "explicit",
                 "explicit_placement": [[order[:half], order[half:]] for order in hot_first]}  # fmt: skip
    engine_config = {"expert_load_window_s": 30, "dtype": "float32" if args.model == "demo" else "bfloat16"}
    app = {"model": str(model), "served_model_name": args.model, "shards": 2, "engine_config": engine_config,
           "rebalance": {"redundant": args.redundant, "min_rows": 100}, **sizes}  # fmt: skip
    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    with local_cluster(multinode=False, metrics_port=port) as (serve_url, _):
        url = deploy_app(serve_url, APP, app, timeout_s=300)
        workload = Workload(prompt_words=(8, 24), max_tokens=32, ignore_eos=True, chat_fraction=0.5)
        total = args.before + 300 + args.after  # an upper bound; stopped by waiting for the phases instead
        test = LoadTest(url=url, out=folder / "load", users=args.users, duration_s=total, grace_s=30, workload=workload)
        locust = threading.Thread(target=run_loadtest, args=(test,), daemon=True)
        locust.start()
        t_start = time.time()
        time.sleep(10)
        s0, t0 = scrape(metrics_url), time.time()
        time.sleep(max(0.0, args.before - 10))
        s1, t1 = scrape(metrics_url), time.time()
        outcome = post_rebalance(url, api_key=None, redundant=args.redundant)
        assert outcome["applied"], outcome
        time.sleep(2)
        while not app_running(APP) and time.time() - t1 < 300:
            time.sleep(0.5)
        t2 = time.time()
        time.sleep(5)
        s2, t3 = scrape(metrics_url), time.time()
        time.sleep(args.after)
        s3, t4 = scrape(metrics_url), time.time()
        time.sleep(10)  # requests running at t4 finish and are written: their tokens before t4 count
        records = read_records(folder / "load" / "requests.jsonl")
        subprocess.run(["pkill", "-f", str(folder / "load")], check=False)  # locust, started for longer
        locust.join(timeout=30)
    rows = []
    for phase, (a, b, ta, tb) in {"before": (s0, s1, t0, t1), "after": (s2, s3, t3, t4)}.items():
        mean_b, per_layer = rows_balancedness(delta(a, b, "moe_shard_rows_total"))
        q = shard_quantiles(delta(a, b, "moe_dispatch_seconds_bucket"))
        compute = shard_quantiles(delta(a, b, "moe_shard_compute_seconds_bucket"))
        tok_s, itl, failed = tokens_between(records, ta, tb)
        rows.append(_row(phase, tb - ta, mean_b, per_layer, q, compute, tok_s, itl, failed))
    tok_s, itl, failed = tokens_between(records, t1, t2)
    rows.insert(1, _row("during", t2 - t1, None, [], {}, {}, tok_s, itl, failed))
    meta = machine_meta(model=args.model, skew=args.skew, users=args.users, redundant=args.redundant, started=t_start,
                        planned=round(outcome["balancedness"], 3), served=round(outcome["current_balancedness"], 3),
                        placement=outcome["placement"])  # fmt: skip
    columns = {
        "phase": "phase", "seconds": "seconds", "balancedness (rows)": "balancedness", "per layer": "per_layer",
        "dispatch p50 ms (shard 0 / 1)": "p50", "dispatch p95 ms (shard 0 / 1)": "p95",
        "shard compute p50 ms (shard 0 / 1)": "compute_p50", "output tok/s": "tok_s",
        "ITL p50 ms": "itl", "failed": "failed",
    }  # fmt: skip
    write_report(args.out, "rebalance", meta, rows, columns)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _row(phase, seconds, mean_b, per_layer, q, compute, tok_s, itl, failed) -> dict[str, Any]:
    return {
        "phase": phase,
        "seconds": round(seconds, 1),
        "balancedness": "-" if mean_b is None else round(mean_b, 3),
        "per_layer": " / ".join(f"{b:.2f}" for b in per_layer) or "-",
        "p50": " / ".join(_ms(v["p50"]) for v in q.values()) or "-",
        "p95": " / ".join(_ms(v["p95"]) for v in q.values()) or "-",
        "compute_p50": " / ".join(_ms(v["p50"]) for v in compute.values()) or "-",
        "tok_s": round(tok_s, 1),
        "itl": _ms(itl),
        "failed": failed,
    }


if __name__ == "__main__":
    main()
