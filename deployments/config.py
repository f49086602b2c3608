"""The app's one config model. The same `args:` block is used by `serve run configs/X.yaml`, by
`moe-serve run`, by Python (`build_app(args)`) and inside the RayService's serveConfigV2.

Validated once, in `build_app`; unknown fields are errors that name the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.engine_client import EngineConfig
from serving.retrieval.chunking import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP_TOKENS
from serving.vllm_engine import VLLMOptions

# Fields that only the native engine reads (expert shards); with engine: vllm setting one is an error.
NATIVE_ONLY = (
    "shards", "shard_replicas", "shard_autoscaling", "placement", "explicit_placement", "placement_file",
    "shard_resources", "rebalance", "transport", "direct_rows",
)  # fmt: skip
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ResourceConfig(BaseModel):
    """Resources of one replica. On GPU nodes each replica takes one whole GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica (fractions allowed).")
    memory_gb: float | None = Field(None, gt=0, description="Memory reserved per replica, GiB (optional).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {moe_shard: 1}: the replica then runs only on nodes "
        "that advertise them (a KubeRay worker group's rayStartParams.resources; docs/kubernetes.md).",
    )

    env_vars: dict[str, str | None] = Field(
        default_factory=dict,
        description="Environment variables of each replica's process, set before it starts; they override what the "
        "app sets itself, and null leaves one unset. E.g. routers whose CPU shards run on other nodes: "
        "{OMP_WAIT_POLICY: null} (docs/kubernetes.md, section 8).",
    )

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        for name in v:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"env_vars: {name!r} is not an environment variable name (letters, digits, _)")
        return v

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "num_cpus", "num_gpus"):
                raise ValueError(
                    f"resources.{name}: set CPUs with num_cpus, memory with memory_gb and GPUs with accelerator"
                )
            if amount <= 0:
                raise ValueError(f"resources.{name}={amount}: must be > 0")
        return v

    def ray_options(self, app_env: dict[str, str] | None = None) -> dict:
        """ray_actor_options for a CPU-only replica; `app_env`: the variables the app sets (env_vars win)."""
        options: dict = {"num_cpus": self.num_cpus}
        if self.memory_gb is not None:
            options["memory"] = int(self.memory_gb * 2**30)
        if self.resources:
            options["resources"] = dict(self.resources)
        env = {name: value for name, value in {**(app_env or {}), **self.env_vars}.items() if value is not None}
        if env:
            options["runtime_env"] = {"env_vars": env}
        return options


