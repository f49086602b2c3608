"""Fault injection for tests and benchmarks: SIGKILL a real replica process of a running app.

>>> pid = kill_replica("moe", "Router")          # one Router replica of app "moe" dies at once
>>> replica_pids("moe", "ExpertShard-0")          # [pid, ...] of the live replicas
>>> replica_nodes("moe", "ExpertShard-0")         # [node id, ...]: where they run

Replicas are found as Serve names them (actor SERVE_REPLICA::<app>#<deployment>#<id> in namespace
"serve"); each is asked for its pid, then killed with SIGKILL, so nothing in it runs a handler: what
the cluster does next is what it does when a process or its machine is lost.
"""

from __future__ import annotations

import os
import signal

import ray

SERVE_NAMESPACE = "serve"


def replica_pids(app: str, deployment: str) -> list[int]:
    """Process ids of the live replicas of `deployment` in `app`, sorted (on one machine, also those of
    other raylet nodes: `ray.cluster_utils.Cluster` runs them all here)."""
    return sorted(pid for pid, _ in _ask_replicas(app, deployment, _pid_and_node))


def replica_nodes(app: str, deployment: str) -> list[str]:
    """The Ray node id of each live replica of `deployment` in `app` (one entry per replica)."""
    return sorted(node for _, node in _ask_replicas(app, deployment, _pid_and_node))


def _ask_replicas(app: str, deployment: str, fn) -> list:
    answers = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == SERVE_NAMESPACE and actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"):
            try:  # the actor may die between the listing and the lookup: a removed node takes it at any time
                handle = ray.get_actor(actor["name"], namespace=SERVE_NAMESPACE)
                answers.append(ray.get(handle.__ray_call__.remote(fn), timeout=10))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
                continue  # dead or dying already
    return answers


def kill_replica(app: str, deployment: str, which: int = 0) -> int:
    """SIGKILL one live replica of `deployment` (the `which`-th by pid); returns its pid."""
    pids = replica_pids(app, deployment)
    if not pids:
        raise LookupError(f"app {app!r} has no live replica of deployment {deployment!r}")
    pid = pids[which % len(pids)]
    os.kill(pid, signal.SIGKILL)
    return pid


def _pid_and_node(_instance) -> tuple[int, str]:
    return os.getpid(), ray.get_runtime_context().get_node_id()
