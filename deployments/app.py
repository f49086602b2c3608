"""`build_app(args)`: validate the config once, place the experts, and bind the deployments.

serve run configs/demo.yaml            # import_path: deployments.app:build_app, args: {...}
serve.run(build_app({"model": ".data/demo-mixtral", "shards": 2, "retrieval": {"ingest_on_start": ["docs"]}}))
serve.run(build_app({"model": ".data/demo-mixtral", "engine": "vllm"}))   # vLLM behind the same Ingress
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import DEFAULT_METRICS_INTERVAL_S

from deployments.autoscaling import POLICY
from deployments.config import AppConfig
from deployments.engine_deployment import EngineFactory, EngineReplica, NativeEngineFactory, VLLMEngineFactory
from deployments.ingress import Ingress
from deployments.retriever_deployment import Retriever
from deployments.shard_deployment import ExpertShard
from router.placement import LayeredPlacement, PlacementError, build_placement
from router.rebalance import read_placement
from serving.model.config import ModelConfig
from serving.vllm_engine import require_vllm, vllm_env


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def validate(args: dict[str, Any] | AppConfig) -> AppConfig:
    """The validated config, with its paths made absolute (replicas may run in another folder)."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    update: dict[str, Any] = {"model": _absolute(cfg.model)}
    if cfg.placement_file is not None:
        update["placement_file"] = _absolute(cfg.placement_file)
    if cfg.retrieval is not None:
        paths = {"store_path": _absolute(cfg.retrieval.store_path)}
        paths["ingest_on_start"] = [_absolute(p) for p in cfg.retrieval.ingest_on_start]
        update["retrieval"] = cfg.retrieval.model_copy(update=paths)
    return cfg.model_copy(update=update)


def plan_placement(cfg: AppConfig) -> LayeredPlacement | None:
    """Which shard holds which experts in each MoE layer; None when the experts stay in the router (shards=0)."""
    if cfg.shards == 0:
        return None
    model = ModelConfig.from_pretrained(cfg.model)
    layers = len(model.moe_layer_ids)
    if cfg.placement == "file":
        assert cfg.placement_file is not None  # the config's validator: required with placement: file
        return _fits(
            read_placement(cfg.placement_file, model.num_experts), layers, cfg, f"placement_file {cfg.placement_file}"
        )
    if cfg.placement == "explicit" and cfg.explicit_per_layer:
        return _fits(
            LayeredPlacement.from_json(cfg.explicit_placement, model.num_experts), layers, cfg, "explicit_placement"
        )
    flat = cfg.explicit_placement if cfg.placement == "explicit" else None
    return LayeredPlacement.uniform(build_placement(cfg.placement, model.num_experts, cfg.shards, flat), layers)


