"""One Serve deployment for both engines: a replica builds its engine from a factory, then serves it.

The factory says what the replica runs and under which deployment name:
- `NativeEngineFactory` -> deployment `Router`: our engine with the dense part of the model (embeddings,
  attention and its KV cache, norms, the gate) and continuous batching; routed experts on the
  ExpertShard-<i> deployments, or in this process when there are no shards.
- `VLLMEngineFactory` -> deployment `VLLMEngine`: vLLM's AsyncLLM on the whole checkpoint.
Both build a ServedEngine (serving/engine_client.py), so this class and the Ingress are the same for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from deployments.direct_transport import DirectTransport, serve_discovery
from deployments.metrics import RaySink
from deployments.transport import HandleTransport
from router.placement import LayeredPlacement
from serving.engine_client import RequestOutput, SamplingParams, ServedEngine
from serving.errors import RequestError
from serving.expert_load import ExpertLoad

if TYPE_CHECKING:
    from serving.engine.llm_engine import LLMEngine


class EngineFactory(Protocol):
    """Builds a replica's engine inside the replica (bound arguments travel to it pickled)."""

    deployment_name: str

    def build(self, replica: str) -> ServedEngine: ...

    def shard_versions(self) -> list[str]:
        """The version each expert shard of this app version has (serving/experts/sharded.py,
        shard_version); [] when there are no shards."""
        ...

    def expert_placement(self) -> LayeredPlacement | None:
        """Which shard holds which experts in each MoE layer; None when no shards run them."""
        ...


@dataclass(frozen=True)
class NativeEngineFactory:
    """Our engine; with a placement, the experts live on `shards` (handles of ExpertShard-<i>, in order)."""

    config: dict  # AppConfig, dumped (validated once in build_app, again in the replica)
    placement: LayeredPlacement | None
    shards: list[DeploymentHandle] = field(default_factory=list)
    deployment_name: str = "Router"

    def build(self, replica: str) -> ServedEngine:
        from serving.engine.async_engine import AsyncEngine

        # loaded on the engine thread, where it will run (serving/engine/async_engine.py says why)
        return AsyncEngine(lambda: self._load(replica), name="router")

    def _load(self, replica: str) -> LLMEngine:
        """The replica's LLMEngine: the model's dense part, its experts (in process) or the shards' backend."""
        # Imported here: the Ingress process imports this module for the factory's type, never the model.
        from serving.engine.llm_engine import LLMEngine
        from serving.experts.kernels import kernel_of
        from serving.experts.loading import load_experts
        from serving.experts.local import LocalExpertBackend
        from serving.experts.row_channel import rows_on_channel
        from serving.experts.shard_rows import ShardRowsWindow
        from serving.experts.sharded import RetryPolicy, ShardedExpertBackend
        from serving.metrics import EXPERT_KERNEL
        from serving.model.decoder import load_model
        from serving.model.device import resolve_device
        from serving.model.dtypes import torch_dtype
        from serving.tokenizer import Tokenizer

        cfg = AppConfig.model_validate(self.config)
        dtype = torch_dtype(cfg.engine_config.dtype)
        device = resolve_device(cfg.engine_config.device, cfg.accelerator, f"{self.deployment_name} replica {replica}")
        model, ckpt = load_model(cfg.model, dtype, device)
        sink, name = RaySink(), cfg.model_name
        if self.placement is None:
            every = list(range(model.config.num_experts))
            layers = load_experts(ckpt, model.config, every, dtype, device, cfg.engine_config.expert_kernel)
            sink.record(EXPERT_KERNEL, 1, {"model": name, "kernel": kernel_of(layers)})
            experts = LocalExpertBackend(layers)
        else:  # the shards run the experts (and record their kernel)
            failover = cfg.failover
            timeouts = failover.shard_call_timeout_s, failover.shard_hedge_after_s
            transport = HandleTransport(self.shards, sink, name, *timeouts, self.shard_versions())
            if cfg.transport == "direct":  # the handles stay, for shards whose replicas' ports are not known yet
                discover = serve_discovery(self.shards)
                row_device = device if rows_on_channel(cfg.direct_rows, device) else None
                transport = DirectTransport(transport, discover, len(self.shards), sink, name, *timeouts,
                                            self.shard_versions(), row_device=row_device)  # fmt: skip
            policy = RetryPolicy(wait_s=failover.shard_wait_s)
            per_layer = dict(zip(model.config.moe_layer_ids, self.placement.layers, strict=True))
            rows = ShardRowsWindow(self.placement.num_shards, cfg.engine_config.expert_load_window_s)
            experts = ShardedExpertBackend(per_layer, transport, policy, sink, name, replica, rows)
        labels = {"model": name, "replica": replica}
        return LLMEngine(model, experts, Tokenizer(cfg.model), cfg.engine_config, metrics=sink, metric_labels=labels)

    def expert_placement(self) -> LayeredPlacement | None:
        return self.placement

    def shard_versions(self) -> list[str]:
        from serving.experts.sharded import shard_version
        from serving.model.config import ModelConfig

        if self.placement is None:
            return []
        model = AppConfig.model_validate(self.config).model
        layers = ModelConfig.from_pretrained(model).moe_layer_ids
        return [
            shard_version(model, s, dict(zip(layers, self.placement.experts_of(s), strict=True)))
            for s in range(self.placement.num_shards)
        ]


