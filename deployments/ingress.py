"""Ingress: the OpenAI-compatible HTTP API (serving/api/app.py) on Serve, with handles to the routers (or the
vLLM engine) and, when retrieval is on, to the Retriever."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from deployments.metrics import RaySink
from serving.api.app import build_api, load_api_keys
from serving.api.retrieval import Retrieval
from serving.engine_client import RequestOutput, SamplingParams
from serving.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    RequestError,
    RetrievalUnavailableError,
    UnknownCollectionError,
)
from serving.metrics import HttpMetrics, MeteredClient
from serving.retrieval.ingest import Document, IngestReport
from serving.retrieval.store import Passage
from serving.tokenizer import Tokenizer

ROUTES = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/healthz"})
RETRIEVAL_ROUTES = frozenset({"/v1/retrieve", "/v1/documents", "/v1/collections"})
_PASS_THROUGH = (RequestError, EngineOverloadedError, EngineStoppedError)  # engine refusals the API maps to 4xx
# the retriever's errors the API maps to 4xx/503 (ValueError: a bad document, a dimension clash)
_RETRIEVAL_PASS_THROUGH = (RetrievalUnavailableError, UnknownCollectionError, ValueError)


@contextmanager
def _unwrapped(kinds: tuple[type[Exception], ...]) -> Iterator[None]:
    """Raise a replica's own exception of one of `kinds` (the API maps those to 4xx/503) instead of
    Ray's RayTaskError around it; any other failure stays as it is."""
    try:
        yield
    except RayTaskError as e:
        if isinstance(e.cause, kinds):
            raise e.cause from None
        raise


class RouterClient:
    """EngineClient over the Router deployment's streaming handle (Serve balances the replicas)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        stream = self.handle.generate.remote(prompt_ids, params, request_id)
        try:
            with _unwrapped(_PASS_THROUGH):
                async for out in stream:
                    yield out
        finally:
            stream.cancel()  # client gone or done: the router aborts the request and frees its cache


class RetrieverHandleClient:
    """RetrieverClient (serving/api/retrieval.py) over the Retriever deployment's handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    @staticmethod
    async def _call(response):
        with _unwrapped(_RETRIEVAL_PASS_THROUGH):
            return await response

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
        api = build_api(
            MeteredClient(RouterClient(router), sink, cfg.model_name),
            Tokenizer(cfg.model),
            cfg.model_name,
            api_keys=keys,
            admin_keys=admin_keys,
            max_body_bytes=cfg.max_body_bytes,
            max_model_len=limits["max_model_len"],
            retrieval=retrieval,
        )
        self.api = HttpMetrics(api, sink, cfg.model_name, ROUTES | RETRIEVAL_ROUTES)

    def __serve_build_asgi_app__(self):
        return self.api
