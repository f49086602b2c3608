"""Faults under load: `moe-serve loadtest`'s locust runner drives the demo app on a local Ray cluster while
a real replica process is SIGKILLed at a set time (deployments/faults.py); then what the clients saw.

    python -m benchmarks.resilience [--scenarios shard-replica,router] [--users 6] [--duration 40]
                                    [--fault-at 15] [--health-check-periods 10,2] [--out .data/resilience]
    python -m benchmarks.resilience --soak [--soak-minutes 10] [--users 16]

Per scenario: requests, failed (and their errors), TTFT and ITL p99 before the fault and in the fault
window (the `--window` seconds after it), the longest inter-token gap in the window, and two recovery
times: until the killed deployment has its replicas again (Serve's restart), and until the clients
recovered (the last failed request or gap longer than max(1 s, 3 x ITL p99 before) after the fault).
The soak row: 0 errors over the run, and every replica's RSS at the end against after warm-up.
`--health-check-periods` runs each scenario once per `failover.health_check_period_s` given (default: the
config's), side by side: how soon Serve notices a dead replica sets how long the requests wait for one that
had no twin.

Scenarios (the app is the demo model, 2 expert shards, streaming, ignore_eos):
    shard-replica   1 of 2 replicas of ExpertShard-0     -> 0 failed, a retry on the twin
    shard-only      the only replica of ExpertShard-1    -> 0 failed, requests hold while Serve restarts it
    router          1 of 2 Router replicas               -> 0 failed, streams migrate to the other router
    router-only     the only Router (router_wait_s 3 s)  -> 503 with Retry-After until Serve restarts it
    retriever       the Retriever, RAG requests          -> 0 failed: answers without context meanwhile
    node            a worker node removed (its raylet and every process on it) from a 3-node
                    `ray.cluster_utils.Cluster`; routers and shard replicas pinned to the 2 worker nodes
                    by a custom resource, as KubeRay worker groups advertise them -> 0 failed
    rolling-update  the app deployed as `serve deploy` does (a config: import path and args), then again
                    with a new checkpoint path (a copy of the same weights) and a new shard resource:
                    every deployment is replaced, one replica at a time -> 0 failed
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from benchmarks.report import machine_meta, write_report
from deployments.local_cluster import deploy_app, free_port, wait_ready
from loadtests.runner import LoadTest, read_records, run_loadtest
from loadtests.summary import Record
from loadtests.workload import Workload

WORKER = "moe_worker"  # the custom resource the node scenario's worker nodes advertise (docs/kubernetes.md)
HEAD = "moe_head"
ON_WORKERS = {"resources": {WORKER: 1}}


@dataclass(frozen=True)
class Scenario:
    name: str
    app: dict[str, Any]  # AppConfig fields on top of the demo model's
    fault: Literal["kill", "remove-node", "update"]
    deployment: str | None = None  # kill: the deployment one of whose replicas is killed
    rag: bool = False
    expect: str = "0 failed"
    min_duration_s: float = 0.0  # load at least this long (an update replaces every replica, one by one)


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("shard-replica", {"shards": 2, "shard_replicas": 2}, "kill", "ExpertShard-0"),
        Scenario("shard-only", {"shards": 2}, "kill", "ExpertShard-1"),
        Scenario("router", {"shards": 2, "routers": 2}, "kill", "Router"),
        Scenario(
            "router-only", {"shards": 2, "failover": {"router_wait_s": 3.0}}, "kill", "Router", expect="503 only"
        ),  # fmt: skip
        Scenario("retriever", {"shards": 2}, "kill", "Retriever", rag=True),
        Scenario(
            "node",
            {
                "shards": 2,
                "shard_replicas": 2,
                "routers": 2,
                "router_resources": {"num_cpus": 1, **ON_WORKERS},
                "shard_resources": {"num_cpus": 0.5, **ON_WORKERS},
                "ingress_resources": {"resources": {HEAD: 1}},
            },
            "remove-node",
        ),  # fmt: skip
        Scenario("rolling-update", {"shards": 2, "routers": 2}, "update", min_duration_s=90.0),
    ]
}
WATCHED = ("Router", "ExpertShard-0", "ExpertShard-1")  # what a removed node takes with it


@dataclass
class Result:
    scenario: str
    records: list[Record]
    fault_at: float  # unix time of the kill
    replicas_back_s: float | None  # kill -> the deployment has as many replicas as before
    nodes_before: dict[str, int] = field(default_factory=dict)  # deployment -> nodes its replicas ran on
    rss: dict[str, list[int]] = field(default_factory=dict)  # soak: replica -> RSS bytes, every RSS_EVERY_S

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if not r.ok]


def run_scenario(
    url: str,
    app: str,
    scenario: Scenario,
    out: Path,
    users: int,
    duration_s: float,
    fault_at_s: float,
    remove_node: Callable[[], str] | None = None,
    update: Callable[[], None] | None = None,
) -> Result:
    """Locust against `url` for `duration_s`; at `fault_at_s` one replica of the scenario's deployment is
    killed, or `remove_node()` removes a worker node, or `update()` deploys the app's new version."""
    from deployments.faults import kill_replica, replica_nodes

    workload = Workload(prompt_words=(8, 24), max_tokens=32, ignore_eos=True, rag=scenario.rag, chat_fraction=0.5)
    test = LoadTest(url=url, out=out, users=users, duration_s=duration_s, grace_s=30.0, workload=workload)
    locust = threading.Thread(target=run_loadtest, args=(test,), daemon=True)
    watched = [scenario.deployment] if scenario.deployment else list(WATCHED)
    replicas = {d: len(replica_nodes(app, d)) for d in watched}
    nodes_before = {d: len(set(replica_nodes(app, d))) for d in watched}
    locust.start()
    time.sleep(fault_at_s)
    fault_at = time.time()
    gone = None  # the removed node: its replicas may answer for a moment before they die with it
    if scenario.fault == "kill":
        assert scenario.deployment is not None, f"{scenario.name}: a kill needs a deployment"
        kill_replica(app, scenario.deployment)
    elif scenario.fault == "remove-node":
        assert remove_node is not None, "the node scenario needs a node to remove"
        gone = remove_node()
    else:
        assert update is not None, "the update scenario needs the new version to deploy"
        update()
    replicas_back_s = None
    while locust.is_alive() or replicas_back_s is None:
        if scenario.fault == "update":
            back = app_running(app)  # every deployment on the new version, healthy
        else:
            live = {d: [n for n in replica_nodes(app, d) if n != gone] for d in watched}
            back = all(len(live[d]) >= n for d, n in replicas.items())
        if replicas_back_s is None and back:
            replicas_back_s = time.time() - fault_at
        if time.time() - fault_at > 300:
            break
        locust.join(timeout=0.5)
    return Result(scenario.name, read_records(out / "requests.jsonl"), fault_at, replicas_back_s, nodes_before)


