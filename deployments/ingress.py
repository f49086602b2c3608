"""Ingress: the OpenAI-compatible HTTP API (serving/api/app.py) on Serve, with handles to the routers (or the
vLLM engine) and, when retrieval is on, to the Retriever. GET /v1/admin/expert-load adds up every Router
replica's window (deployments/expert_load.py), POST /v1/admin/rebalance plans from it and deploys the plan
(deployments/rebalancer.py); with engine: vllm both are a 404 saying why."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.config import AppConfig, FailoverConfig
from deployments.expert_load import RouterLoads
from deployments.metrics import RaySink
from deployments.rebalancer import Rebalancer
from deployments.remote_errors import replica_died, unwrapped
from serving.api.app import build_api, load_api_keys
from serving.api.retrieval import Retrieval
from serving.engine_client import RequestOutput, SamplingParams
from serving.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    EngineUnavailableError,
    RequestError,
    RetrievalUnavailableError,
    StalePlacementError,
    UnknownCollectionError,
)
from serving.expert_load import ROUTE as EXPERT_LOAD_ROUTE
from serving.metrics import MIGRATIONS, HttpMetrics, MeteredClient, MetricsSink
from serving.rebalancing import ROUTE as REBALANCE_ROUTE
from serving.retrieval.ingest import Document, IngestReport
from serving.retrieval.store import Passage
from serving.tokenizer import Tokenizer

ROUTES = frozenset(
    {"/v1/models", "/v1/completions", "/v1/chat/completions", "/healthz", "/health", EXPERT_LOAD_ROUTE, REBALANCE_ROUTE}
)
RETRIEVAL_ROUTES = frozenset({"/v1/retrieve", "/v1/documents", "/v1/collections"})
# engine refusals the API maps to 4xx/503
_PASS_THROUGH = (RequestError, EngineOverloadedError, EngineStoppedError, EngineUnavailableError)
# the retriever's errors the API maps to 4xx/503 (ValueError: a bad document, a dimension clash)
_RETRIEVAL_PASS_THROUGH = (RetrievalUnavailableError, UnknownCollectionError, ValueError)


log = logging.getLogger(__name__)


STALE_PAUSE_S = 0.5  # before moving a stream off a router of another app version than its shards


class RouterClient:
    """EngineClient over the Router deployment's streaming handle (Serve balances the replicas).

    A router that dies while it streams costs the client nothing it can see: the request is sent again,
    to a live router, with the tokens already streamed as `resumed_ids`; that router prefills them with
    the prompt and continues after them (greedy and seeded sampling give what the dead one would have),
    so the client's stream goes on with no token missing or repeated and the usage counts them once.
    A request no router takes within `router_wait_s` (none up, or all full) fails with
    EngineUnavailableError (503 with Retry-After), as does one moved more than `max_migrations` times.

    During a rolling update a router may be left with shards of the other version (StalePlacementError):
    its streams move the same way, after a short pause, until they reach a router whose shards match; a
    stream still moving for that reason after `router_wait_s` fails with 503 (the versions never met).
    """

    def __init__(self, handle: DeploymentHandle, failover: FailoverConfig, metrics: MetricsSink, model: str = "model"):
        self.handle = handle.options(stream=True)
        self.failover, self.metrics, self.labels = failover, metrics, {"model": model}

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        sent: list[int] = []  # output tokens the client has been given
        deaths, stale_since = 0, None
        while True:
            # once tokens were sent, so were the prompt's logprobs (they come with the first output)
            resumed = replace(params, prompt_logprobs=None) if sent else params
            stream = self.handle.generate.remote(prompt_ids, resumed, request_id, list(sent))
            try:
                await self._assigned(stream)
                with unwrapped(_PASS_THROUGH + (StalePlacementError,)):
                    async for out in stream:
                        sent.extend(out.new_token_ids)
                        yield out
                        if out.finished:  # complete: a router dying before its stream closes loses nothing
                            return
                return
            except StalePlacementError as e:
                now = asyncio.get_running_loop().time()
                stale_since = stale_since or now
                if now - stale_since >= self.failover.router_wait_s:
                    raise EngineUnavailableError(
                        f"request {request_id}: no router's shards matched its app version within "
                        f"failover.router_wait_s={self.failover.router_wait_s:g} s ({e}); retry later"
                    ) from None
                log.info("request %s: %s; moving it after %d tokens", request_id, e, len(sent))
                reason = "stale_placement"
            except Exception as e:
                if not replica_died(e):
                    raise
                log.warning("request %s: its router died after %d tokens (%s); moving it", request_id, len(sent), e)
                deaths += 1
                if deaths > self.failover.max_migrations:
                    raise EngineUnavailableError(
                        f"request {request_id}: its router died {deaths} times "
                        f"(failover.max_migrations={self.failover.max_migrations}); retry later"
                    ) from None
                reason = "router_died"
            finally:
                stream.cancel()  # client gone or done: the router aborts the request and frees its cache
            self.metrics.record(MIGRATIONS, 1, {**self.labels, "reason": reason})
            if reason == "stale_placement":
                await asyncio.sleep(STALE_PAUSE_S)  # let Serve replace more replicas before the next try

    async def _assigned(self, stream: DeploymentResponseGenerator) -> None:
        """Wait until a router replica has taken the call, at most router_wait_s (Serve would wait forever
        for a deployment with no live replica)."""
        try:
            await asyncio.wait_for(stream._to_object_ref_gen(), self.failover.router_wait_s)
        except TimeoutError:
            raise EngineUnavailableError(
                f"no router replica took the request within failover.router_wait_s={self.failover.router_wait_s:g} "
                "s (none is up, or all are full); retry later"
            ) from None


class RetrieverHandleClient:
    """RetrieverClient (serving/api/retrieval.py) over the Retriever deployment's handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    @staticmethod
    async def _call(response):
        try:
            with unwrapped(_RETRIEVAL_PASS_THROUGH):
                return await response
        except Exception as e:
            if replica_died(e):  # Serve restarts it; meanwhile RAG answers without context (or 503 if required)
                died = f"the Retriever replica died ({type(e).__name__}); retry later"
                raise RetrievalUnavailableError(died) from None
            raise

    async def retrieve(
        self, query: str, top_k: int, collection: str | None = None, sources: Sequence[str] | None = None
    ) -> list[Passage]:
        return await self._call(self.handle.retrieve.remote(query, top_k, collection, sources))

    async def ingest(self, documents: Sequence[Document], collection: str | None = None) -> IngestReport:
        return await self._call(self.handle.ingest.remote(documents, collection))

    async def delete(self, sources: Sequence[str], collection: str | None = None) -> int:
        return await self._call(self.handle.delete.remote(sources, collection))

    async def collections(self) -> list[tuple[str, int]]:
        return await self._call(self.handle.collections.remote())


