"""k8s/: every overlay renders, validates strictly (custom resources against the KubeRay and
prometheus-operator CRDs, core kinds with kubernetes-validate), serves an app config that our AppConfig
and Ray's ServeDeploySchema accept, and agrees with the Dockerfile and pyproject on versions and images.

Needs `kubectl` (renders offline with `kubectl kustomize`) and, for custom resources, the CRDs in
../shared/k8s-schemas next to the repo; where either is missing the tests that need it skip and say so.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from deployments.capacity import load_config, plan_capacity
from deployments.config import AppConfig
from serving import metrics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
DATA = Path(__file__).parent / "data"
OVERLAYS = ["cpu-demo", "gpu"]
CRD_FILES = {
    "RayService": "ray.io_rayservices.yaml",
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
}
KUBECTL = shutil.which("kubectl")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="needs kubectl on PATH to render k8s/ with `kubectl kustomize` (the CI image has it)"
)
needs_schemas = pytest.mark.skipif(
    not SCHEMAS.is_dir(),
    reason=f"needs the KubeRay/prometheus-operator CRDs in {SCHEMAS} (../shared/k8s-schemas beside the repo)",
)


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize k8s/<overlay>`, parsed. Cached: each overlay renders once per session."""
    path = K8S / ("base" if overlay == "base" else f"overlays/{overlay}")
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs, kind: str, name: str | None = None) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def serve_config(overlay: str) -> dict:
    return yaml.safe_load(one(render(overlay), "RayService")["spec"]["serveConfigV2"])