def new_version(app: dict[str, Any], out: Path) -> dict[str, Any]:
    """The rolling update's config: the checkpoint at a new path (the same weights, so outputs must not
    change) and one more tenth of a CPU per shard replica."""
    copy = out / "demo-mixtral-v2"
    if not (copy / "config.json").exists():
        shutil.copytree(app["model"], copy, dirs_exist_ok=True)
    shards = dict(app.get("shard_resources") or {"num_cpus": 0.5})
    shards["num_cpus"] = round(shards.get("num_cpus", 0.5) + 0.1, 2)
    return {**app, "model": str(copy.resolve()), "shard_resources": shards}


def serve_deploy(name: str, args: dict[str, Any]) -> None:
    """What `serve deploy` of a config holding this one app does (the CLI sends it through the dashboard's
    REST API to the same controller call): the controller builds the app from its import path and args and
    rolls out what changed, one replica at a time. Returns once the controller has taken it up."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {"name": name, "route_prefix": f"/{name}", "import_path": "deployments.app:build_app", "args": args}
    running = app_running(name)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    deadline = time.monotonic() + 10
    while running and app_running(name) and time.monotonic() < deadline:
        time.sleep(0.1)


def app_running(name: str) -> bool:
    """Whether app `name` is RUNNING: every deployment has its target replicas, of its target version."""
    from ray import serve

    app = serve.status().applications.get(name)
    return app is not None and app.status == "RUNNING"


def gaps(record: Record) -> list[tuple[float, float]]:
    """(unix time a token arrived, the gap before it) for each inter-token gap of a request."""
    t = record.start + (record.timing.ttft or 0.0)
    out = []
    for gap in record.timing.itl:
        t += gap
        out.append((t, gap))
    return out


def p99(values: list[float]) -> float | None:
    return float(np.percentile(values, 99)) if values else None


def analyse(result: Result, window_s: float) -> dict[str, Any]:
    t0, records = result.fault_at, result.records
    ok = [r for r in records if r.ok]
    before = [r for r in ok if r.start + r.timing.e2e < t0]
    in_window = [r for r in ok if t0 <= r.start < t0 + window_s]
    gaps_before = [g for r in ok for at, g in gaps(r) if at < t0]
    gaps_window = [g for r in ok for at, g in gaps(r) if t0 <= at < t0 + window_s]
    itl_before = p99(gaps_before)
    slow = max(1.0, 3 * (itl_before or 0.0))
    bad = [r.start + r.timing.e2e for r in result.failed if r.start + r.timing.e2e >= t0]
    bad += [at for r in ok for at, g in gaps(r) if at >= t0 and g > slow]
    errors: dict[str, int] = {}
    for r in result.failed:
        errors[r.timing.error or "failed"] = errors.get(r.timing.error or "failed", 0) + 1
    return {
        "scenario": result.scenario,
        "requests": len(records),
        "failed": len(result.failed),
        "errors": errors,
        "ttft_p99_before_s": p99([r.timing.ttft for r in before if r.timing.ttft is not None]),
        "ttft_p99_window_s": p99([r.timing.ttft for r in in_window if r.timing.ttft is not None]),
        "itl_p99_before_s": itl_before,
        "itl_p99_window_s": p99(gaps_window),
        "longest_gap_window_s": max(gaps_window, default=None),
        "replicas_back_s": result.replicas_back_s,
        "clients_recovered_s": max(bad, default=t0) - t0,
        "nodes_before": result.nodes_before,
    }


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def rss_bytes(pid: int) -> int:
    """Resident set size of a local process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