@dataclass(frozen=True)
class VLLMEngineFactory:
    """vLLM's AsyncLLM on the whole model (engine: vllm)."""

    config: dict
    deployment_name: str = "VLLMEngine"

    def shard_versions(self) -> list[str]:
        return []

    def expert_placement(self) -> LayeredPlacement | None:
        return None

    def build(self, replica: str) -> ServedEngine:
        from serving.vllm_engine import AsyncVLLMEngine

        cfg = AppConfig.model_validate(self.config)
        labels = {"model": cfg.model_name, "replica": replica}
        return AsyncVLLMEngine(cfg.model, cfg.engine_config, cfg.vllm, metrics=RaySink(), metric_labels=labels)


def _plan(load: ExpertLoad, current: LayeredPlacement, redundant: int) -> dict:
    """router/rebalance.py's report as JSON; a redundant count that cannot be placed is the caller's RequestError."""
    import torch

    from router.placement import PlacementError
    from router.rebalance import rebalance

    rows = torch.tensor(load.load, dtype=torch.int64)  # [L, E]
    try:
        return rebalance(rows, current.num_shards, redundant, current=current).to_json()
    except PlacementError as e:
        raise RequestError(f"redundant={redundant}: {e}") from None


@serve.deployment(max_ongoing_requests=256)
class EngineReplica:
    async def __init__(self, factory: EngineFactory):
        # async: vLLM's output handler must live on the event loop that runs `generate`
        self.engine = factory.build(serve.get_replica_context().replica_tag)
        self._shard_versions = factory.shard_versions()
        self._placement = factory.expert_placement()

    def shard_versions(self) -> list[str]:
        """The shard versions this replica's calls carry (a new shard replica asks, see ExpertShard)."""
        return self._shard_versions

    def limits(self) -> dict:
        """The context limit this replica enforces (model, config and KV cache size together)."""
        return {"max_model_len": self.engine.max_model_len}

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        resumed_ids: list[int] | tuple[int, ...] = (),
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (a Serve streaming method: call with handle.options(stream=True)).
        `resumed_ids`: the tokens a dead replica already streamed for it (the Ingress migrates it here)."""
        async with aclosing(self.engine.generate(prompt_ids, params, request_id, resumed_ids)) as stream:
            async for out in stream:  # cancelled by the caller: closing the stream aborts the request
                yield out

    async def expert_load(self) -> ExpertLoad:
        """This replica's expert load window (the native engine's; the Ingress broadcasts this to every
        Router replica and adds the answers up: deployments/expert_load.py)."""
        measure = getattr(self.engine, "expert_load", None)
        if measure is None:
            raise NotImplementedError(f"{type(self.engine).__name__} does not measure expert load")
        return await measure()

    async def plan_rebalance(self, load: ExpertLoad, redundant: int) -> dict:
        """A placement planned for `load` (all routers' window, summed by the Ingress) with `redundant` extra
        slots a layer, beside the one served now: router/rebalance.py's report as JSON (current_* included).
        Planned here, where torch is, so the Ingress never imports it; in a thread, so streams keep going."""
        if self._placement is None:
            raise NotImplementedError("no expert shards run this engine's experts: there is no placement to plan")
        return await asyncio.to_thread(_plan, load, self._placement, redundant)

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)
