"""Ingest into a running server over HTTP (`moe-serve ingest --url`): POST /v1/documents in batches.

    >>> docs, skipped = read_documents(["README.md", "docs"])
    >>> send_documents("http://127.0.0.1:8000", docs, "docs", api_key=None).summary()
    '3 files, 50 chunks in 6.1 s (8 chunks/s), 0 stale chunks deleted, 0 files skipped'
    >>> delete_sources("http://127.0.0.1:8000", ["docs/kubernetes.md"], "docs", api_key=None)
    9

Documents are sent in requests of at most `batch_bytes` of JSON (a document larger than that goes
alone), so a large corpus never hits the server's body limit (max_body_bytes, 1 MiB by default) and
the progress bar moves. The server chunks and embeds; this side only reads files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import httpx
from tqdm import tqdm

from serving.http_client import error_message
from serving.retrieval.ingest import Document, IngestReport

BATCH_BYTES = 256 * 1024
TIMEOUT_S = 300.0  # one batch: the server embeds it on CPU
SOURCES_PER_DELETE = 50  # keeps the query string far below servers' URL limits


class RemoteIngestError(RuntimeError):
    """The server refused or failed a request; the message has its status and error message."""


def _batches(documents: Sequence[Document], batch_bytes: int) -> list[list[Document]]:
    batches: list[list[Document]] = [[]]
    size = 0
    for doc in documents:
        doc_bytes = len(json.dumps({"source": doc.source, "text": doc.text}))
        if batches[-1] and size + doc_bytes > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(doc)
        size += doc_bytes
    return [b for b in batches if b]


def _check(response: httpx.Response, what: str) -> dict:
    if response.status_code != 200:
        raise RemoteIngestError(f"{what}: HTTP {response.status_code}: {error_message(response)}")
    return response.json()


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=TIMEOUT_S)


def send_documents(
    url: str,
    documents: Sequence[Document],
    collection: str,
    *,
    api_key: str | None,
    batch_bytes: int = BATCH_BYTES,
    progress: bool = True,
) -> IngestReport:
    """POST `documents` to `url`/v1/documents; the report sums the server's answers."""
    started = time.perf_counter()
    report = IngestReport()
    with _client(url, api_key) as client, tqdm(
        total=len(documents), unit="file", desc=f"ingest into {collection}", disable=not progress
    ) as bar:  # fmt: skip
        for batch in _batches(documents, batch_bytes):
            body = {"collection": collection, "documents": [{"source": d.source, "text": d.text} for d in batch]}
            try:
                answer = _check(client.post("/v1/documents", json=body), f"POST {url}/v1/documents")
            except httpx.HTTPError as exc:
                raise RemoteIngestError(f"POST {url}/v1/documents: {exc!r}") from exc
            report.files += answer["documents"]
            report.chunks += answer["chunks"]
            report.stale_deleted += answer["stale_deleted"]
            bar.update(len(batch))
    report.seconds = time.perf_counter() - started
    return report


def delete_sources(url: str, sources: Sequence[str], collection: str, *, api_key: str | None) -> int:
    """DELETE `sources` from `collection` on the server (SOURCES_PER_DELETE per request); returns the chunks deleted."""
    deleted = 0
    with _client(url, api_key) as client:
        for start in range(0, len(sources), SOURCES_PER_DELETE):
            params = [("collection", collection)] + [("source", s) for s in sources[start : start + SOURCES_PER_DELETE]]
            try:
                answer = _check(client.delete("/v1/documents", params=params), f"DELETE {url}/v1/documents")
            except httpx.HTTPError as exc:
                raise RemoteIngestError(f"DELETE {url}/v1/documents: {exc!r}") from exc
            deleted += answer["deleted"]
    return deleted
