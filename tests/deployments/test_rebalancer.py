"""The Rebalancer's decisions, without a cluster: when it deploys a plan, when it refuses, and the automatic
trigger's window. The router's planning and the controller calls are replaced; test_rebalance.py runs them for real."""

from __future__ import annotations

import asyncio

import pytest

import deployments.rebalancer as rebalancer_module
from deployments.rebalancer import Rebalancer
from serving.errors import RebalanceConflictError
from serving.expert_load import ExpertLoad
from serving.metrics import REBALANCES

LOAD = ExpertLoad((0, 1), 4, 5.0, ((500, 300, 150, 50), (250, 250, 250, 250)))


class PlanningRouter:
    """The Router handle's plan_rebalance, answering a report with the given balancedness."""

    def __init__(self, current: float, planned: float):
        self.current, self.planned, self.calls = current, planned, 0
        self.plan_rebalance = self

    async def remote(self, load: ExpertLoad, redundant: int) -> dict:
        self.calls += 1
        return {
            "balancedness": self.planned,
            "current_balancedness": self.current,
            "balancedness_per_layer": [self.planned] * 2,
            "current_balancedness_per_layer": [self.current] * 2,
            "contiguous_balancedness": self.current,
            "contiguous_balancedness_per_layer": [self.current] * 2,
            "placement": [[[0, 1], [2, 3]], [[0, 1], [2, 3]]],
        }


class Loads:
    def __init__(self, load: ExpertLoad = LOAD):
        self.load = load

    async def expert_load(self) -> ExpertLoad:
        return self.load


class Sink:
    def __init__(self):
        self.records = []

    def record(self, metric, value, labels):
        self.records.append((metric.name, value, labels))


@pytest.fixture
def deployed(monkeypatch):
    """The placements _redeploy was called with; the app RUNNING unless a test says otherwise."""
    calls = []
    monkeypatch.setattr(rebalancer_module, "_redeploy", lambda app, config, placement: calls.append(placement))
    monkeypatch.setattr(rebalancer_module, "_app_status", lambda app: "RUNNING")
    return calls


def make(router, rebalance=None, sink=None, clock=None) -> Rebalancer:
    config = {"model": "x", "engine_config": {"expert_load_window_s": 5}, "rebalance": rebalance or {"min_rows": 100}}
    return Rebalancer(config, router, Loads(), "moe", sink or Sink(), **({"clock": clock} if clock else {}))


def test_a_requested_plan_is_deployed_only_when_it_is_better(deployed):
    sink = Sink()
    outcome = asyncio.run(make(PlanningRouter(0.6, 0.95), sink=sink).rebalance(None, dry_run=False))
    assert outcome["applied"] and deployed == [outcome["placement"]] and outcome["rows"] == 1000
    assert sink.records == [(REBALANCES.name, 1, {"model": "x", "trigger": "request"})]
    same = asyncio.run(make(PlanningRouter(0.95, 0.95)).rebalance(None, dry_run=False))
    assert not same["applied"] and "as balanced as the plan" in same["reason"] and len(deployed) == 1
    dry = asyncio.run(make(PlanningRouter(0.6, 0.95)).rebalance(3, dry_run=True))
    assert not dry["applied"] and dry["redundant"] == 3 and len(deployed) == 1


def test_a_thin_window_or_an_update_under_way_is_a_conflict(deployed, monkeypatch):
    thin = make(PlanningRouter(0.6, 0.95), rebalance={"min_rows": 2000})
    with pytest.raises(RebalanceConflictError, match="holds 1000 rows per MoE layer, fewer than rebalance.min_rows"):
        asyncio.run(thin.rebalance(None, dry_run=False))
    monkeypatch.setattr(rebalancer_module, "_app_status", lambda app: "DEPLOYING")
    with pytest.raises(RebalanceConflictError, match="DEPLOYING, not RUNNING: an update is under way"):
        asyncio.run(make(PlanningRouter(0.6, 0.95)).rebalance(None, dry_run=False))
    assert deployed == []


def test_auto_rebalances_once_the_served_placement_stayed_below_for_a_window(deployed):
    clock = iter([0.0, 2.0, 4.9, 5.0, 6.0]).__next__
    sink = Sink()
    auto = make(PlanningRouter(0.6, 0.95), {"auto_below": 0.8, "min_rows": 100}, sink=sink, clock=clock)
    for _ in range(3):  # t = 0, 2, 4.9: below, but not yet for the 5 s window
        asyncio.run(auto._check())
    assert deployed == []
    asyncio.run(auto._check())  # t = 5.0
    assert len(deployed) == 1 and sink.records[-1][2]["trigger"] == "auto"
    asyncio.run(auto._check())  # t = 6.0: the run starts again after a deploy
    assert len(deployed) == 1


def test_auto_keeps_the_placement_when_the_plan_gains_too_little(deployed):
    clock = iter([0.0, 10.0]).__next__
    auto = make(PlanningRouter(0.6, 0.62), {"auto_below": 0.8, "min_gain": 0.05, "min_rows": 100}, clock=clock)
    asyncio.run(auto._check())
    asyncio.run(auto._check())
    assert deployed == []
