"""Online rebalancing on Ray Serve: plan a placement from the routers' expert load, deploy it as a rolling update.

    >>> rebalancer = Rebalancer(config, router_handle, RouterLoads(router_handle), app_name="moe", sink=RaySink())
    >>> await rebalancer.rebalance(redundant=None, dry_run=False)    # POST /v1/admin/rebalance
    {"applied": True, "current_balancedness": 0.58, "balancedness": 0.97, "placement": [...], ...}
    >>> rebalancer.start_watching()                                 # with rebalance.auto_below: by itself

Each step, and why:
- Load: RouterLoads adds up every Router replica's window (deployments/expert_load.py).
- Plan: one Router replica plans (EngineReplica.plan_rebalance): it has torch and the placement it serves, the
  Ingress has neither. The report holds the plan and the served placement's balancedness under that load.
- Deploy: the app is deployed again with the plan as `placement: explicit` (one list of shards per MoE
  layer), through the controller's declarative API, what `serve deploy` and KubeRay's serveConfigV2 use: the
  app's declared config (or, for an app started by `serve.run`, the config this Ingress was built from) with
  its placement replaced, every other declared app as it is. Serve then rolls the app out as for any changed
  config (README, "Failures"): with failover.update_surge_percent the new ExpertShard replicas load their new
  experts while the old ones serve, each new shard reports ready once a router of its version is up, new
  requests go to the new routers, and a stream left on an old router whose shards are gone moves, with its
  tokens, to a new one. No weights move inside a running replica, and no request is lost.
- Trigger: on request, or when the served placement's balancedness stays below rebalance.auto_below for a
  whole load window (BelowFor) and a plan beats it by rebalance.min_gain. The new app version comes with new
  routers, whose windows start empty: rebalance.min_rows keeps the next check from judging a thin window.

On KubeRay the RayService's serveConfigV2 stays as it was written: the operator deploys it again when the
custom resource changes, which puts the old placement back. Copy the plan into serveConfigV2
(`moe-serve rebalance --url URL --json` prints it) to keep it (docs/kubernetes.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from deployments.expert_load import RouterLoads
from deployments.remote_errors import unwrapped
from serving.errors import RebalanceConflictError, RequestError
from serving.metrics import REBALANCES, MetricsSink
from serving.rebalancing import BelowFor

# Serve's logger: what it logs goes to the replica's log file with Serve's own lines, at INFO (ours would not)
log = logging.getLogger("ray.serve")

IMPORT_PATH = "deployments.app:build_app"
BETTER_BY = 1e-6  # a requested plan is deployed when it beats the served placement by more than rounding


class Rebalancer:
    """RebalanceTarget (serving/rebalancing.py) for the Ingress of app `app_name`, built from `config`."""

    def __init__(
        self,
        config: dict,
        router: DeploymentHandle,
        loads: RouterLoads,
        app_name: str,
        sink: MetricsSink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.cfg = config, AppConfig.model_validate(config)
        self.router, self.loads, self.app_name, self.sink, self.clock = router, loads, app_name, sink, clock
        self.labels = {"model": self.cfg.model_name}
        settings = self.cfg.rebalance
        below = settings.auto_below
        self.trigger = None if below is None else BelowFor(below, self.cfg.engine_config.expert_load_window_s)
        self._lock = asyncio.Lock()  # one plan-and-deploy at a time from this Ingress
        self._task: asyncio.Task | None = None

    async def rebalance(self, redundant: int | None, dry_run: bool) -> dict[str, Any]:
        """Plan from the routers' load; deploy the plan unless `dry_run` or it is no better than the placement
        served. RebalanceConflictError when an update is under way or the window is too thin."""
        async with self._lock:
            report = await self._plan(redundant)
            if dry_run:
                return {**report, "applied": False, "reason": "dry run: nothing deployed"}
            gain = report["balancedness"] - report["current_balancedness"]
            if gain <= BETTER_BY:
                said = f"the placement served is as balanced as the plan ({report['current_balancedness']:.3f})"
                return {**report, "applied": False, "reason": said}
            await self._deploy(report, trigger="request")
            before, after = report["current_balancedness"], report["balancedness"]
            said = f"rolling update started: balancedness {before:.3f} -> {after:.3f}"
            return {**report, "applied": True, "reason": said}

    async def _plan(self, redundant: int | None) -> dict[str, Any]:
        redundant = self.cfg.rebalance.redundant if redundant is None else redundant
        load = await self.loads.expert_load()
        rows = min(map(sum, load.load))  # every MoE layer routes top_k rows per token
        if rows < self.cfg.rebalance.min_rows:
            raise RebalanceConflictError(
                f"the routers' window holds {rows} rows per MoE layer, fewer than rebalance.min_rows="
                f"{self.cfg.rebalance.min_rows}: too little load to plan from; retry once traffic has run"
            )
        with unwrapped((RequestError,)):  # the router's RequestError (a redundant count that cannot be placed): 400
            report = await self.router.plan_rebalance.remote(load, redundant)
        return {**report, "redundant": redundant, "rows": rows}

    async def _deploy(self, report: dict[str, Any], trigger: str) -> None:
        status = await asyncio.to_thread(_app_status, self.app_name)
        if status != "RUNNING":
            raise RebalanceConflictError(
                f"app {self.app_name!r} is {status}, not RUNNING: an update is under way; retry once it is done"
            )
        await asyncio.to_thread(_redeploy, self.app_name, self.config, report["placement"])
        self.sink.record(REBALANCES, 1, {**self.labels, "trigger": trigger})
        log.info(
            "rebalance (%s): balancedness %.3f -> %.3f, rolling update of app %r started",
            trigger, report["current_balancedness"], report["balancedness"], self.app_name,
        )  # fmt: skip

    def start_watching(self) -> None:
        """Check the load every rebalance.check_every_s and rebalance when auto_below says (no-op without it)."""
        if self.trigger is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        settings = self.cfg.rebalance
        while True:
            await asyncio.sleep(settings.check_every_s)
            try:
                await self._check()
            except RebalanceConflictError as e:
                log.info("rebalance check: %s", e)
            except Exception:  # a router restarting, a controller call failing: the next check tries again
                log.exception("rebalance check failed; trying again in %g s", settings.check_every_s)

    async def _check(self) -> None:
        assert self.trigger is not None
        async with self._lock:
            report = await self._plan(None)
            current, planned = report["current_balancedness"], report["balancedness"]
            if not self.trigger.update(self.clock(), current):
                return
            if planned - current < self.cfg.rebalance.min_gain:
                log.info("rebalance check: served %.3f, plan %.3f: gain under min_gain, kept", current, planned)
                return
            await self._deploy(report, trigger="auto")
            self.trigger.reset()


def _app_status(app_name: str) -> str:
    """The app's status name (RUNNING, DEPLOYING, ...); DELETED when there is no such app."""
    app = serve.status().applications.get(app_name)
    return (
        "DELETED" if app is None else str(getattr(app.status, "value", app.status))
    )  # str() of the enum has its class


