"""The app config: every YAML in the repo validates, placement errors name the expert, resources follow
the accelerator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.app import build_app, plan_placement, validate
from deployments.config import AppConfig
from router.placement import PlacementError

REPO = Path(__file__).resolve().parents[2]


def app_args_blocks():
    for file in sorted(REPO.glob("configs/*.yaml")):
        for app in yaml.safe_load(file.read_text()).get("applications", []):
            yield pytest.param(app, id=f"{file.name}:{app['name']}")


@pytest.mark.parametrize("app", list(app_args_blocks()))
def test_every_config_in_the_repo_validates(app):
    assert app["import_path"] == "deployments.app:build_app"
    AppConfig.model_validate(app["args"])


def test_unknown_field_is_named():
    with pytest.raises(ValidationError, match="shardz"):
        AppConfig.model_validate({"model": "x", "shardz": 2})


def test_placement_that_leaves_an_expert_on_no_shard_names_it(demo_dir):
    cfg = validate({"model": str(demo_dir), "shards": 2, "placement": "explicit",
                    "explicit_placement": [[0, 1, 2], [3, 4, 6]]})  # fmt: skip
    with pytest.raises(PlacementError, match=r"experts \[5, 7\] are on no shard"):
        plan_placement(cfg)


def test_uneven_contiguous_placement(demo_dir):
    placement = plan_placement(validate({"model": str(demo_dir), "shards": 3}))
    assert placement.num_layers == 2  # the demo's MoE layers, each the same
    assert all(layer.shards == ((0, 1, 2), (3, 4, 5), (6, 7)) for layer in placement.layers)


def test_a_placement_file_gives_each_layer_its_own_layout_and_a_wrong_one_is_named(demo_dir, tmp_path):
    """`placement: file` serves what `moe-serve rebalance --json` wrote (its other fields ignored)."""
    per_layer = [[[0, 1, 2, 3, 7], [4, 5, 6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7, 0]]]  # 7, then 0 held twice
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"balancedness": 0.9, "placement": per_layer}))
    cfg = validate({"model": str(demo_dir), "shards": 2, "placement": "file", "placement_file": str(path)})
    placement = plan_placement(cfg)
    assert [layer.shards for layer in placement.layers] == [
        ((0, 1, 2, 3, 7), (4, 5, 6, 7)),
        ((0, 2, 4, 6), (0, 1, 3, 5, 7)),
    ]
    path.write_text(json.dumps({"placement": per_layer[:1]}))
    with pytest.raises(PlacementError, match=r"plan.json: 1 layers of 2 shards, but the model has 2 MoE layers"):
        plan_placement(cfg)
    path.write_text(json.dumps({"placement": [per_layer[0], [[0, 1], [2, 3]]]}))
    with pytest.raises(PlacementError, match=r"plan.json: placement: layer 1: .*experts \[4, 5, 6, 7\] are on no"):
        plan_placement(cfg)
    with pytest.raises(ValidationError, match="placement_file is required with placement: file"):
        AppConfig.model_validate({"model": "x", "placement": "file"})


def test_gpu_accelerator_gives_each_replica_one_gpu():
    gpu = AppConfig.model_validate({"model": "x", "accelerator": "gpu"})
    cpu = AppConfig.model_validate({"model": "x"})
    assert gpu.replica_options(gpu.shard_resources) == {"num_cpus": 0.5, "num_gpus": 1}
    assert cpu.replica_options(cpu.router_resources) == {"num_cpus": 1.0}


def test_explicit_placement_must_match_shards():
    with pytest.raises(ValidationError, match="explicit_placement lists 1 shards but shards=2"):
        AppConfig.model_validate({"model": "x", "placement": "explicit", "explicit_placement": [[0]]})


def test_demo_config_fits_a_two_core_machine():
    """`serve run configs/demo.yaml` starts a cluster with one logical CPU per core."""
    [app] = yaml.safe_load((REPO / "configs/demo.yaml").read_text())["applications"]
    assert AppConfig.model_validate(app["args"]).total_cpus() <= 2


def test_embedded_store_allows_one_retriever_a_qdrant_server_many():
    with pytest.raises(ValidationError, match=r"retrieval.replicas=2 with the embedded store.*qdrant_url"):
        AppConfig.model_validate({"model": "x", "retrieval": {"replicas": 2}})
    cfg = AppConfig.model_validate({"model": "x", "retrieval": {"replicas": 3, "qdrant_url": "http://qdrant:6333"}})
    assert cfg.retrieval.replicas == 3
    assert cfg.total_cpus() == AppConfig.model_validate({"model": "x"}).total_cpus() + 3 * 0.25


def test_retrieval_paths_are_made_absolute_for_replicas_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = validate({"model": "m", "retrieval": {"store_path": "store", "ingest_on_start": ["docs", "README.md"]}})
    assert cfg.retrieval.store_path == str(tmp_path / "store")
    assert cfg.retrieval.ingest_on_start == [str(tmp_path / "docs"), str(tmp_path / "README.md")]
    with pytest.raises(ValidationError, match="overlap_tokens=64 must be < chunk_tokens"):
        AppConfig.model_validate({"model": "x", "retrieval": {"chunk_tokens": 64, "overlap_tokens": 64}})


def test_the_shard_transport_is_direct_unless_handles_are_asked_for():
    assert AppConfig.model_validate({"model": "x"}).transport == "direct"
    assert AppConfig.model_validate({"model": "x", "transport": "handles"}).transport == "handles"
    with pytest.raises(ValidationError, match="'handles' or 'direct'"):
        AppConfig.model_validate({"model": "x", "transport": "nccl"})


def test_direct_rows_are_auto_and_say_how_the_direct_transport_moves_rows():
    assert AppConfig.model_validate({"model": "x"}).direct_rows == "auto"
    assert AppConfig.model_validate({"model": "x", "direct_rows": "collective"}).direct_rows == "collective"
    with pytest.raises(ValidationError, match="direct_rows: collective with transport: handles"):
        AppConfig.model_validate({"model": "x", "transport": "handles", "direct_rows": "collective"})
    with pytest.raises(ValidationError, match="'auto', 'frames' or 'collective'"):
        AppConfig.model_validate({"model": "x", "direct_rows": "nccl"})


def test_engine_vllm_refuses_the_native_engines_shard_fields():
    with pytest.raises(ValidationError, match=r"shards, shard_resources: expert shards are the native engine's"):
        AppConfig.model_validate({"model": "x", "engine": "vllm", "shards": 4, "shard_resources": {"num_cpus": 1}})
    with pytest.raises(ValidationError, match=r"transport: expert shards are the native engine's"):
        AppConfig.model_validate({"model": "x", "engine": "vllm", "transport": "handles"})
    with pytest.raises(ValidationError, match="vllm: options for engine: vllm only"):
        AppConfig.model_validate({"model": "x", "vllm": {"enforce_eager": True}})
    with pytest.raises(ValidationError, match="tensor_parallel"):
        AppConfig.model_validate({"model": "x", "engine": "vllm", "vllm": {"tensor_parallel": 2}})


def test_vllm_replica_takes_its_tensor_parallel_gpus_and_survives_a_round_trip():
    cfg = AppConfig.model_validate({"model": "x", "engine": "vllm", "accelerator": "gpu",
                                    "vllm": {"tensor_parallel_size": 2, "enable_expert_parallel": True}})  # fmt: skip
    assert cfg.replica_options(cfg.router_resources) == {"num_cpus": 1.0, "num_gpus": 2}
    assert cfg.total_cpus() == 1.25  # no shard replicas
    assert AppConfig.model_validate(cfg.model_dump()) == cfg  # what build_app hands the replicas


def test_engine_vllm_without_vllm_installed_says_how_to_install_it(monkeypatch, demo_dir):
    import importlib.util

    from deployments.app import build_app
    from serving.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match="make install-vllm"):
        build_app({"model": str(demo_dir), "engine": "vllm"})


def test_banner_names_the_resolved_expert_kernel(monkeypatch, demo_dir):
    import importlib.util

    from deployments.local_cluster import describe_engine
    from serving.errors import ConfigError

    def cfg(**engine_config):
        return validate({"model": str(demo_dir), "engine_config": engine_config})

    assert describe_engine(cfg()) == "2 expert shard(s), expert kernel loop"
    assert describe_engine(validate({"model": str(demo_dir), "engine": "vllm"})) == "engine vllm"
    real = importlib.util.find_spec
    found = real("json")  # vLLM installed, as importlib sees it; resolving imports nothing
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: found if name == "vllm" else real(name, *a))
    assert describe_engine(cfg(expert_kernel="auto")) == "2 expert shard(s), expert kernel vllm (auto)"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert describe_engine(cfg(expert_kernel="auto")) == "2 expert shard(s), expert kernel loop (auto)"
    with pytest.raises(ConfigError, match="expert_kernel: vllm: vLLM is not installed"):
        describe_engine(cfg(expert_kernel="vllm"))


def test_custom_resources_pin_replicas_to_the_nodes_that_advertise_them():
    cfg = AppConfig.model_validate(
        {"model": "x", "accelerator": "gpu", "shard_resources": {"num_cpus": 2, "resources": {"moe_shard": 1}}}
    )
    assert cfg.replica_options(cfg.shard_resources) == {"num_cpus": 2, "resources": {"moe_shard": 1}, "num_gpus": 1}
    with pytest.raises(ValidationError, match="resources.GPU: set CPUs with num_cpus"):
        AppConfig.model_validate({"model": "x", "router_resources": {"resources": {"GPU": 1}}})
    with pytest.raises(ValidationError, match=r"resources.moe_shard=0.0: must be > 0"):
        AppConfig.model_validate({"model": "x", "router_resources": {"resources": {"moe_shard": 0}}})


def test_failover_bounds_must_be_in_order():
    assert AppConfig.model_validate({"model": "x"}).failover.shard_wait_s == 30.0
    with pytest.raises(ValidationError, match="shard_hedge_after_s=6.0 must be < shard_call_timeout_s=5.0"):
        AppConfig.model_validate({"model": "x", "failover": {"shard_hedge_after_s": 6}})
    with pytest.raises(ValidationError, match="shard_call_timeout_s=40.0 must be <= shard_wait_s=30.0"):
        AppConfig.model_validate({"model": "x", "failover": {"shard_call_timeout_s": 40}})
    with pytest.raises(ValidationError, match="router_drain_s=30.0 must be < shard_wait_s=30.0"):
        AppConfig.model_validate({"model": "x", "failover": {"router_drain_s": 30}})
    with pytest.raises(ValidationError, match="ingress_drain_s=10.0 must be > router_drain_s=10.0"):
        AppConfig.model_validate({"model": "x", "failover": {"ingress_drain_s": 10}})


def test_a_rolling_update_starts_new_replicas_first_and_drains_old_ones_for_the_configured_times(demo_dir):
    """What a rolling update does reaches Serve as each deployment's options: routers stop after
    router_drain_s (their streams move), the Ingress after ingress_drain_s, and every deployment starts
    update_surge_percent new replicas before stopping old ones, but the Retriever of an embedded store."""
    failover = {"router_drain_s": 7, "ingress_drain_s": 45, "update_surge_percent": 50}
    app = {"model": str(demo_dir), "shards": 2, "failover": failover, "retrieval": {}}
    ingress = build_app(app)._bound_deployment
    router, retriever = (a._bound_deployment for a in ingress.init_args[1:])  # Ingress(config, router, retriever)
    shards = router.init_args[0].shards  # the NativeEngineFactory's handles of ExpertShard-<i>
    timeouts = {d.name: d._deployment_config.graceful_shutdown_timeout_s for d in (ingress, router)}
    assert timeouts == {"Ingress": 45, "Router": 7}
    surge = {d.name: d._deployment_config.max_surge_percent for d in (ingress, router, retriever)}
    surge |= {s._bound_deployment.name: s._bound_deployment._deployment_config.max_surge_percent for s in shards}
    assert surge == {"Ingress": 50, "Router": 50, "Retriever": 0, "ExpertShard-0": 50, "ExpertShard-1": 50}


@pytest.mark.parametrize("period", [None, 0.5])
def test_every_deployment_is_health_checked_as_often_as_failover_says(demo_dir, period):
    """A SIGKILLed replica is restarted once a health check notices it: the period bounds a single replica's outage."""
    failover = {} if period is None else {"health_check_period_s": period}
    ingress = build_app({"model": str(demo_dir), "shards": 2, "failover": failover, "retrieval": {}})._bound_deployment
    router, retriever = (a._bound_deployment for a in ingress.init_args[1:])
    deployments = [ingress, router, retriever] + [s._bound_deployment for s in router.init_args[0].shards]
    periods = {d.name: d._deployment_config.health_check_period_s for d in deployments}
    want = 2.0 if period is None else period  # Serve's own default is 10 s
    assert periods == dict.fromkeys(["Ingress", "Router", "Retriever", "ExpertShard-0", "ExpertShard-1"], want)
    with pytest.raises(ValidationError, match="health_check_period_s"):
        AppConfig.model_validate({"model": "x", "failover": {"health_check_period_s": 0}})


