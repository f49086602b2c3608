"""VLLMEngine: vLLM's AsyncLLM serving the whole checkpoint in one replica (engine: vllm), in place of
Router + ExpertShards. It has the Router's `generate` and `limits`, so the Ingress is the same for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve

from deployments.config import AppConfig
from deployments.metrics import RaySink
from serving.engine import RequestOutput
from serving.sampling import SamplingParams
from serving.vllm_engine import AsyncVLLMEngine


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class VLLMEngine:
    async def __init__(self, config: dict):
        # async: vLLM's output handler must live on the event loop that runs `generate`
        cfg = AppConfig.model_validate(config)
        labels = {"model": cfg.model_name, "replica": serve.get_replica_context().replica_tag}
        self.engine = AsyncVLLMEngine(cfg.model, cfg.engine_config, cfg.vllm, metrics=RaySink(), metric_labels=labels)

    def limits(self) -> dict:
        """The context limit vLLM enforces (model and config together)."""
        return {"max_model_len": self.engine.max_model_len}

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (a Serve streaming method: call with handle.options(stream=True))."""
        async with aclosing(self.engine.generate(prompt_ids, params, request_id)) as stream:
            async for out in stream:  # cancelled by the caller: closing the stream aborts the request
                yield out

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the vLLM engine has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