RSS_EVERY_S = 30.0


def soak(url: str, app: str, out: Path, users: int, minutes: float, warmup_s: float = 60.0) -> Result:
    """`users` for `minutes` with no fault; every replica's RSS from the end of warm-up on, every RSS_EVERY_S."""
    from deployments.faults import replica_pids

    workload = Workload(prompt_words=(8, 24), max_tokens=32, ignore_eos=True)
    test = LoadTest(url=url, out=out, users=users, duration_s=minutes * 60, grace_s=30.0, workload=workload)
    locust = threading.Thread(target=run_loadtest, args=(test,), daemon=True)
    deployments = ("Ingress", "Router", "ExpertShard-0", "ExpertShard-1")
    locust.start()
    time.sleep(warmup_s)
    series = {f"{d}/{pid}": [] for d in deployments for pid in replica_pids(app, d)}
    end_at = time.time() + minutes * 60 - warmup_s - 5
    next_at = time.time()
    while locust.is_alive():
        if time.time() >= next_at:
            for key, values in series.items():  # a replica that died would raise here
                values.append(rss_bytes(int(key.split("/")[1])))
            next_at += RSS_EVERY_S
        if time.time() >= end_at:
            break
        time.sleep(1.0)
    for key, values in series.items():
        values.append(rss_bytes(int(key.split("/")[1])))
    locust.join()
    records = read_records(out / "requests.jsonl")
    return Result("soak", records, fault_at=time.time(), replicas_back_s=None, rss=series)


