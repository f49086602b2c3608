"""Faults under load: `moe-serve loadtest`'s locust runner drives the demo app on a local Ray cluster while
a real replica process is SIGKILLed at a set time (deployments/faults.py); then what the clients saw.

    python -m benchmarks.resilience [--scenarios shard-replica,router] [--users 6] [--duration 40]
                                    [--fault-at 15] [--out .data/resilience]
    python -m benchmarks.resilience --soak [--soak-minutes 10] [--users 16]

Per scenario: requests, failed (and their errors), TTFT and ITL p99 before the fault and in the fault
window (the `--window` seconds after it), the longest inter-token gap in the window, and two recovery
times: until the killed deployment has its replicas again (Serve's restart), and until the clients
recovered (the last failed request or gap longer than max(1 s, 3 x ITL p99 before) after the fault).
The soak row: 0 errors over the run, and every replica's RSS at the end against after warm-up.

Scenarios (the app is the demo model, 2 expert shards, streaming, ignore_eos):
    shard-replica   1 of 2 replicas of ExpertShard-0     -> 0 failed, a retry on the twin
    shard-only      the only replica of ExpertShard-1    -> 0 failed, requests hold while Serve restarts it
    router          1 of 2 Router replicas               -> 0 failed, streams migrate to the other router
    router-only     the only Router (router_wait_s 3 s)  -> 503 with Retry-After until Serve restarts it
    retriever       the Retriever, RAG requests          -> 0 failed: answers without context meanwhile
    node            a worker node removed (its raylet and every process on it) from a 3-node
                    `ray.cluster_utils.Cluster`; routers and shard replicas pinned to the 2 worker nodes
                    by a custom resource, as KubeRay worker groups advertise them -> 0 failed
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import machine_meta, write_report
from deployments.local_cluster import deploy_app, free_port
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
    deployment: str | None  # the deployment one of whose replicas is killed; None: a worker node is removed
    rag: bool = False
    expect: str = "0 failed"


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("shard-replica", {"shards": 2, "shard_replicas": 2}, "ExpertShard-0"),
        Scenario("shard-only", {"shards": 2}, "ExpertShard-1"),
        Scenario("router", {"shards": 2, "routers": 2}, "Router"),
        Scenario("router-only", {"shards": 2, "failover": {"router_wait_s": 3.0}}, "Router", expect="503 only"),
        Scenario("retriever", {"shards": 2}, "Retriever", rag=True),
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
            None,
        ),  # fmt: skip
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
    rss: dict[str, tuple[int, int]] = field(default_factory=dict)  # soak: replica -> (after warm-up, end) bytes

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
) -> Result:
    """Locust against `url` for `duration_s`; at `fault_at_s` one replica of the scenario's deployment is
    killed (or, for the node scenario, `remove_node()` removes a worker node)."""
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
    if scenario.deployment is not None:
        kill_replica(app, scenario.deployment)
    else:
        assert remove_node is not None, "the node scenario needs a node to remove"
        gone = remove_node()
    replicas_back_s = None
    while locust.is_alive() or replicas_back_s is None:
        live = {d: [n for n in replica_nodes(app, d) if n != gone] for d in watched}
        if replicas_back_s is None and all(len(live[d]) >= n for d, n in replicas.items()):
            replicas_back_s = time.time() - fault_at
        if time.time() - fault_at > 300:
            break
        locust.join(timeout=0.5)
    return Result(scenario.name, read_records(out / "requests.jsonl"), fault_at, replicas_back_s, nodes_before)


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


def soak(url: str, app: str, out: Path, users: int, minutes: float, warmup_s: float = 60.0) -> Result:
    """`users` for `minutes` with no fault; every replica's RSS after warm-up and at the end."""
    from deployments.faults import replica_pids

    workload = Workload(prompt_words=(8, 24), max_tokens=32, ignore_eos=True)
    test = LoadTest(url=url, out=out, users=users, duration_s=minutes * 60, grace_s=30.0, workload=workload)
    locust = threading.Thread(target=run_loadtest, args=(test,), daemon=True)
    deployments = ("Ingress", "Router", "ExpertShard-0", "ExpertShard-1")
    locust.start()
    time.sleep(warmup_s)
    start = {f"{d}/{pid}": rss_bytes(pid) for d in deployments for pid in replica_pids(app, d)}
    end_at = time.time() + minutes * 60 - warmup_s - 5
    while time.time() < end_at and locust.is_alive():
        time.sleep(1.0)
    end = {key: rss_bytes(int(key.split("/")[1])) for key in start}  # a replica that died would raise here
    locust.join()
    records = read_records(out / "requests.jsonl")
    return Result("soak", records, fault_at=time.time(), replicas_back_s=None,
                  rss={k: (start[k], end[k]) for k in start})  # fmt: skip


@contextmanager
def local_cluster(multinode: bool) -> Iterator[tuple[str, Callable[[], str] | None]]:
    """A Ray cluster on this machine with Serve's proxy on 127.0.0.1: one node, or (multinode) a head that
    runs the Ingress and two worker nodes advertising WORKER, with a function that removes one of them."""
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}}
    cluster, remove_node = None, None
    if multinode:
        from ray.cluster_utils import Cluster

        # Fast node-death detection (the default takes ~30 s): a removed node is declared dead in ~3 s.
        system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
        store = 256 * 2**20  # object store per node: calls are small, and three nodes share this machine
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {HEAD: 10},
                          "object_store_memory": store, "_system_config": system, "temp_dir": temp_dir})  # fmt: skip
        workers = [cluster.add_node(num_cpus=8, resources={WORKER: 10}, object_store_memory=store) for _ in range(2)]
        ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)

        def remove_node() -> str:
            cluster.remove_node(workers[0], allow_graceful=False)  # its raylet and every process on it die
            return workers[0].node_id

    else:
        ray.init(address="local", num_cpus=16, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 runtime_env=env)  # fmt: skip
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
    parser.add_argument("--soak", action="store_true", help="the soak run instead of the fault scenarios")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--out", default=".data/resilience")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
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
        growth = {k: end / start - 1 for k, (start, end) in result.rss.items()}
        rows.append({"scenario": f"soak {args.soak_minutes:g} min, {args.users} users",
                     "requests": len(result.records), "failed": len(result.failed),
                     "rss_growth_max": f"{max(growth.values()):+.1%}",
                     "rss_growth": {k: f"{v:+.1%}" for k, v in growth.items()}})  # fmt: skip
        columns = {"scenario": "scenario", "requests": "requests", "failed": "failed",
                   "largest RSS growth after warm-up": "rss_growth_max"}  # fmt: skip
    else:
        for name in names:
            scenario = SCENARIOS[name]
            app = {**base, **scenario.app}
            if scenario.rag:
                app["retrieval"] = {"store_path": str(out / "qdrant"), "ingest_on_start": ["README.md", "docs"]}
            with local_cluster(multinode=scenario.deployment is None) as (serve_url, remove_node):
                url = deploy_app(serve_url, name, app)
                result = run_scenario(
                    url, name, scenario, out / name, args.users, args.duration, args.fault_at, remove_node
                )
                serve.delete(name)
            row = analyse(result, args.window)
            row["expect"] = scenario.expect
            rows.append(row)
        columns = {"scenario": "scenario", "expected": "expect", "requests": "requests", "failed": "failed",
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
        if row.get("errors"):
            print(f"{row['scenario']}: " + json.dumps(row["errors"]))


if __name__ == "__main__":
    main()
