"""Retriever: the RAG deployment. Embeds queries and documents and owns the connection to Qdrant.

With the embedded store (no qdrant_url) this replica is the only process that opens the store's folder
(config validation allows one replica then); with a Qdrant server, replicas scale out and share it.
On its first start it ingests `retrieval.ingest_on_start` into the default collection, so a fresh demo
answers RAG requests with real passages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from ray import serve

from deployments.config import AppConfig, RetrievalConfig
from serving.errors import RetrievalUnavailableError
from serving.retrieval.ingest import Document, IngestReport
from serving.retrieval.service import AsyncRetrieval, RetrievalService, RetrievalSettings, api_key_from_env
from serving.retrieval.store import Passage

log = logging.getLogger(__name__)

LOCK_WAIT_S = 60.0  # a replica being replaced may still hold the embedded store's folder for a moment


def retrieval_settings(cfg: RetrievalConfig) -> RetrievalSettings:
    """The library's settings; the Qdrant API key is read here, in the replica that uses it."""
    return RetrievalSettings(
        store_path=cfg.store_path, qdrant_url=cfg.qdrant_url, qdrant_api_key=api_key_from_env(cfg.qdrant_api_key_env),
        timeout_s=cfg.timeout_s, embedding_model=cfg.embedding_model, chunk_tokens=cfg.chunk_tokens,
        overlap_tokens=cfg.overlap_tokens, collection=cfg.collection, ingest_on_start=tuple(cfg.ingest_on_start),
    )  # fmt: skip


def _open(settings: RetrievalSettings) -> RetrievalService:
    """Open the service; in embedded mode, wait up to LOCK_WAIT_S for a replica that is going away to let go."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return RetrievalService.open(settings)
        except RetrievalUnavailableError:
            if settings.qdrant_url is not None or time.monotonic() > deadline:
                raise
            log.info("the embedded store %s is still open elsewhere; retrying", settings.store_path)
            time.sleep(1.0)


@serve.deployment(max_ongoing_requests=64)
class Retriever:
    def __init__(self, config: dict):
        cfg = AppConfig.model_validate(config).retrieval
        if cfg is None:
            raise ValueError("the Retriever deployment needs a `retrieval` block in the app config")
        service = _open(retrieval_settings(cfg))
        service.ingest_on_start()
        service.store.preload()  # the embedded store's vectors in memory before the first search
        self.retrieval = AsyncRetrieval(service)

    async def retrieve(
        self, query: str, top_k: int, collection: str | None = None, sources: Sequence[str] | None = None
    ) -> list[Passage]:
        return await self.retrieval.retrieve(query, top_k, collection, sources)

    async def ingest(self, documents: Sequence[Document], collection: str | None = None) -> IngestReport:
        return await self.retrieval.ingest(documents, collection)

    async def delete(self, sources: Sequence[str], collection: str | None = None) -> int:
        return await self.retrieval.delete(sources, collection)

    async def collections(self) -> list[tuple[str, int]]:
        return await self.retrieval.collections()

    def __del__(self) -> None:
        retrieval = getattr(self, "retrieval", None)
        if retrieval is not None:
            retrieval.close()  # releases the embedded store's folder for the next replica