class RetrievalConfig(BaseModel):
    """The Retriever deployment (RAG): an embedder and a Qdrant store, embedded in a folder or a server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store_path: str = Field(".data/qdrant", description="Folder of the embedded Qdrant store (without qdrant_url).")
    qdrant_url: str | None = Field(None, description="A Qdrant server, e.g. http://qdrant:6333 (replicas may scale).")
    qdrant_api_key_env: str | None = Field(
        "QDRANT_API_KEY", description="Env var holding the server's API key (read in the Retriever replica)."
    )
    collection: str = Field("docs", min_length=1, description="Collection used when a request names none.")
    embedding_model: str | None = Field(
        None, description="A sentence-transformers model folder; default: all-MiniLM-L6-v2 (bundled)."
    )
    chunk_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=16, description="Largest chunk, in embedding-model tokens.")
    overlap_tokens: int = Field(DEFAULT_OVERLAP_TOKENS, ge=0, description="Tokens a chunk repeats from the last.")
    timeout_s: float = Field(2.0, gt=0, le=60, description="Longest a search may take, hop included; then 503.")
    ingest_on_start: list[str] = Field(
        default_factory=list, description="Files/folders ingested into `collection` when it is missing or empty."
    )
    replicas: int = Field(1, ge=1, description="Retriever replicas; more than 1 needs qdrant_url.")
    resources: ResourceConfig = Field(default_factory=lambda: ResourceConfig(num_cpus=0.25))

    @model_validator(mode="after")
    def _one_owner(self) -> RetrievalConfig:
        if self.replicas > 1 and self.qdrant_url is None:
            raise ValueError(
                f"retrieval.replicas={self.replicas} with the embedded store: only one process may open "
                f"{self.store_path}; set retrieval.qdrant_url to a Qdrant server to scale out, or use 1 replica"
            )
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(f"retrieval.overlap_tokens={self.overlap_tokens} must be < chunk_tokens")
        return self


class FailoverConfig(BaseModel):
    """What a dead or slow replica may cost, and when the cluster gives up and answers 503 (README, "Failures")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    router_wait_s: float = Field(
        30.0,
        gt=0,
        description="Longest the Ingress waits for a live router to take a request (a new one, or a "
        "stream moved off a dead router) before answering 503 with Retry-After.",
    )
    max_migrations: int = Field(
        3, ge=0, description="Times one stream may be moved to another router after its router died; 0: never."
    )
    shard_call_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest one attempt of a layer's call to a shard may take; then it is sent again "
        "(Serve picks a live replica). A dead replica's call fails fast and is retried at once.",
    )
    shard_hedge_after_s: float | None = Field(
        None,
        gt=0,
        description="Send a second attempt of a shard call still unanswered after this long, and take "
        "whichever answers first (shards are stateless); null: no hedging.",
    )
    shard_wait_s: float = Field(
        30.0,
        gt=0,
        description="Longest a layer holds for a shard that has no live replica (retrying meanwhile, "
        "e.g. while Serve restarts it); then the step's requests fail with 503 and queued ones go on.",
    )
    router_drain_s: float = Field(
        10.0,
        gt=0,
        description="Longest a Router replica Serve is stopping (a rolling update, a scale-down) may finish "
        "its streams; then it is stopped and the Ingress moves the streams still running to a live router. "
        "Must be < shard_wait_s: an old router whose shards already run the new version waits for them "
        "until it is stopped, and its requests must still be alive then to move.",
    )
    ingress_drain_s: float = Field(
        60.0,
        gt=0,
        description="Longest an Ingress replica Serve is stopping may finish its HTTP streams; must be > "
        "router_drain_s, so a stream it moves off a stopped router can still end.",
    )
    health_check_period_s: float = Field(
        2.0,
        gt=0,
        description="How often Serve checks each replica (Router, ExpertShard, Retriever, Ingress). A SIGKILLed "
        "replica is noticed at its next check and restarted then, so requests wait for a shard or router that "
        "had no twin up to this plus its start: the only shard replica was back in 3.9 s at 2 s, 6.4 s at "
        "Serve's default of 10 s (benchmarks/README.md, Resilience). Each check is a small actor call.",
    )
    update_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="In a rolling update (`serve deploy` of a changed config), how many replicas of each "
        "deployment Serve starts on the new version before it stops old ones, in percent of its replica "
        "count (rounded up): 100 replaces even a single-replica shard with no gap, but needs room for the "
        "extra replicas (without it Serve waits for room, old replicas serving meanwhile); 0 stops first, "
        "so a shard with one replica is down until its new one is up. An embedded Qdrant store (no "
        "qdrant_url) cannot be opened twice: the Retriever then always stops first.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> FailoverConfig:
        if self.shard_hedge_after_s is not None and self.shard_hedge_after_s >= self.shard_call_timeout_s:
            raise ValueError(
                f"failover.shard_hedge_after_s={self.shard_hedge_after_s} must be < shard_call_timeout_s="
                f"{self.shard_call_timeout_s} (a hedge after the timeout would never be sent)"
            )
        if self.shard_call_timeout_s > self.shard_wait_s:
            raise ValueError(
                f"failover.shard_call_timeout_s={self.shard_call_timeout_s} must be <= shard_wait_s={self.shard_wait_s}"
            )
        if self.router_drain_s >= self.shard_wait_s:
            raise ValueError(
                f"failover.router_drain_s={self.router_drain_s} must be < shard_wait_s={self.shard_wait_s} (a "
                "stopping router's requests would fail waiting for shards before they could move to a live router)"
            )
        if self.ingress_drain_s <= self.router_drain_s:
            raise ValueError(
                f"failover.ingress_drain_s={self.ingress_drain_s} must be > router_drain_s={self.router_drain_s} "
                "(a stream moved off a stopped router needs time to end before its Ingress stops)"
            )
        return self