def _fits(layered: LayeredPlacement, layers: int, cfg: AppConfig, source: str) -> LayeredPlacement:
    """`layered`, once it has the model's MoE layers and the config's shards (else a PlacementError naming `source`)."""
    if (layered.num_layers, layered.num_shards) != (layers, cfg.shards):
        raise PlacementError(
            f"{source}: {layered.num_layers} layers of {layered.num_shards} shards, but "
            f"the model has {layers} MoE layers and the config shards={cfg.shards}"
        )
    return layered


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Ingress -> the engine (Router + ExpertShards, or VLLMEngine) and, with `retrieval`, the Retriever."""
    cfg = validate(args)
    config = cfg.model_dump()
    factory = _vllm_engine(cfg, config) if cfg.engine == "vllm" else _native_engine(cfg, config)
    surge = cfg.failover.update_surge_percent  # a rolling update starts new replicas before it stops old ones
    checks = cfg.failover.health_check_period_s  # a dead replica is restarted once a check notices it
    options = cfg.replica_options(cfg.router_resources, engine_env(cfg))
    # A stopping router (rolling update, scale-down) gets router_drain_s to end its streams; the Ingress
    # moves any still running then to a live router, so it is the Ingress that must outlast it.
    engine = EngineReplica.options(
        name=factory.deployment_name,
        num_replicas=cfg.routers,
        ray_actor_options=options,
        graceful_shutdown_timeout_s=cfg.failover.router_drain_s,
        max_surge_percent=surge,
        health_check_period_s=checks,
    ).bind(factory)
    retriever = None
    if cfg.retrieval is not None:
        retriever = Retriever.options(
            num_replicas=cfg.retrieval.replicas,
            ray_actor_options=cfg.retrieval.resources.ray_options(),
            max_surge_percent=surge if cfg.retrieval.qdrant_url else 0,  # an embedded store opens once
            health_check_period_s=checks,
        ).bind(config)
    ingress = Ingress.options(
        ray_actor_options=cfg.ingress_resources.ray_options(),
        graceful_shutdown_timeout_s=cfg.failover.ingress_drain_s,
        max_surge_percent=surge,
        health_check_period_s=checks,
    )
    return ingress.bind(config, engine, retriever)


def engine_env(cfg: AppConfig) -> dict[str, str]:
    """Environment variables of the engine's replicas (Router or VLLMEngine), set before their process starts.

    A native router with CPU shards lets its idle OpenMP workers sleep at once (OMP_WAIT_POLICY=PASSIVE):
    it waits on the shards for part of every step, and workers spinning through that wait (libgomp's
    default: up to ~3 ms after each parallel region) take cores the shards on the same node need. Measured
    on bench, 2 shards on the 2-core machine, 1 user: 21-23 output tok/s spinning, 23.6-25.3 passive. With
    the experts in process, nothing else is waiting for those cores, and spinning is what makes the many
    small parallel ops of a decode step fast, so it stays. Where the shards compute on other nodes, nothing
    competes for the router's cores and passive only costs (~7.6 ms a batch-1 step on bench, benchmarks/README.md
    "Where a sharded step's time goes"): router_resources.env_vars {OMP_WAIT_POLICY: null} leaves it unset."""
    if cfg.engine == "vllm":
        return vllm_env(cfg.accelerator)
    if cfg.accelerator == "cpu" and cfg.shards > 0:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}


def _native_engine(cfg: AppConfig, config: dict) -> EngineFactory:
    """Router replicas sharing the ExpertShard-<i> deployments (experts in the router with shards: 0)."""
    placement = plan_placement(cfg)
    shards = [
        ExpertShard.options(
            name=f"ExpertShard-{i}",
            **shard_replicas(cfg, i),
            ray_actor_options=cfg.replica_options(cfg.shard_resources),
            max_surge_percent=cfg.failover.update_surge_percent,
            health_check_period_s=cfg.failover.health_check_period_s,
        ).bind(
            cfg.model,
            i,
            [list(ids) for ids in placement.experts_of(i)],  # per MoE layer
            cfg.engine_config.model_dump(),
            cfg.accelerator,
            model_name=cfg.model_name,
            router_wait_s=cfg.failover.router_wait_s,
            transport=cfg.transport,
            direct_rows=cfg.direct_rows,
        )
        for i in range(placement.num_shards if placement else 0)
    ]
    return NativeEngineFactory(config, placement, shards)


def shard_replicas(cfg: AppConfig, shard: int) -> dict[str, Any]:
    """Serve options that size ExpertShard-<shard>: num_replicas, or an autoscaling_config of its own (Serve
    wants num_replicas unset then) on the expert rows it computes (deployments/autoscaling.py)."""
    if (scaling := cfg.shard_autoscaling) is None:
        return {"num_replicas": cfg.shard_replicas}
    own = scaling.for_shard(shard)
    target = own.target_expert_rows_per_s
    autoscaling = {
        "min_replicas": own.min_replicas,
        "max_replicas": own.max_replicas,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        "look_back_period_s": scaling.look_back_period_s,
        "policy": {"policy_function": POLICY, "policy_kwargs": {"target_expert_rows_per_s": target}},
    }
    if scaling.metrics_interval_s != DEFAULT_METRICS_INTERVAL_S:  # Serve warns on any other value (deprecated)
        autoscaling["metrics_interval_s"] = scaling.metrics_interval_s
    return {"autoscaling_config": autoscaling}


def _vllm_engine(cfg: AppConfig, config: dict) -> EngineFactory:
    """VLLMEngine replicas (`routers` of them), each running the whole model in vLLM."""
    require_vllm()  # not installed: a ConfigError saying how, before any replica starts
    return VLLMEngineFactory(config)