@serve.deployment(max_ongoing_requests=512)
@serve.ingress()
class Ingress:
    async def __init__(self, config: dict, router: DeploymentHandle, retriever: DeploymentHandle | None = None):
        cfg = AppConfig.model_validate(config)
        limits = await router.limits.remote()  # every router replica has the same config
        keys, admin_keys = frozenset(), frozenset()
        if cfg.auth:
            keys = load_api_keys(cfg.api_keys_env, cfg.api_keys_file)
            admin_keys = load_api_keys(cfg.admin_keys_env, cfg.admin_keys_file)
            if not keys | admin_keys:
                raise ValueError(f"auth is on but no API key is set: put keys in ${cfg.api_keys_env} or api_keys_file")
        sink = RaySink()
        retrieval = None
        if retriever is not None and cfg.retrieval is not None:
            client = RetrieverHandleClient(retriever)
            retrieval = Retrieval(
                client, cfg.retrieval.collection, timeout_s=cfg.retrieval.timeout_s, metrics=sink, model=cfg.model_name
            )
        rebalancer = None
        if cfg.engine == "native" and cfg.shards > 0:
            app_name = serve.get_replica_context().app_name
            rebalancer = Rebalancer(config, router, RouterLoads(router), app_name, sink)
            rebalancer.start_watching()  # with rebalance.auto_below: rebalances by itself
        api = build_api(
            MeteredClient(RouterClient(router, cfg.failover, sink, cfg.model_name), sink, cfg.model_name),
            Tokenizer(cfg.model),
            cfg.model_name,
            api_keys=keys,
            admin_keys=admin_keys,
            max_body_bytes=cfg.max_body_bytes,
            max_model_len=limits["max_model_len"],
            retrieval=retrieval,
            expert_load=RouterLoads(router) if cfg.engine == "native" else None,
            rebalancer=rebalancer,
        )
        self.api = HttpMetrics(api, sink, cfg.model_name, ROUTES | RETRIEVAL_ROUTES)

    def __serve_build_asgi_app__(self):
        return self.api
