"""One embedder and one store behind the operations the HTTP API offers: retrieve, ingest, delete, list.

    >>> service = RetrievalService.open(RetrievalSettings(store_path=".data/qdrant"))
    >>> service.ingest([Document("notes.md", "Experts live on shards.")], "docs").chunks
    1
    >>> [p.source for p in service.retrieve("where do experts live?", top_k=1, collection="docs")]
    ['notes.md']
    >>> client = AsyncRetrieval(service)        # the same calls as coroutines, for serving/api/retrieval.py

`RetrievalService` is synchronous and owns its store: in embedded mode only one process may open the
store folder, so one service (one Retriever replica) serves a whole app. `AsyncRetrieval` runs the
calls on two worker threads, one for reads (searches, listing) and one for writes (ingest, delete),
so an event loop never blocks on embedding, and a long ingest does not hold searches up: the two
embed in parallel, and only their store calls take turns (VectorStore's lock).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from serving.errors import ConfigError
from serving.retrieval.chunking import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP_TOKENS
from serving.retrieval.embedder import Embedder
from serving.retrieval.ingest import Document, IngestReport, ingest_documents, read_documents
from serving.retrieval.store import DEFAULT_TIMEOUT_S, Passage, VectorStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalSettings:
    """Where the vectors live and how documents are cut; deployments/config.py fills this from the app config."""

    store_path: str = ".data/qdrant"  # the embedded store's folder (when qdrant_url is None)
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S  # each call to a Qdrant server
    embedding_model: str | None = None  # a sentence-transformers folder; None: all-MiniLM-L6-v2
    chunk_tokens: int = DEFAULT_MAX_TOKENS
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS
    collection: str = "docs"  # requests that name no collection use this one
    ingest_on_start: tuple[str, ...] = field(default=())  # files/folders ingested when `collection` is empty


class RetrievalService:
    """Synchronous retrieval over one embedder and one store (see the module docstring)."""

    def __init__(self, embedder: Embedder, store: VectorStore, settings: RetrievalSettings):
        self.embedder, self.store, self.settings = embedder, store, settings

    @classmethod
    def open(cls, settings: RetrievalSettings) -> RetrievalService:
        embedder = Embedder(settings.embedding_model)
        where = {"url": settings.qdrant_url, "api_key": settings.qdrant_api_key, "timeout_s": settings.timeout_s}
        store = VectorStore(embedder.dim, path=settings.store_path, **where)
        return cls(embedder, store, settings)

    def retrieve(
        self, query: str, top_k: int, collection: str | None = None, sources: Sequence[str] | None = None
    ) -> list[Passage]:
        """The `top_k` passages closest to `query`, best first; only from `sources` when given."""
        if not query.strip():
            raise ValueError("query: must not be empty")
        vector = self.embedder.embed_query(query)
        name = collection or self.settings.collection
        return self.store.search(name, vector, top_k, list(sources) if sources else None)

    def ingest(self, documents: Sequence[Document], collection: str | None = None) -> IngestReport:
        """Write `documents` (replacing what their sources held); the collection is created if missing."""
        return ingest_documents(
            documents, self.store, self.embedder, collection or self.settings.collection,
            max_tokens=self.settings.chunk_tokens, overlap_tokens=self.settings.overlap_tokens,
        )  # fmt: skip

    def delete(self, sources: Sequence[str], collection: str | None = None) -> int:
        """Delete every chunk of `sources`; returns how many chunks there were."""
        name = collection or self.settings.collection
        self.store.count(name)  # an unknown collection is an error, not "0 deleted"
        return sum(self.store.delete_source(name, source) for source in sources)

    def collections(self) -> list[tuple[str, int]]:
        """(name, point count) of every collection."""
        return self.store.collections()

    def ingest_on_start(self) -> IngestReport | None:
        """Ingest `settings.ingest_on_start` into the default collection if it is missing or empty (first start).

        Files are named relative to the folder that holds all the configured paths ([/x/README.md, /x/docs]
        gives README.md and docs/a.md), whatever folder the replica runs in."""
        paths, name = self.settings.ingest_on_start, self.settings.collection
        if not paths or dict(self.collections()).get(name, 0) > 0:
            return None
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise ConfigError(f"retrieval ingest_on_start: {', '.join(missing)} does not exist")
        root = Path(os.path.commonpath([Path(p).resolve().parent for p in paths]))
        documents, _ = read_documents(paths, root)
        report = self.ingest(documents, name)
        log.info("ingested %s into %r on first start: %s", ", ".join(paths), name, report.summary())
        return report

    def close(self) -> None:
        self.store.close()


class AsyncRetrieval:
    """The RetrieverClient the HTTP API calls (serving/api/retrieval.py), over a service in this process."""

    def __init__(self, service: RetrievalService):
        self.service = service
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-read")
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-write")

    @staticmethod
    async def _on(worker: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(worker, partial(fn, *args))

    async def retrieve(
        self, query: str, top_k: int, collection: str | None = None, sources: Sequence[str] | None = None
    ) -> list[Passage]:
        return await self._on(self._reads, self.service.retrieve, query, top_k, collection, sources)

    async def ingest(self, documents: Sequence[Document], collection: str | None = None) -> IngestReport:
        return await self._on(self._writes, self.service.ingest, documents, collection)

    async def delete(self, sources: Sequence[str], collection: str | None = None) -> int:
        return await self._on(self._writes, self.service.delete, sources, collection)

    async def collections(self) -> list[tuple[str, int]]:
        return await self._on(self._reads, self.service.collections)

    def close(self) -> None:
        """Wait for the running calls, then release the store (its folder lock, in embedded mode)."""
        for worker in (self._reads, self._writes):
            worker.shutdown(wait=True, cancel_futures=True)
        self.service.close()


def api_key_from_env(env_var: str | None) -> str | None:
    """A Qdrant API key from an environment variable; None when the variable is unset or empty."""
    return (os.environ.get(env_var) or None) if env_var else None