def test_the_expert_load_window_is_a_bounded_number_of_seconds():
    assert AppConfig.model_validate({"model": "x"}).engine_config.expert_load_window_s == 60.0
    cfg = AppConfig.model_validate({"model": "x", "engine_config": {"expert_load_window_s": 300}})
    assert cfg.engine_config.expert_load_window_s == 300.0
    for bad in (0, 0.5, 86401):  # under a second (a unit slip: ms?) or over a day
        with pytest.raises(ValidationError, match="expert_load_window_s"):
            AppConfig.model_validate({"model": "x", "engine_config": {"expert_load_window_s": bad}})


def test_shard_autoscaling_bounds_overrides_and_conflicts_are_checked_once():
    scaling = {"max_replicas": 3, "target_expert_rows_per_s": 500, "overrides": {1: {"max_replicas": 6}}}
    cfg = AppConfig.model_validate({"model": "x", "shards": 2, "shard_autoscaling": scaling})
    assert [cfg.shard_replica_bounds(i) for i in (0, 1)] == [(1, 3), (1, 6)]
    assert cfg.shard_autoscaling.for_shard(1).target_expert_rows_per_s == 500  # inherited
    assert cfg.total_cpus() == 1.0 + (3 + 6) * 0.5 + 0.25  # shards at their max_replicas
    assert AppConfig.model_validate(cfg.model_dump()) == cfg  # what build_app hands the replicas (int keys kept)
    bad = [
        ({"shard_autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas=3 must be <= max_replicas=2"),
        (
            {"shard_autoscaling": {"max_replicas": 4, "overrides": {0: {"min_replicas": 5}}}},
            r"overrides.0: .*min_replicas=5 must be <= max_replicas=4",
        ),  # fmt: skip
        ({"shard_autoscaling": {"overrides": {2: {}}}}, r"overrides: shard\(s\) \[2\] do not exist \(shards=2: 0..1\)"),
        ({"shard_autoscaling": {}, "shard_replicas": 2}, "shard_replicas=2 with shard_autoscaling"),
        ({"shard_autoscaling": {}, "shards": 0}, "shard_autoscaling with shards: 0"),
        ({"shard_autoscaling": {"min_replicas": 0}}, "min_replicas"),
        ({"shard_autoscaling": {"look_back_period_s": 5, "metrics_interval_s": 5}}, "look_back_period_s=5.0 must be >"),
        ({"shard_autoscaling": {"target_ongoing_requests": 2}}, "target_ongoing_requests"),  # not Serve's metric
        ({"shard_autoscaling": {}, "engine": "vllm", "shards": 2}, "shard_autoscaling: expert shards"),
    ]
    for extra, match in bad:
        with pytest.raises(ValidationError, match=match):
            AppConfig.model_validate({"model": "x", "shards": 2, **extra})


def test_each_shard_gets_its_own_serve_autoscaling_config_or_a_fixed_replica_count(demo_dir):
    """What reaches Serve per ExpertShard-<i>: with shard_autoscaling, no num_replicas and an autoscaling_config
    of its own bounds, on the expert-rows policy with its own target; without, shard_replicas each."""
    from deployments.autoscaling import POLICY

    def shard_configs(**args):
        router = build_app({"model": str(demo_dir), "shards": 2, **args})._bound_deployment.init_args[1]
        return [s._bound_deployment._deployment_config for s in router._bound_deployment.init_args[0].shards]

    assert [c.num_replicas for c in shard_configs(shard_replicas=3)] == [3, 3]
    assert [c.autoscaling_config for c in shard_configs(shard_replicas=3)] == [None, None]
    scaling = {
        "max_replicas": 2,
        "target_expert_rows_per_s": 150,
        "upscale_delay_s": 1,
        "downscale_delay_s": 2,
        "look_back_period_s": 12,
        "overrides": {1: {"max_replicas": 4, "target_expert_rows_per_s": 80}},
    }
    configs = [c.autoscaling_config for c in shard_configs(shard_autoscaling=scaling)]
    got = [(c.min_replicas, c.max_replicas, c.policy.policy_kwargs["target_expert_rows_per_s"]) for c in configs]
    assert got == [(1, 2, 150), (1, 4, 80)]
    for c in configs:
        assert c.policy.policy_function == POLICY
        assert (c.upscale_delay_s, c.downscale_delay_s, c.look_back_period_s, c.metrics_interval_s) == (1, 2, 12, 10)
    with pytest.warns(DeprecationWarning, match="metrics_interval_s"):  # Serve's own warning; the field still works
        fast = shard_configs(shard_autoscaling={"look_back_period_s": 2, "metrics_interval_s": 0.5})
    assert [c.autoscaling_config.metrics_interval_s for c in fast] == [0.5, 0.5]


def test_explicit_placement_per_layer_is_what_a_rebalance_deploys(demo_dir):
    """One list of shards per MoE layer (the rebalancer's plan); a layer with the wrong shard count is named."""
    per_layer = [[[0, 1, 2, 3, 7], [4, 5, 6, 7]], [[0, 2, 4, 6], [0, 1, 3, 5, 7]]]
    cfg = validate({"model": str(demo_dir), "shards": 2, "placement": "explicit", "explicit_placement": per_layer})
    assert cfg.explicit_per_layer and [layer.shards for layer in plan_placement(cfg).layers] == [
        ((0, 1, 2, 3, 7), (4, 5, 6, 7)),
        ((0, 2, 4, 6), (0, 1, 3, 5, 7)),
    ]
    assert AppConfig.model_validate(cfg.model_dump()).explicit_placement == per_layer  # as the replicas read it
    with pytest.raises(ValidationError, match=r"explicit_placement\[1\] lists 3 shards but shards=2"):
        AppConfig.model_validate(
            {"model": "x", "placement": "explicit", "explicit_placement": [per_layer[0], [[0]] * 3]}
        )
    with pytest.raises(PlacementError, match=r"explicit_placement: 1 layers of 2 shards, but the model has 2 MoE"):
        plan_placement(validate({**cfg.model_dump(), "explicit_placement": per_layer[:1]}))


def test_a_router_with_cpu_shards_lets_its_idle_openmp_workers_sleep_and_one_without_keeps_them_spinning(demo_dir):
    """deployments/app.py engine_env says why (measured); the variable must reach the Router's process."""

    def router_env(**fields) -> dict:
        router = build_app({"model": str(demo_dir), **fields})._bound_deployment.init_args[1]._bound_deployment
        return router.ray_actor_options.get("runtime_env", {}).get("env_vars", {})

    assert router_env(shards=2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert router_env(shards=0) == {}
    assert router_env(shards=2, accelerator="gpu") == {}
    # shards on other nodes: the config leaves it unset (null) or overrides it, and adds what it likes
    assert router_env(shards=2, router_resources={"env_vars": {"OMP_WAIT_POLICY": None}}) == {}
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "MALLOC_ARENA_MAX": "2"}
    assert router_env(shards=2, router_resources={"env_vars": mine}) == mine


def test_every_replica_group_takes_environment_variables_from_its_resources(demo_dir, tmp_path):
    args = {"model": str(demo_dir), "shards": 2, "retrieval": {"store_path": str(tmp_path / "qdrant")}}
    for group in ("shard_resources", "ingress_resources"):
        args[group] = {"env_vars": {"MOE_TEST_GROUP": group}}
    args["retrieval"]["resources"] = {"env_vars": {"MOE_TEST_GROUP": "retrieval"}}
    ingress = build_app(args)._bound_deployment
    router, retriever = (a._bound_deployment for a in ingress.init_args[1:])  # Ingress(config, router, retriever)
    shards = [s._bound_deployment for s in router.init_args[0].shards]  # the NativeEngineFactory's ExpertShard-<i>

    def env(deployment) -> dict:
        return deployment.ray_actor_options.get("runtime_env", {}).get("env_vars", {})

    assert env(ingress) == {"MOE_TEST_GROUP": "ingress_resources"}
    assert env(retriever) == {"MOE_TEST_GROUP": "retrieval"}
    assert [env(s) for s in shards] == [{"MOE_TEST_GROUP": "shard_resources"}] * 2
    assert env(router) == {"OMP_WAIT_POLICY": "PASSIVE"}  # the app's own, router_resources has none
    with pytest.raises(ValidationError, match=r"env_vars: 'BAD-NAME' is not an environment variable name"):
        AppConfig.model_validate({"model": "x", "router_resources": {"env_vars": {"BAD-NAME": "1"}}})
