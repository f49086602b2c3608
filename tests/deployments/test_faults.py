"""deployments.faults finds live replicas even when one dies between the listing and the lookup.

A removed node takes its replicas with it at any moment, so `replica_nodes` (which the node scenario
polls while the node goes) can list a replica's actor name and find it gone a moment later. Two real
named actors stand for two replicas; one is killed exactly inside that gap.
"""

from __future__ import annotations

import os

import ray

from deployments import faults


@ray.remote(num_cpus=0)
class Replica:
    def pid(self) -> int:
        return os.getpid()


def test_a_replica_dying_between_listing_and_lookup_is_skipped(serve_url, monkeypatch):
    names = ["SERVE_REPLICA::faults#Dep#live", "SERVE_REPLICA::faults#Dep#dies"]
    live, dies = (Replica.options(name=n, namespace=faults.SERVE_NAMESPACE).remote() for n in names)
    live_pid = ray.get(live.pid.remote())
    ray.get(dies.pid.remote())
    listed = ray.util.list_named_actors

    def list_then_kill(all_namespaces: bool = False):
        actors = listed(all_namespaces=all_namespaces)
        ray.kill(dies, no_restart=True)  # listed, and now gone: get_actor on its name raises
        return actors

    monkeypatch.setattr(ray.util, "list_named_actors", list_then_kill)
    assert faults.replica_pids("faults", "Dep") == [live_pid]
    ray.kill(live, no_restart=True)