class RebalanceConfig(BaseModel):
    """Online rebalancing (docs/placement.md, "Online"): a placement planned from the routers' expert load window,
    deployed as a rolling update of the app (new shards and routers up first, then the old ones drain)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redundant: int = Field(
        0,
        ge=0,
        description="Redundant expert slots per MoE layer a planned placement may fill with copies of the hottest "
        "experts (their rows split between the copies by load); each shard then holds up to "
        "ceil((experts + redundant) / shards) experts a layer.",
    )
    auto_below: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Rebalance without being asked when the placement served stays below this balancedness (mean "
        "shard rows / max shard rows, averaged over MoE layers, from the routers' window) for a whole "
        "engine_config.expert_load_window_s and a plan does better by min_gain; null: only when asked "
        "(POST /v1/admin/rebalance, `moe-serve rebalance --url URL --apply`).",
    )
    min_gain: float = Field(
        0.05,
        ge=0,
        le=1,
        description="How much higher a plan's balancedness must be than the served one's to deploy it.",
    )
    check_every_s: float = Field(10.0, gt=0, description="How often auto_below is checked against the routers' load.")
    min_rows: int = Field(
        1000,
        ge=1,
        description="Rows an MoE layer's window must hold (top_k per token routed) before its balancedness is "
        "judged: a window of a few tokens says little about the load.",
    )


class ShardScaling(BaseModel):
    """One shard's replica bounds and target: what `ShardAutoscalingConfig.for_shard` resolves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(
        1,
        ge=1,
        description="Fewest replicas of the shard. At least 1: every layer of every step calls every shard that "
        "holds a routed expert, so a shard scaled to zero would stall each step for a cold start.",
    )
    max_replicas: int = Field(
        1,
        ge=1,
        description="Most replicas of the shard (each reserves shard_resources; on GPUs, one GPU). 1, as in "
        "Serve, scales nothing: set it.",
    )
    target_expert_rows_per_s: float = Field(
        1000.0,
        gt=0,
        description="Expert rows (one token row through one of the shard's experts) a replica should compute "
        "per second. Serve keeps ceil(the shard's rows per second / this) replicas, within the bounds; measure a "
        "replica's capacity (moe-serve loadtest, benchmarks/) and set this below it; 1000 is no measurement.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ShardScaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} must be <= max_replicas={self.max_replicas}")
        return self


