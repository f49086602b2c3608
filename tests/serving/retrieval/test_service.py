"""RetrievalService and AsyncRetrieval with real embeddings and the embedded store: ingest on first start
only, sources named per configured path, preload after a restart, and searches that do not wait for an
ingest running at the same time."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.errors import ConfigError
from serving.retrieval.embedder import Embedder
from serving.retrieval.ingest import Document
from serving.retrieval.service import AsyncRetrieval, RetrievalService, RetrievalSettings
from serving.retrieval.store import VectorStore


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def open_service(embedder, settings: RetrievalSettings) -> RetrievalService:
    return RetrievalService(embedder, VectorStore(embedder.dim, path=settings.store_path), settings)


def test_ingest_on_start_runs_once_and_names_sources_by_their_folder(embedder, tmp_path):
    (tmp_path / "handbook").mkdir()
    (tmp_path / "handbook" / "bees.md").write_text("Bees dance to show where the flowers are.")
    (tmp_path / "NOTES.txt").write_text("Lentil soup simmers for half an hour.")
    paths = (str(tmp_path / "handbook"), str(tmp_path / "NOTES.txt"), str(tmp_path / "handbook" / "bees.md"))
    settings = RetrievalSettings(store_path=str(tmp_path / "qdrant"), ingest_on_start=paths)
    service = open_service(embedder, settings)
    report = service.ingest_on_start()
    assert report is not None and report.files == 2  # bees.md reached twice counts once
    assert {p.source for p in service.retrieve("flowers", 5)} == {"handbook/bees.md", "NOTES.txt"}
    (tmp_path / "NOTES.txt").write_text("Changed: a second start must not ingest this.")
    service.close()

    service = open_service(embedder, settings)  # a restart: the collection is there, nothing is ingested
    assert service.ingest_on_start() is None
    service.store.preload()
    assert set(service.store._mirrors) == {"docs"}  # searched from memory from the first query on
    assert service.retrieve("soup", 1)[0].text == "Lentil soup simmers for half an hour."
    service.close()

    missing = RetrievalSettings(store_path=str(tmp_path / "other"), ingest_on_start=(str(tmp_path / "nope"),))
    with pytest.raises(ConfigError, match="nope does not exist"):
        open_service(embedder, missing).ingest_on_start()


def test_a_search_does_not_wait_for_a_running_ingest(embedder, tmp_path):
    settings = RetrievalSettings(store_path=str(tmp_path / "qdrant"))
    client = AsyncRetrieval(open_service(embedder, settings))
    paragraph = "Trains cross the valley at dawn, and the villages wake to the sound of the bells. " * 8
    big = [Document(f"book-{i}.md", "\n\n".join([paragraph] * 6)) for i in range(12)]

    async def main():
        await client.ingest([Document("bees.md", "Bees dance to show where the flowers are.")])
        ingest = asyncio.ensure_future(client.ingest(big))
        searched = []
        while not ingest.done():
            start = time.monotonic()
            hits = await client.retrieve("where are the flowers?", 1)
            searched.append((time.monotonic() - start, hits[0].source, ingest.done()))
            await asyncio.sleep(0.05)
        return (await ingest), searched

    report, searched = asyncio.run(main())
    client.close()
    assert report.chunks >= 24
    during = [s for s in searched if not s[2]]  # searches that finished while the ingest still ran
    assert len(during) >= 3, searched
    assert all(source == "bees.md" for _, source, _ in during)
