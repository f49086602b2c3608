"""Ingress: the OpenAI-compatible HTTP API (serving/api.py) on Serve, with handles to the routers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from deployments.metrics import RaySink
from serving.api import build_api, load_api_keys
from serving.engine import RequestOutput
from serving.errors import EngineOverloadedError, EngineStoppedError, RequestError
from serving.metrics import HttpMetrics, MeteredClient
from serving.sampling import SamplingParams
from serving.tokenizer import Tokenizer

ROUTES = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/healthz"})
_PASS_THROUGH = (RequestError, EngineOverloadedError, EngineStoppedError)  # engine refusals the API maps to 4xx


class RouterClient:
    """EngineClient over the Router deployment's streaming handle (Serve balances the replicas)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        stream = self.handle.generate.remote(prompt_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        except RayTaskError as e:  # unwrap the engine's own refusals so the API answers 4xx
            if isinstance(e.cause, _PASS_THROUGH):
                raise e.cause from None
            raise
        finally:
            stream.cancel()  # client gone or done: the router aborts the request and frees its cache


@serve.deployment(max_ongoing_requests=512)
@serve.ingress()
class Ingress:
    async def __init__(self, config: dict, router: DeploymentHandle):
        cfg = AppConfig.model_validate(config)
        limits = await router.limits.remote()  # every router replica has the same config
        keys = load_api_keys(cfg.api_keys_env, cfg.api_keys_file) if cfg.auth else frozenset()
        if cfg.auth and not keys:
            raise ValueError(f"auth is on but no API key is set: put keys in ${cfg.api_keys_env} or api_keys_file")
        sink = RaySink()
        api = build_api(
            MeteredClient(RouterClient(router), sink, cfg.model_name),
            Tokenizer(cfg.model),
            cfg.model_name,
            api_keys=keys,
            max_body_bytes=cfg.max_body_bytes,
            max_model_len=limits["max_model_len"],
        )
        self.api = HttpMetrics(api, sink, cfg.model_name, ROUTES)

    def __serve_build_asgi_app__(self):
        return self.api