def pod_specs(rayservice: dict) -> dict[str, dict]:
    """Pod spec of the head ("head") and of each worker group (by groupName)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    specs.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return specs


# --- validation: CRDs converted to strict JSON Schema (../shared/k8s-schemas/README.md), core kinds ---


def _strict(node, strict: bool = True):
    """A CRD's openAPIV3Schema as JSON Schema: unknown fields fail, nullables accept null, defaults are optional."""
    if isinstance(node, list):
        return [_strict(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: _strict(sub, strict) for name, sub in value.items()}
        elif key in ("default", "enum", "example"):
            out[key] = value  # values, not schemas
        else:
            out[key] = _strict(value, strict)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    keeps_unknown = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    if strict and "properties" in node and not keeps_unknown:
        out["additionalProperties"] = False
    if "required" in out and "properties" in node:  # the API server fills defaults before validating
        out["required"] = [r for r in out["required"] if "default" not in node["properties"].get(r, {})]
    return out


@functools.cache
def crd_validator(kind: str, api_version: str):
    import jsonschema
    from referencing import Registry, Resource

    crd = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = api_version.split("/")[-1]
    [schema] = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(schema)
    # metadata is only {type: object} in a CRD: check it as the API server does, as ObjectMeta.
    schema["properties"]["metadata"] = {
        "$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    definitions = json.loads((SCHEMAS / "core" / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _drop_nulls(node):
    if isinstance(node, dict):
        return {k: _drop_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_nulls(v) for v in node]
    return node


def validate(doc: dict) -> None:
    """Raise if `doc` is not a valid object of its kind (strict: unknown fields are errors)."""
    if doc["kind"] in CRD_FILES:
        crd_validator(doc["kind"], doc["apiVersion"]).validate(_drop_nulls(doc))
    else:
        kubernetes_validate = pytest.importorskip(
            "kubernetes_validate", reason="needs kubernetes-validate for core kinds: pip install -e '.[dev]'"
        )
        kubernetes_validate.validate(doc, "1.37", strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_core_kinds_validate_strictly(overlay):
    core = [d for d in render(overlay) if d["kind"] not in CRD_FILES]
    assert {d["kind"] for d in core} >= {"StatefulSet", "Service", "Secret", "ConfigMap"}
    for doc in core:
        validate(doc)


@needs_kubectl
@needs_schemas
@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_custom_resources_validate_against_their_crds(overlay):
    custom = [d for d in render(overlay) if d["kind"] in CRD_FILES]
    assert {d["kind"] for d in custom} == {"RayService", "PodMonitor"}
    for doc in custom:
        validate(doc)


def _set(doc: dict, path: str, value) -> dict:
    broken = copy.deepcopy(doc)
    *parents, last = path.split("/")
    node = broken
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return broken


def _crd(*values):
    return pytest.param(*values, marks=needs_schemas)


@needs_kubectl
@pytest.mark.parametrize(
    "kind, path, value",
    [
        _crd("RayService", "spec/rayClusterConfig/headGroupSpec/rayStartParams/num-cpus", 0),  # must be a string
        _crd("RayService", "spec/rayClusterConfig/workerGroupSpecs/0/replicas", "2"),  # must be an integer
        _crd("RayService", "spec/rayClusterConfig/headGroupSpec/replicaz", 1),  # unknown field
        _crd("RayService", "spec/rayClusterConfig/workerGroupSpecs/0/template/spec/containers/0/imagez", "x"),
        _crd("RayService", "metadata/labelz", {}),  # unknown field in ObjectMeta
        _crd("PodMonitor", "spec/podMetricsEndpoints/0/portz", "metrics"),  # unknown field
        ("StatefulSet", "spec/replicas", "1"),  # must be an integer
        ("StatefulSet", "spec/template/spec/containers/0/imagePullPolicie", "Always"),  # unknown field
        ("Service", "spec/ports/0/port", "6333"),  # must be an integer
        ("ConfigMap", "metadata/annotationz", {}),  # unknown field
    ],
)
def test_broken_manifests_fail_validation(kind, path, value):
    import jsonschema

    doc = one(render("gpu"), kind, "qdrant" if kind == "PodMonitor" else None)
    validate(doc)  # the unbroken one passes, so the failure below is the mutation's
    with pytest.raises(jsonschema.ValidationError):
        validate(_set(doc, path, value))


# --- the app inside serveConfigV2 ---


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_valid_for_ray_and_for_our_app(overlay):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(overlay)
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    cfg = AppConfig.model_validate(app["args"])
    assert cfg.auth and cfg.api_keys_file == "/etc/moe-serve/api-keys/keys"
    assert cfg.admin_keys_file == "/etc/moe-serve/api-keys/admin-keys"
    assert cfg.retrieval is not None and cfg.retrieval.qdrant_url == "http://qdrant:6333"
    assert cfg.model.startswith("/models/")


@needs_kubectl
def test_cpu_demo_serves_the_args_of_configs_demo_yaml():
    [local] = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["applications"]
    [k8s] = serve_config("cpu-demo")["applications"]
    # the volume path, auth on inside a shared cluster, and the Qdrant server instead of the embedded store
    differ = {"model", "auth", "api_keys_file", "admin_keys_file", "retrieval"}
    assert {k: v for k, v in k8s["args"].items() if k not in differ} == {
        k: v for k, v in local["args"].items() if k not in differ
    }
    assert k8s["args"]["model"] == "/models/demo-mixtral"
    assert k8s["args"]["retrieval"]["collection"] == local["args"]["retrieval"]["collection"]
    assert k8s["args"]["retrieval"]["qdrant_url"] == "http://qdrant:6333"
    make_demo = one(render("cpu-demo"), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "/models/demo-mixtral" in make_demo["template"]["spec"]["initContainers"][0]["command"]


# --- sizes: worker groups fit the app; the GPU overlay is what `moe-serve plan` says ---


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_groups_hold_every_replica(overlay):
    rayservice = one(render(overlay), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for g in groups.values():
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], f"{g['groupName']}: sizes are fixed"
    cfg = AppConfig.model_validate(serve_config(overlay)["applications"][0]["args"])
    limits = {name: spec["containers"][0]["resources"]["limits"] for name, spec in pod_specs(rayservice).items()}
    if cfg.accelerator == "gpu":
        assert groups["routers"]["replicas"] == cfg.routers
        assert groups["shards"]["replicas"] == cfg.shards * cfg.shard_replicas
        for name in groups:
            assert limits[name]["nvidia.com/gpu"] == 1, f"{name}: one GPU per replica"
            tolerations = pod_specs(rayservice)[name]["tolerations"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert "nvidia.com/gpu" not in limits["head"]
        # One GPU per pod and per replica: any router or shard replica may land on any GPU pod.
        needs = max(cfg.router_resources.num_cpus, cfg.shard_resources.num_cpus)
        spare = sum((float(limits[name]["cpu"]) - needs) * g["replicas"] for name, g in groups.items())
        assert min(float(limits[name]["cpu"]) for name in groups) >= needs
        retriever = cfg.retrieval.replicas * cfg.retrieval.resources.num_cpus if cfg.retrieval else 0
        assert spare >= cfg.ingress_resources.num_cpus + retriever, "no CPU left on the GPU pods for Ingress, Retriever"
    else:
        cpus = sum(float(limits[name]["cpu"]) * g["replicas"] for name, g in groups.items())
        assert cpus >= cfg.total_cpus(), f"worker CPUs {cpus} < the {cfg.total_cpus()} the replicas reserve"


@needs_kubectl
def test_gpu_overlay_is_the_plan_for_mixtral_on_80_gib():
    plan = plan_capacity(load_config(DATA / "mixtral_8x7b_config.json"), gpu_memory_gib=80, dtype="bf16", routers=2)
    rayservice = one(render("gpu"), "RayService")
    replicas = {g["groupName"]: g["replicas"] for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert replicas == plan.worker_groups() == {"routers": 2, "shards": 2}
    cfg = AppConfig.model_validate(serve_config("gpu")["applications"][0]["args"])
    assert cfg.shards == plan.num_shards and cfg.engine_config.kv_cache_mb * 2**20 <= plan.kv_room_bytes


# --- wiring: volumes, secrets, monitoring ---


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_mount_has_a_volume_and_every_secret_exists_empty(overlay):
    docs = render(overlay)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    pods = dict(pod_specs(one(docs, "RayService")))
    qdrant = one(docs, "StatefulSet")["spec"]
    pods["qdrant"] = qdrant["template"]["spec"]
    claims = {c["metadata"]["name"] for c in qdrant["volumeClaimTemplates"]}
    for name, spec in pods.items():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or (name == "qdrant" and mount["name"] in claims), (name, mount)
            for env in container.get("env", []):
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["name"] in secrets, f"{name}: Secret {ref['name']} is not in the overlay"
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if claim := volume.get("persistentVolumeClaim"):
                assert one(docs, "PersistentVolumeClaim", claim["claimName"])
    for name, secret in secrets.items():
        assert not secret.get("data") and not secret.get("stringData"), f"Secret {name} must not carry values"


@needs_kubectl
def test_metrics_are_scraped_and_the_dashboard_shows_them():
    docs = render("cpu-demo")
    ray_pods = one(docs, "PodMonitor", "moe-serve-ray")
    for spec in pod_specs(one(docs, "RayService")).values():
        assert {"name": "metrics", "containerPort": 8080} in spec["containers"][0]["ports"]
    assert ray_pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    dashboard = one(docs, "ConfigMap", "moe-serve-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    exprs = " ".join(
        t["expr"] for p in json.loads(dashboard["data"]["grafana-dashboard.json"])["panels"] for t in p["targets"]
    )
    shown = [metrics.TTFT, metrics.ITL, metrics.E2E, metrics.DISPATCH, metrics.LAYER_DISPATCH, metrics.SHARD_CALL_ROWS]
    counted = [metrics.GENERATED_TOKENS, metrics.WAITING, metrics.KV_USAGE, metrics.EXPERT_TOKENS]
    counted += [metrics.SHARD_RETRIES, metrics.SHARD_TIMEOUTS, metrics.SHARD_HEDGES, metrics.SHARD_FAILOVERS]
    counted += [metrics.MIGRATIONS, metrics.SHARD_ROWS, metrics.BALANCEDNESS, metrics.REBALANCES, metrics.SHARD_CALLS]
    names = [m.name + "_bucket" for m in shown] + [m.name for m in counted] + ["moe_retrieval_seconds_bucket"]
    # replicas per shard: Ray Serve's own gauges (the controller's), not ours
    names += ["serve_deployment_replica_healthy", "serve_autoscaling_target_replicas"]
    for metric in names:
        assert f'"(ray_)?{metric}"' in exprs, f"no dashboard panel shows {metric}"
    assert "sum by (expert)" in exprs and "by (le, shard)" in exprs and "min by (layer)" in exprs
    assert 'deployment=~"ExpertShard-.*"' in exprs  # the shard deployments' names (deployments/app.py)


# --- versions and images agree across Dockerfile, manifests, pyproject and docs ---


def test_ray_and_torch_versions_agree():
    pins = dict(re.match(r"([\w.\-\[\]]+)==(\S+)", dep).groups() for dep in PYPROJECT["project"]["dependencies"])
    ray_version = pins["ray[serve]"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base) for base in re.findall(r"^FROM (\S+)", dockerfile, re.M)
    ]
    assert sorted(bases) == [f"rayproject/ray:{ray_version}-py311", f"rayproject/ray:{ray_version}-py311-gpu"]
    assert args["TORCH_VERSION"] == pins["torch"]
    rayservice = yaml.safe_load((K8S / "base" / "rayservice.yaml").read_text())
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert "--version 1.7.0" in docs  # the KubeRay chart whose CRDs the tests validate against
    if SCHEMAS.is_dir():
        assert "`kuberay-operator` 1.7.0" in (SCHEMAS / "README.md").read_text()


@needs_kubectl
def test_every_overlay_runs_the_same_image_at_pyprojects_version():
    version = PYPROJECT["project"]["version"]
    names = set()
    for overlay, suffix in [("cpu-demo", ""), ("gpu", "-gpu")]:
        images = {
            c["image"]
            for spec in pod_specs(one(render(overlay), "RayService")).values()
            for c in spec["containers"] + spec.get("initContainers", [])
        }
        [image] = images  # head, workers and init containers: one image, or Ray versions could differ
        name, tag = image.rsplit(":", 1)
        assert tag == f"{version}{suffix}", f"{overlay}: image tag {tag}, pyproject version {version}"
        names.add(name)
        qdrant = one(render(overlay), "StatefulSet", "qdrant")["spec"]["template"]["spec"]["containers"][0]["image"]
        assert qdrant.startswith("qdrant/qdrant:v"), f"pin a Qdrant version, not {qdrant}"
    assert len(names) == 1, f"overlays push to different repositories: {names}"
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert f"moe-serve:{version}" in docs and f"moe-serve:{version}-gpu" in docs
