"""An online rebalance under load: the skewed demo on 2 shards, locust streaming the whole time, and
`POST /v1/admin/rebalance` in the middle; what the shards and the clients saw before, during and after.

    python -m benchmarks.rebalance [--model demo|bench] [--arch deepseek_v3|qwen3_moe] [--skew zipf:1.4]
                                   [--users 8] [--before 40] [--after 40] [--redundant 2] [--out benchmarks/results]

The app: 2 shards, 1 router, and the Mixtral demo with `make-demo --router-skew` gates on contiguous placement,
or with `--model bench` `make-demo --arch ARCH --size bench --router-skew` (deepseek_v3: 64 experts of 2048 x
1408 and 2 shared ones; qwen3_moe: 128 experts of 2048 x 768, no shared one; bf16). The bench run starts from
the placement the load makes worst: after `--warmup` seconds of load, each layer's hottest half of the experts
as GET /v1/admin/expert-load measured them go to shard 0 (a rolling update, before any phase). Halves in expert
id order carry about the same load whatever the skew, and the skew's ranks on served text are not the ones
make-demo fitted on the corpus where a gate has no selection bias (qwen3_moe).
Phases: `before` (from 10 s after the load starts to the rebalance), `during` (the rebalance call to the app
RUNNING again on the new version), `after` (from 5 s after that to the end). Per phase:
- balancedness as the traffic measured it: mean / max of the rows each shard computed
  (moe_shard_rows_total, an exact counter, scraped from Ray's metrics port at each phase's ends), per MoE
  layer and averaged over layers;
- dispatch latency per layer: p50 of a MoE layer's wait for its routed experts, first send to the slower
  shard's answer (moe_layer_dispatch_seconds, interpolated within its buckets);
- per shard: p50 and p95 of one MoE layer's call to one shard (moe_dispatch_seconds), and p50 of the part the
  shard itself spent on the call (moe_shard_compute_seconds; the rest is the hop);
- output tokens/s (tokens arriving in the phase, whatever request they belong to), ITL p50, failed requests, and
  empty ones (whole streams whose tokens decoded to no text, which the load test counts as failed).
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
from loadtests.stream import NO_CONTENT
from loadtests.workload import Workload
from serving.demo import BENCH_OVERRIDES, make_demo
from serving.expert_load import fetch_expert_load
from serving.rebalancing import post_rebalance

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


def quantiles_by(hist: dict[frozenset, float], label: str = "shard") -> dict[str, dict[str, float | None]]:
    """{label value: {"p50": s, "p95": s}} of a histogram between two scrapes, per shard (moe_dispatch_seconds,
    moe_shard_compute_seconds) or per layer (moe_layer_dispatch_seconds)."""
    per_value: dict[str, dict[float, float]] = defaultdict(dict)
    for labels, v in hist.items():
        d = dict(labels)
        per_value[d[label]][float(d["le"].replace("+Inf", "inf"))] = v
    return {k: {"p50": quantile(b, 0.5), "p95": quantile(b, 0.95)} for k, b in sorted(per_value.items(), key=_num)}


def _num(item: tuple[str, Any]) -> int:
    return int(item[0])


def hot_half_first(load: list[list[int]]) -> list[list[list[int]]]:
    """Per MoE layer, [hottest half of the expert ids, the rest] by `load` [layers][experts]: the 2-shard
    placement with the worst balance a split into halves can have."""
    placement = []
    for layer in load:
        order = sorted(range(len(layer)), key=lambda e: -layer[e])
        placement.append([sorted(order[: len(order) // 2]), sorted(order[len(order) // 2 :])])
    return placement


def wait_running(timeout_s: float = 300.0) -> None:
    """Until the app is RUNNING again after a redeploy (every deployment on its new version), at most timeout_s."""
    deadline = time.time() + timeout_s
    while not app_running(APP) and time.time() < deadline:
        time.sleep(0.5)


def tokens_between(records, t0: float, t1: float) -> tuple[float, float | None, int, int]:
    """(output tokens/s, ITL p50 s, failed requests, empty ones) of the requests started in [t0, t1). Empty: a
    whole stream whose tokens all decoded to no text (a random model can generate only special tokens with
    ignore_eos); the load test fails these as vLLM's benchmark does, but the server lost nothing."""
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
    started = [r for r in records if not r.ok and t0 <= r.start < t1]
    empty = sum(1 for r in started if r.timing.error == NO_CONTENT)
    return tokens / (t1 - t0), (float(np.median(itls)) if itls else None), len(started) - empty, empty


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skew", default=None, help="make-demo --router-skew (default: zipf:1.4 on the demo, "
                        "zipf:0.8 on bench: a token picks an expert once, so the steepest is 0.87 for top-6 of 64 "
                        "and 0.83 for top-8 of 128)")  # fmt: skip
    parser.add_argument(
        "--model",
        default="demo",
        choices=("demo", "bench"),
        help="demo: the Mixtral demo; bench: the demo of size bench of --arch (default: demo)",
    )
    parser.add_argument("--arch", default="deepseek_v3", choices=tuple(BENCH_OVERRIDES),
                        help="--model bench: the bench demo's arch (default: deepseek_v3)")  # fmt: skip
    parser.add_argument("--users", type=int, default=8, help="locust users (default: 8)")
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="--model bench: seconds of load that set the starting placement")  # fmt: skip
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
        args.skew = args.skew or "zipf:0.8"
        model = make_demo(folder / "bench", args.arch, progress=False, router_skew=args.skew, size="bench")
        sizes = {"router_resources": {"num_cpus": 2}, "shard_resources": {"num_cpus": 1}}
    engine_config = {"expert_load_window_s": 30, "dtype": "float32" if args.model == "demo" else "bfloat16"}
    app = {"model": str(model), "served_model_name": args.model, "shards": 2, "engine_config": engine_config,
           "rebalance": {"redundant": args.redundant, "min_rows": 100}, **sizes}  # fmt: skip
    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    with local_cluster(multinode=False, metrics_port=port) as (serve_url, _):
        url = deploy_app(serve_url, APP, app, timeout_s=300)
        workload = Workload(prompt_words=(8, 24), max_tokens=32, ignore_eos=True, chat_fraction=0.5)
        total = args.warmup + 300 + args.before + 300 + args.after  # an upper bound; stopped once the phases end
        test = LoadTest(url=url, out=folder / "load", users=args.users, duration_s=total, grace_s=30, workload=workload)
        locust = threading.Thread(target=run_loadtest, args=(test,), daemon=True)
        locust.start()
        t_start = time.time()
        if args.model == "bench":
            time.sleep(args.warmup)
            worst = {"placement": "explicit", "explicit_placement": hot_half_first(fetch_expert_load(url, None).load)}
            url = deploy_app(serve_url, APP, {**app, **worst}, timeout_s=300)
            wait_running()
        time.sleep(10)
        s0, t0 = scrape(metrics_url), time.time()
        time.sleep(max(0.0, args.before - 10))
        s1, t1 = scrape(metrics_url), time.time()
        outcome = post_rebalance(url, api_key=None, redundant=args.redundant)
        assert outcome["applied"], outcome
        time.sleep(2)
        wait_running()
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
        layer = quantiles_by(delta(a, b, "moe_layer_dispatch_seconds_bucket"), "layer")
        q = quantiles_by(delta(a, b, "moe_dispatch_seconds_bucket"))
        compute = quantiles_by(delta(a, b, "moe_shard_compute_seconds_bucket"))
        rows.append(_row(phase, tb - ta, mean_b, per_layer, layer, q, compute, *tokens_between(records, ta, tb)))
    rows.insert(1, _row("during", t2 - t1, None, [], {}, {}, {}, *tokens_between(records, t1, t2)))
    model_name = args.model if args.model == "demo" else f"bench {args.arch}"
    meta = machine_meta(model=model_name, skew=args.skew, users=args.users, redundant=args.redundant, started=t_start,
                        planned=round(outcome["balancedness"], 3), served=round(outcome["current_balancedness"], 3),
                        placement=outcome["placement"])  # fmt: skip
    columns = {
        "phase": "phase", "seconds": "seconds", "balancedness (rows)": "balancedness", "per layer": "per_layer",
        "layer dispatch p50 ms (per layer)": "layer_p50",
        "dispatch p50 ms (shard 0 / 1)": "p50", "dispatch p95 ms (shard 0 / 1)": "p95",
        "shard compute p50 ms (shard 0 / 1)": "compute_p50", "output tok/s": "tok_s",
        "ITL p50 ms": "itl", "failed": "failed", "empty": "empty",
    }  # fmt: skip
    write_report(args.out, "rebalance", meta, rows, columns)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _row(phase, seconds, mean_b, per_layer, layer, q, compute, tok_s, itl, failed, empty) -> dict[str, Any]:
    return {
        "phase": phase,
        "seconds": round(seconds, 1),
        "balancedness": "-" if mean_b is None else round(mean_b, 3),
        "per_layer": " / ".join(f"{b:.2f}" for b in per_layer) or "-",
        "layer_p50": " / ".join(_ms(v["p50"]) for v in layer.values()) or "-",
        "p50": " / ".join(_ms(v["p50"]) for v in q.values()) or "-",
        "p95": " / ".join(_ms(v["p95"]) for v in q.values()) or "-",
        "compute_p50": " / ".join(_ms(v["p50"]) for v in compute.values()) or "-",
        "tok_s": round(tok_s, 1),
        "itl": _ms(itl),
        "failed": failed,
        "empty": empty,
    }


if __name__ == "__main__":
    main()