def rss_growth(values: list[int]) -> tuple[float, float]:
    """(growth from the first sample to the last, growth over the second half of the samples): a leak
    keeps growing in the second half, memory that settles after warm-up does not."""
    return values[-1] / values[0] - 1, values[-1] / values[len(values) // 2] - 1


@contextmanager
def local_cluster(multinode: bool, metrics_port: int | None = None) -> Iterator[tuple[str, Callable[[], str] | None]]:
    """A Ray cluster on this machine with Serve's proxy on 127.0.0.1: one node, or (multinode) a head that
    runs the Ingress and two worker nodes advertising WORKER, with a function that removes one of them.
    metrics_port (one node only): Ray's metrics agent exports there, every second."""
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}}
    cluster, remove_node = None, None
    if multinode:
        from ray.cluster_utils import Cluster

        # Fast node-death detection (the default takes ~30 s): a removed node is declared dead in ~5 s. Not 3:
        # on a busy 2-core machine the head's own raylet once missed 3 s of heartbeats and was declared dead.
        system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
        store = 256 * 2**20  # object store per node: calls are small, and three nodes share this machine
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {HEAD: 10},
                          "object_store_memory": store, "_system_config": system, "temp_dir": temp_dir})  # fmt: skip
        workers = [cluster.add_node(num_cpus=8, resources={WORKER: 10}, object_store_memory=store) for _ in range(2)]
        ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)

        def remove_node() -> str:
            cluster.remove_node(workers[0], allow_graceful=False)  # its raylet and every process on it die
            return workers[0].node_id

    else:
        metrics = (
            {}
            if metrics_port is None
            else {"_metrics_export_port": metrics_port, "_system_config": {"metrics_report_interval_ms": 1000}}
        )
        ray.init(address="local", num_cpus=16, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 runtime_env=env, **metrics)  # fmt: skip
    port = free_port()
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}", remove_node
    finally:
        serve.shutdown()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = ", ".join(SCENARIOS)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from: {choices}")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of load per scenario")
    parser.add_argument("--fault-at", type=float, default=15.0, help="seconds into the load the replica is killed")
    parser.add_argument("--window", type=float, default=10.0, help="seconds after the fault counted as its window")
    parser.add_argument("--health-check-periods", default=None,
                        help="failover.health_check_period_s values (comma-separated): a run of each")  # fmt: skip
    parser.add_argument("--soak", action="store_true", help="the soak run instead of the fault scenarios")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--out", default=".data/resilience")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    periods = [float(p) for p in args.health_check_periods.split(",")] if args.health_check_periods else [None]
    if unknown := [n for n in names if n not in SCENARIOS]:
        parser.error(f"--scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")

    from ray import serve

    from serving.demo import make_demo

    out = Path(args.out)
    demo = out / "demo-mixtral"
    if not (demo / "config.json").exists():
        make_demo(demo, "mixtral", progress=False)
    base = {"model": str(demo.resolve()), "served_model_name": "demo"}
    rows = []
    if args.soak:
        with local_cluster(multinode=False) as (serve_url, _):
            url = deploy_app(serve_url, "soak", {**base, "shards": 2})
            result = soak(url, "soak", out / "soak", args.users, args.soak_minutes)
        growth = {k: rss_growth(v) for k, v in result.rss.items()}
        rows.append({"scenario": f"soak {args.soak_minutes:g} min, {args.users} users",
                     "requests": len(result.records), "failed": len(result.failed),
                     "rss_growth_max": f"{max(g for g, _ in growth.values()):+.1%}",
                     "rss_growth_second_half_max": f"{max(h for _, h in growth.values()):+.1%}",
                     "rss_growth": {k: f"{g:+.1%} (second half {h:+.1%})" for k, (g, h) in growth.items()},
                     "rss_mib": {k: [round(b / 2**20, 1) for b in v] for k, v in result.rss.items()}})  # fmt: skip
        columns = {"scenario": "scenario", "requests": "requests", "failed": "failed",
                   "largest RSS growth after warm-up": "rss_growth_max",
                   "largest in the second half": "rss_growth_second_half_max"}  # fmt: skip
    else:
        for period, name in itertools.product(periods, names):
            scenario = SCENARIOS[name]
            app = {**base, **scenario.app}
            if period is not None:
                app["failover"] = {**app.get("failover", {}), "health_check_period_s": period}
            if scenario.rag:
                app["retrieval"] = {"store_path": str(out / "qdrant"), "ingest_on_start": ["README.md", "docs"]}
            update = None
            with local_cluster(multinode=scenario.fault == "remove-node") as (serve_url, remove_node):
                if scenario.fault == "update":  # deployed as `serve deploy` does, to be updated the same way
                    serve_deploy(name, app)
                    url = f"{serve_url}/{name}"
                    wait_ready(url)
                    update = functools.partial(serve_deploy, name, new_version(app, out))
                else:
                    url = deploy_app(serve_url, name, app)
                duration = max(args.duration, scenario.min_duration_s)
                result = run_scenario(
                    url, name, scenario, out / name, args.users, duration, args.fault_at, remove_node, update
                )
                serve.delete(name)
            row = analyse(result, args.window)
            row["expect"] = scenario.expect
            row["health_check_s"] = "default" if period is None else f"{period:g}"
            rows.append(row)
        columns = {"scenario": "scenario", "health check (s)": "health_check_s", "expected": "expect",
                   "requests": "requests", "failed": "failed",
                   "TTFT p99 before / window (s)": "ttft", "ITL p99 before / window (s)": "itl",
                   "longest gap (s)": "longest_gap_window_s", "replicas back (s)": "replicas_back_s",
                   "clients recovered (s)": "clients_recovered_s"}  # fmt: skip
        for row in rows:
            row["ttft"] = f"{fmt(row['ttft_p99_before_s'])} / {fmt(row['ttft_p99_window_s'])}"
            row["itl"] = f"{fmt(row['itl_p99_before_s'])} / {fmt(row['itl_p99_window_s'])}"
            for key in ("longest_gap_window_s", "replicas_back_s", "clients_recovered_s"):
                row[key] = fmt(row[key])
    meta = machine_meta(users=args.users, duration_s=args.duration, fault_at_s=args.fault_at, window_s=args.window)
    write_report(str(out), "soak" if args.soak else "resilience", meta, rows, columns)
    for row in rows:
        for key in ("errors", "rss_growth"):
            if row.get(key):
                print(f"{row['scenario']}: " + json.dumps(row[key], indent=1))


if __name__ == "__main__":
    main()