class ShardScalingOverride(BaseModel):
    """A shard's own values; a field left out (null) is taken from `shard_autoscaling`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int | None = Field(None, ge=1, description="This shard's min_replicas.")
    max_replicas: int | None = Field(None, ge=1, description="This shard's max_replicas.")
    target_expert_rows_per_s: float | None = Field(None, gt=0, description="This shard's target_expert_rows_per_s.")


class ShardAutoscalingConfig(ShardScaling):
    """Serve autoscaling of each ExpertShard-<i> deployment on its own, on the expert rows it computes.

    The bounds and target apply to every shard; `overrides` gives single shards their own. The delays and
    the metric windows are Serve's AutoscalingConfig fields of the same names, shared by every shard.
    deployments/autoscaling.py says why the metric is expert rows per second and not Serve's ongoing requests.

        shard_autoscaling: {min_replicas: 1, max_replicas: 4, target_expert_rows_per_s: 2000,
                            overrides: {0: {max_replicas: 8}}}
    """

    upscale_delay_s: float = Field(
        30.0, ge=0, description="How long the rows must call for more replicas before Serve adds them."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="How long the rows must call for fewer replicas before Serve stops some."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="The window each replica's expert rows per second are averaged over."
    )
    metrics_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often each replica reports its rate to Serve's controller (Serve marks this field "
        "deprecated and warns when it is not 10; it is still what sets the interval in Ray 2.60).",
    )
    overrides: dict[int, ShardScalingOverride] = Field(
        default_factory=dict,
        description="Per shard index (0 .. shards-1), values of its own, e.g. {0: {max_replicas: 8}} for a shard "
        "that holds the hot experts.",
    )

    @model_validator(mode="after")
    def _windows(self) -> ShardAutoscalingConfig:
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(
                f"look_back_period_s={self.look_back_period_s} must be > metrics_interval_s="
                f"{self.metrics_interval_s} (the window must hold more than one report)"
            )
        for shard in self.overrides:
            self.for_shard(shard)  # each shard's own bounds in order
        return self

    def for_shard(self, shard: int) -> ShardScaling:
        """Shard `shard`'s bounds and target: its override's fields where set, the shared ones elsewhere."""
        fields = ShardScaling.model_fields
        own = self.overrides[shard].model_dump(exclude_none=True) if shard in self.overrides else {}
        try:
            return ShardScaling(**({name: getattr(self, name) for name in fields} | own))
        except ValidationError as e:
            raise ValueError(f"overrides.{shard}: {e.errors()[0]['msg']}") from None


class AppConfig(BaseModel):
    """Everything `build_app` needs to deploy the cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Checkpoint folder (Hugging Face format) visible to every replica.")
    served_model_name: str | None = Field(
        None, description="Model id in the OpenAI API (`model` field); default: the folder's name."
    )
    engine: Literal["native", "vllm"] = Field(
        "native",
        description="native: our engine, experts on ExpertShard deployments; vllm: one vLLM engine per replica "
        "(needs vLLM installed) in place of Router and shards, behind the same API.",
    )
    engine_config: EngineConfig = Field(
        default_factory=EngineConfig,
        description="Engine limits and dtype. With engine: vllm, dtype, kv_cache_mb, max_model_len, max_running "
        "and max_batched_tokens map to vLLM's dtype, KV cache bytes, max_model_len, max_num_seqs and "
        "max_num_batched_tokens; block_size, max_waiting, expert_kernel, overlap_min_tokens and expert_load_window_s "
        "are the native engine's own.",
    )
    vllm: VLLMOptions = Field(
        default_factory=VLLMOptions, description="vLLM's own options (parallelism, eager mode); engine: vllm only."
    )
    accelerator: Literal["cpu", "gpu"] = Field(
        "cpu", description="gpu: each shard replica and each router replica takes one GPU (num_gpus: 1)."
    )
    shards: int = Field(
        2, ge=0, description="Expert shards (ExpertShard-<i> deployments); 0 keeps experts in the router."
    )
    shard_replicas: int = Field(
        1, ge=1, description="Replicas of each shard, a fixed number (without shard_autoscaling; it sets them then)."
    )
    shard_autoscaling: ShardAutoscalingConfig | None = Field(
        None,
        description="Serve autoscaling of each shard on its own, between min_replicas and max_replicas, on the "
        "expert rows it computes (a hot shard gains replicas, cold ones do not); null: shard_replicas each.",
    )
    placement: Literal["contiguous", "round_robin", "explicit", "file"] = Field(
        "contiguous",
        description="How experts are assigned to shards: the same way in every MoE layer (contiguous, round_robin), "
        "as explicit_placement lists them (explicit: the same in every layer, or per layer), or per layer from "
        "placement_file (file).",
    )
    explicit_placement: list[list[int]] | list[list[list[int]]] | None = Field(
        None,
        description="With placement: explicit, the expert ids of each shard: [[ids on shard 0], ...] for every MoE "
        "layer alike, or [[[ids on shard 0], ...] for each MoE layer] (what a rebalance deploys; an expert on "
        "several shards is replicated, its rows split between them by load).",
    )
    placement_file: str | None = Field(
        None,
        description="With placement: file, a JSON file with a per-layer placement under `placement`, as "
        "`moe-serve rebalance --json` writes it (docs/placement.md).",
    )
    transport: Literal["handles", "direct"] = Field(
        "direct",
        description="How a router calls the shards: handles, through Serve DeploymentHandles (8-15 ms a hop here); "
        "direct, over a TCP stream to each shard replica's own port (~1 ms, benchmarks/dispatch.py), Serve handles "
        "only where no replica's port is known yet (docs/architecture.md, 'Shard transports').",
    )
    direct_rows: Literal["auto", "frames", "collective"] = Field(
        "auto",
        description="How transport: direct moves a call's rows: frames, as host bytes in the call's frame on the TCP "
        "stream; collective, device to device on a two-rank torch.distributed group per stream (NCCL between GPUs, "
        "gloo on CPUs), the frame only describing them; auto, collective where router and shard compute on CUDA "
        "(no host copy each way), frames otherwise (docs/architecture.md, 'Shard transports').",
    )
    routers: int = Field(
        1, ge=1, description="Router replicas (dense layers, gate, KV cache; they share the shards), or vLLM replicas."
    )
    router_resources: ResourceConfig = Field(default_factory=lambda: ResourceConfig(num_cpus=1.0))
    shard_resources: ResourceConfig = Field(default_factory=ResourceConfig)
    ingress_resources: ResourceConfig = Field(default_factory=lambda: ResourceConfig(num_cpus=0.25))
    api_keys_env: str = Field("MOE_SERVE_API_KEYS", description="Env var with comma-separated API keys.")
    api_keys_file: str | None = Field(None, description="File with one API key per line (e.g. a mounted Secret).")
    admin_keys_env: str = Field(
        "MOE_SERVE_ADMIN_KEYS", description="Env var with comma-separated admin keys (they may also write documents)."
    )
    admin_keys_file: str | None = Field(None, description="File with one admin key per line.")
    auth: bool = Field(False, description="Require `Authorization: Bearer <key>` on /v1 routes.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; larger ones get 413.")
    retrieval: RetrievalConfig | None = Field(None, description="RAG: the Retriever deployment; null: no retrieval.")
    failover: FailoverConfig = Field(
        default_factory=FailoverConfig, description="Retries, migration and their bounds when replicas die."
    )
    rebalance: RebalanceConfig = Field(
        default_factory=RebalanceConfig,
        description="Planning a placement from measured expert load and deploying it online, on request or by itself.",
    )

    @model_validator(mode="after")
    def _engine_fields(self) -> AppConfig:
        # Compared with the defaults rather than with model_fields_set, so a dumped and re-validated config
        # (what build_app hands the replicas) passes the same way.
        if self.engine == "vllm" and (native := [f for f in NATIVE_ONLY if getattr(self, f) != _default(f)]):
            raise ValueError(
                f"{', '.join(native)}: expert shards are the native engine's; engine: vllm runs the whole model in "
                "each replica (for expert parallelism inside vLLM set vllm.enable_expert_parallel); remove them"
            )
        if self.engine == "native" and self.vllm != VLLMOptions():
            raise ValueError("vllm: options for engine: vllm only; set engine: vllm or remove them")
        return self

    @model_validator(mode="after")
    def _placement_fits(self) -> AppConfig:
        if (self.placement == "explicit") != (self.explicit_placement is not None):
            raise ValueError("explicit_placement is required with placement: explicit, and only then")
        if (self.placement == "file") != (self.placement_file is not None):
            raise ValueError("placement_file is required with placement: file, and only then")
        for i, shards in enumerate(self.explicit_layers or ()):
            if len(shards) != self.shards:
                where = f"explicit_placement[{i}]" if self.explicit_per_layer else "explicit_placement"
                raise ValueError(f"{where} lists {len(shards)} shards but shards={self.shards}")
        return self

    @model_validator(mode="after")
    def _rows_need_the_direct_transport(self) -> AppConfig:
        if self.direct_rows != "auto" and self.transport != "direct":
            raise ValueError(
                f"direct_rows: {self.direct_rows} with transport: {self.transport}: it says how the direct transport "
                "moves rows (Serve handles pickle them); set transport: direct or remove direct_rows"
            )
        return self

    @model_validator(mode="after")
    def _one_way_to_size_shards(self) -> AppConfig:
        if (scaling := self.shard_autoscaling) is None:
            return self
        if self.shard_replicas != 1:
            raise ValueError(
                f"shard_replicas={self.shard_replicas} with shard_autoscaling: autoscaled shards have "
                "min_replicas..max_replicas replicas; remove shard_replicas (or set min_replicas)"
            )
        if self.shards == 0:
            raise ValueError("shard_autoscaling with shards: 0: there are no shards to scale; remove it")
        if outside := sorted(i for i in scaling.overrides if not 0 <= i < self.shards):
            raise ValueError(
                f"shard_autoscaling.overrides: shard(s) {outside} do not exist (shards={self.shards}: "
                f"0..{self.shards - 1})"
            )
        return self

    @property
    def explicit_per_layer(self) -> bool:
        """Whether explicit_placement gives each MoE layer its own shard lists."""
        first = self.explicit_placement[0] if self.explicit_placement else None
        return bool(first) and isinstance(first[0], list)

    @property
    def explicit_layers(self) -> list[list[list[int]]] | None:
        """explicit_placement as per-layer shard lists (one entry for a placement shared by every layer)."""
        if self.explicit_placement is None:
            return None
        return self.explicit_placement if self.explicit_per_layer else [self.explicit_placement]

    @property
    def model_name(self) -> str:
        """The model id clients use, and the `model` label of every metric."""
        return self.served_model_name or Path(self.model).name

    def shard_replica_bounds(self, shard: int) -> tuple[int, int]:
        """(fewest, most) replicas shard `shard` may have: shard_replicas both, or its autoscaling bounds."""
        if self.shard_autoscaling is None:
            return self.shard_replicas, self.shard_replicas
        scaling = self.shard_autoscaling.for_shard(shard)
        return scaling.min_replicas, scaling.max_replicas

    def total_cpus(self) -> float:
        """Logical CPUs all replicas reserve together, autoscaled shards at max_replicas (a local cluster needs
        at least this many)."""
        most = sum(self.shard_replica_bounds(i)[1] for i in range(self.shards)) if self.engine == "native" else 0
        shards = most * self.shard_resources.num_cpus
        retriever = self.retrieval.replicas * self.retrieval.resources.num_cpus if self.retrieval else 0.0
        return self.routers * self.router_resources.num_cpus + shards + self.ingress_resources.num_cpus + retriever

    def replica_options(self, resources: ResourceConfig, app_env: dict[str, str] | None = None) -> dict:
        """ray_actor_options for a router, shard or vLLM replica (a vLLM replica takes its tensor-parallel GPUs);
        `app_env`: environment variables the app sets for it (resources.env_vars override them)."""
        options = resources.ray_options(app_env)
        if self.accelerator == "gpu":
            options["num_gpus"] = self.vllm.tensor_parallel_size if self.engine == "vllm" else 1
        return options


def _default(field: str):
    info = AppConfig.model_fields[field]
    return info.default_factory() if info.default_factory is not None else info.default
