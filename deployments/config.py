"""The app's one config model. The same `args:` block is used by `serve run configs/X.yaml`, by
`moe-serve run`, by Python (`build_app(args)`) and inside the RayService's serveConfigV2.

Validated once, in `build_app`; unknown fields are errors that name the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.engine import EngineConfig


class ResourceConfig(BaseModel):
    """Resources of one replica. On GPU nodes each replica takes one whole GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica (fractions allowed).")
    memory_gb: float | None = Field(None, gt=0, description="Memory reserved per replica, GiB (optional).")


class AppConfig(BaseModel):
    """Everything `build_app` needs to deploy the cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Checkpoint folder (Hugging Face format) visible to every replica.")
    served_model_name: str | None = Field(
        None, description="Model id in the OpenAI API (`model` field); default: the folder's name."
    )
    engine: Literal["native"] = Field("native", description="Inference engine.")
    engine_config: EngineConfig = Field(default_factory=EngineConfig, description="Engine limits and dtype.")
    accelerator: Literal["cpu", "gpu"] = Field(
        "cpu", description="gpu: each shard replica and each router replica takes one GPU (num_gpus: 1)."
    )
    shards: int = Field(
        2, ge=0, description="Expert shards (ExpertShard-<i> deployments); 0 keeps experts in the router."
    )
    shard_replicas: int = Field(1, ge=1, description="Replicas of each shard.")
    placement: Literal["contiguous", "round_robin", "explicit"] = Field(
        "contiguous", description="How experts are assigned to shards."
    )
    explicit_placement: list[list[int]] | None = Field(
        None, description="With placement: explicit, the expert ids of each shard (one list per shard)."
    )
    routers: int = Field(1, ge=1, description="Router replicas (dense layers, gate, KV cache); they share the shards.")
    router_resources: ResourceConfig = Field(default_factory=lambda: ResourceConfig(num_cpus=1.0))
    shard_resources: ResourceConfig = Field(default_factory=ResourceConfig)
    ingress_resources: ResourceConfig = Field(default_factory=lambda: ResourceConfig(num_cpus=0.25))
    api_keys_env: str = Field("MOE_SERVE_API_KEYS", description="Env var with comma-separated API keys.")
    api_keys_file: str | None = Field(None, description="File with one API key per line (e.g. a mounted Secret).")
    auth: bool = Field(False, description="Require `Authorization: Bearer <key>` on /v1 routes.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; larger ones get 413.")

    @model_validator(mode="after")
    def _placement_fits(self) -> AppConfig:
        if (self.placement == "explicit") != (self.explicit_placement is not None):
            raise ValueError("explicit_placement is required with placement: explicit, and only then")
        if self.explicit_placement is not None and len(self.explicit_placement) != self.shards:
            raise ValueError(f"explicit_placement lists {len(self.explicit_placement)} shards but shards={self.shards}")
        return self

    @property
    def model_name(self) -> str:
        """The model id clients use, and the `model` label of every metric."""
        return self.served_model_name or Path(self.model).name

    def total_cpus(self) -> float:
        """Logical CPUs all replicas reserve together (a local cluster needs at least this many)."""
        shards = self.shards * self.shard_replicas * self.shard_resources.num_cpus
        return self.routers * self.router_resources.num_cpus + shards + self.ingress_resources.num_cpus

    def replica_options(self, resources: ResourceConfig) -> dict:
        """ray_actor_options for a router or shard replica."""
        options: dict = {"num_cpus": resources.num_cpus}
        if self.accelerator == "gpu":
            options["num_gpus"] = 1
        if resources.memory_gb is not None:
            options["memory"] = int(resources.memory_gb * 2**30)
        return options
