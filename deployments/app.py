"""`build_app(args)`: validate the config once, place the experts, and bind the deployments.

serve run configs/demo.yaml            # import_path: deployments.app:build_app, args: {...}
serve.run(build_app({"model": ".data/demo-mixtral", "shards": 2}))
serve.run(build_app({"model": ".data/demo-mixtral", "engine": "vllm"}))   # vLLM behind the same Ingress
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from deployments.config import AppConfig
from deployments.ingress import Ingress
from deployments.router_deployment import Router
from deployments.shard_deployment import ExpertShard
from deployments.vllm_deployment import VLLMEngine
from router.placement import Placement, build_placement
from serving.config import ModelConfig
from serving.vllm_engine import require_vllm, vllm_env


def validate(args: dict[str, Any] | AppConfig) -> AppConfig:
    """The validated config, with the model path made absolute (replicas may run elsewhere)."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    return cfg.model_copy(update={"model": str(Path(cfg.model).expanduser().resolve())})


def plan_placement(cfg: AppConfig) -> Placement | None:
    """Which shard holds which experts; None when the experts stay in the router (shards=0)."""
    if cfg.shards == 0:
        return None
    num_experts = ModelConfig.from_pretrained(cfg.model).num_experts
    return build_placement(cfg.placement, num_experts, cfg.shards, cfg.explicit_placement)


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    cfg = validate(args)
    if cfg.engine == "vllm":
        return build_vllm_app(cfg)
    placement = plan_placement(cfg)
    config = cfg.model_dump()
    shards = [
        ExpertShard.options(
            name=f"ExpertShard-{i}",
            num_replicas=cfg.shard_replicas,
            ray_actor_options=cfg.replica_options(cfg.shard_resources),
        ).bind(cfg.model, i, list(placement.experts_of(i)), cfg.engine_config.dtype)
        for i in range(placement.num_shards if placement else 0)
    ]
    router = Router.options(num_replicas=cfg.routers, ray_actor_options=cfg.replica_options(cfg.router_resources)).bind(
        config, placement, *shards
    )
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_resources.num_cpus}).bind(config, router)


def build_vllm_app(cfg: AppConfig) -> Application:
    """Ingress -> VLLMEngine replicas (`routers` of them), each running the whole model in vLLM."""
    require_vllm()  # not installed: a ConfigError saying how, before any replica starts
    options = cfg.replica_options(cfg.router_resources)
    options["runtime_env"] = {"env_vars": vllm_env(cfg.accelerator)}
    engine = VLLMEngine.options(num_replicas=cfg.routers, ray_actor_options=options).bind(cfg.model_dump())
    return Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_resources.num_cpus}).bind(
        cfg.model_dump(), engine
    )
