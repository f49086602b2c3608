"""Router: the dense part of the model (embeddings, attention and its KV cache, norms, the gate) and
continuous batching, with routed experts on the ExpertShard deployments (or in process when shards=0).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from deployments.metrics import RaySink
from deployments.transport import HandleTransport
from router.placement import Placement
from serving.async_engine import AsyncEngine
from serving.engine import LLMEngine, RequestOutput
from serving.experts import LocalExpertBackend
from serving.model import load_experts, load_model
from serving.sampling import SamplingParams
from serving.sharded_experts import ShardedExpertBackend
from serving.tokenizer import Tokenizer


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class Router:
    def __init__(self, config: dict, placement: Placement | None, *shards: DeploymentHandle):
        torch.set_grad_enabled(False)
        cfg = AppConfig.model_validate(config)
        dtype = cfg.engine_config.torch_dtype
        model, ckpt = load_model(cfg.model, dtype)
        sink, name = RaySink(), cfg.model_name
        if placement is None:
            experts = LocalExpertBackend(load_experts(ckpt, model.config, list(range(model.config.num_experts)), dtype))
        else:
            experts = ShardedExpertBackend(placement, HandleTransport(list(shards), sink, name))
        replica = serve.get_replica_context().replica_tag
        labels = {"model": name, "replica": replica}
        engine = LLMEngine(model, experts, Tokenizer(cfg.model), cfg.engine_config, metrics=sink, metric_labels=labels)
        self.max_model_len = engine.max_model_len
        self.engine = AsyncEngine(engine, name="router")

    def limits(self) -> dict:
        """The context limit this router enforces (model, config and KV cache size together)."""
        return {"max_model_len": self.max_model_len}

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (a Serve streaming method: call with handle.options(stream=True))."""
        async with aclosing(self.engine.generate(prompt_ids, params, request_id)) as stream:
            async for out in stream:  # cancelled by the caller: closing the stream aborts the request
                yield out

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)
