"""Retrieval in the HTTP API: the routes, and the context step of chat/completions requests.

    >>> retrieval = Retrieval(AsyncRetrieval(RetrievalService.open(settings)), "docs", timeout_s=2.0)
    >>> app = build_api(engine, tokenizer, "demo", max_model_len=2048, retrieval=retrieval)

Routes (bodies in serving/api/retrieval_bodies.py): POST /v1/retrieve, POST /v1/documents,
DELETE /v1/documents?source=...&collection=..., GET /v1/collections. Without retrieval configured
they answer 404 and a request's `retrieval` field is a 400, both saying retrieval is off.

Every search is bounded by `timeout_s` (the store's own timeouts bound each Qdrant call; this bounds
the whole search, queueing and hop to the Retriever included). A search that fails or times out is a
503 from /v1/retrieve and from a request with `"required": true`; with `"required": false` the request
is answered without context and its `retrieval` says why. An unknown collection is always a 404: a
wrong name is the caller's mistake, not an outage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

from fastapi import FastAPI, Query, Response

from serving.api.errors import APIError
from serving.api.openapi import errors
from serving.api.retrieval_bodies import (
    CollectionList,
    CollectionOut,
    DeleteResponse,
    IngestRequest,
    IngestResponse,
    Name,
    PassageOut,
    RetrievalInfo,
    RetrievalOptions,
    RetrieveRequest,
    RetrieveResponse,
)
from serving.errors import RetrievalUnavailableError, UnknownCollectionError
from serving.metrics import RETRIEVAL, RETRIEVAL_ERRORS, MetricsSink, NullSink
from serving.retrieval.ingest import Document, IngestReport
from serving.retrieval.store import Passage

DEFAULT_TIMEOUT_S = 2.0


class RetrieverClient(Protocol):
    """What the API needs from retrieval: serving.retrieval.AsyncRetrieval in one process, the Retriever
    deployment's handle on Ray Serve. A None collection means the retriever's default collection."""

    async def retrieve(
        self, query: str, top_k: int, collection: str | None = None, sources: Sequence[str] | None = None
    ) -> list[Passage]: ...

    async def ingest(self, documents: Sequence[Document], collection: str | None = None) -> IngestReport: ...

    async def delete(self, sources: Sequence[str], collection: str | None = None) -> int: ...

    async def collections(self) -> list[tuple[str, int]]: ...


class Retrieval:
    """A RetrieverClient with the API's policy around it: the default collection, the search timeout, metrics."""

    def __init__(
        self,
        client: RetrieverClient,
        default_collection: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        metrics: MetricsSink | None = None,
        model: str = "",
    ):
        self.client, self.default_collection, self.timeout_s = client, default_collection, timeout_s
        self.metrics, self.labels = metrics or NullSink(), {"model": model}

    async def search(
        self, query: str, top_k: int, collection: str | None, sources: Sequence[str] | None
    ) -> list[Passage]:
        """Passages for `query`, best first; raises RetrievalUnavailableError after `timeout_s` at most."""
        start = time.perf_counter()
        try:
            passages = await asyncio.wait_for(self.client.retrieve(query, top_k, collection, sources), self.timeout_s)
        except TimeoutError:
            self._failed("timeout")
            raise RetrievalUnavailableError(
                f"retrieval did not answer within {self.timeout_s:g} s (the vector store is slow or unreachable)"
            ) from None
        except RetrievalUnavailableError:
            self._failed("unavailable")
            raise
        except UnknownCollectionError:
            self._failed("unknown_collection")
            raise
        except ValueError:
            self._failed("bad_request")
            raise
        self.metrics.record(RETRIEVAL, time.perf_counter() - start, self.labels)
        return passages

    def _failed(self, reason: str) -> None:
        self.metrics.record(RETRIEVAL_ERRORS, 1, {**self.labels, "reason": reason})

    async def context(self, options: RetrievalOptions, query: str) -> tuple[list[Passage], RetrievalInfo]:
        """The passages to fuse into a chat/completions prompt, and what to tell the client about them."""
        collection = options.collection or self.default_collection
        sources = options.filter.sources if options.filter else None
        try:
            passages = await self.search(query, options.top_k, collection, sources)
        except RetrievalUnavailableError as exc:
            if options.required:
                raise APIError(
                    503, f"retrieval is required for this request and failed: {exc}", type="server_error",
                    param="retrieval", code="retrieval_unavailable", headers={"Retry-After": "1"},
                ) from exc  # fmt: skip
            return [], RetrievalInfo(collection=collection, used=False, sources=[], error=str(exc))
        return passages, RetrievalInfo(collection=collection, used=bool(passages), sources=PassageOut.ranked(passages))


def retrieval_off(what: str) -> APIError:
    return APIError(
        404 if what.startswith("/") else 400,
        f"{what}: retrieval is not enabled on this server (AppConfig `retrieval`)",
        param=None if what.startswith("/") else "retrieval",
        code="retrieval_disabled",
    )


def install_retrieval_routes(app: FastAPI, retrieval: Retrieval | None) -> None:
    """Add /v1/retrieve, /v1/documents and /v1/collections to `app` (404s when `retrieval` is None)."""

    def need() -> Retrieval:
        if retrieval is None:
            raise retrieval_off("/v1/retrieve, /v1/documents and /v1/collections")
        return retrieval

    def json(model) -> Response:
        return Response(model.model_dump_json(), media_type="application/json")

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=errors(400, 404, 503))
    async def retrieve(body: RetrieveRequest) -> Response:
        r = need()
        collection = body.collection or r.default_collection
        sources = body.filter.sources if body.filter else None
        try:
            passages = await r.search(body.query, body.top_k, collection, sources)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        return json(RetrieveResponse(collection=collection, data=PassageOut.ranked(passages)))

    @app.post("/v1/documents", response_model=IngestResponse, responses=errors(400, 404, 503))
    async def ingest(body: IngestRequest) -> Response:
        r = need()
        collection = body.collection or r.default_collection
        try:
            report = await r.client.ingest(body.to_documents(), collection)
        except ValueError as exc:  # a dimension clash with an existing collection, a bad document
            raise APIError(400, str(exc)) from exc
        return json(IngestResponse.of(collection, report))

    @app.delete("/v1/documents", response_model=DeleteResponse, responses=errors(400, 404, 503))
    async def delete(
        source: list[Name] = Query(min_length=1, description="A source to delete; repeat for several."),  # noqa: B008
        collection: str | None = None,
    ) -> Response:
        r = need()
        name = collection or r.default_collection
        return json(DeleteResponse(collection=name, deleted=await r.client.delete(source, name)))

    @app.get("/v1/collections", response_model=CollectionList, responses=errors(404, 503))
    async def collections() -> Response:
        found = await need().client.collections()
        return json(CollectionList(data=[CollectionOut(name=n, points=p) for n, p in found]))