def _redeploy(app_name: str, config: dict, placement: list) -> None:
    """Deploy app `app_name` again with `placement` (per MoE layer) through the declarative API, leaving every
    other declared app as it is (module docstring). Called in the app's Ingress replica."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema, ServeInstanceDetails

    client = _get_global_client()
    details = ServeInstanceDetails(**client.get_serve_details())
    ours = details.applications[app_name]
    declared = {name: app.deployed_app_config for name, app in details.applications.items() if app.deployed_app_config}
    placed = {"placement": "explicit", "explicit_placement": placement, "placement_file": None}
    if app_name in declared:  # serve deploy / KubeRay: the config as declared, its placement replaced
        app = declared[app_name]
        declared[app_name] = app.model_copy(update={"args": {**app.args, **placed}})
    else:  # started by serve.run: this Ingress's config (validated, paths absolute), in the job's runtime env
        declared[app_name] = ServeApplicationSchema(
            name=app_name,
            route_prefix=ours.route_prefix,
            import_path=IMPORT_PATH,
            args={**config, **placed},
            runtime_env=dict(ray.get_runtime_context().runtime_env),  # this replica's: what serve.run gave the app
        )
    options = {"proxy_location": details.proxy_location, "target_capacity": details.target_capacity}
    if details.http_options is not None:
        options["http_options"] = details.http_options
    client.deploy_apps(ServeDeploySchema(applications=list(declared.values()), **options))
