"""VectorStore on the embedded Qdrant store (synthetic unit vectors, no model), and against servers
that refuse or never answer."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from serving.errors import ConfigError
from serving.retrieval.chunking import Chunk
from serving.retrieval.store import RetrievalUnavailableError, UnknownCollectionError, VectorStore

DIM = 16


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def chunks_of(source: str, n: int) -> list[Chunk]:
    return [Chunk(source, i, f"{source} chunk {i}") for i in range(n)]


@pytest.fixture
def store(tmp_path):
    """An embedded store with collection 'docs': a.md (4 chunks), b.md (3), c.md (2)."""
    with VectorStore(DIM, path=tmp_path / "qdrant") as store:
        store.ensure_collection("docs")
        chunks = chunks_of("a.md", 4) + chunks_of("b.md", 3) + chunks_of("c.md", 2)
        store.upsert("docs", chunks, unit_vectors(len(chunks)))
        yield store


def test_search_finds_the_nearest_chunk_first(store):
    vectors = unit_vectors(9)
    hits = store.search("docs", vectors[5], top_k=3)  # vector 5 is b.md chunk 1
    assert (hits[0].source, hits[0].chunk, hits[0].text) == ("b.md", 1, "b.md chunk 1")
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(hits) == 3


def test_source_filter_takes_one_source_or_several(store):
    query = unit_vectors(9)[0]  # a.md chunk 0, excluded below
    assert {h.source for h in store.search("docs", query, top_k=9, source_filter="b.md")} == {"b.md"}
    hits = store.search("docs", query, top_k=9, source_filter=["b.md", "c.md"])
    expected = [("b.md", 0), ("b.md", 1), ("b.md", 2), ("c.md", 0), ("c.md", 1)]
    assert sorted((h.source, h.chunk) for h in hits) == expected
    assert store.search("docs", query, top_k=3, source_filter="nope.md") == []


def test_writing_the_same_chunks_again_replaces_them(store):
    store.upsert("docs", chunks_of("a.md", 4), unit_vectors(4, seed=1))
    assert store.collections() == [("docs", 9)]
    hit = store.search("docs", unit_vectors(4, seed=1)[2], top_k=1)[0]
    assert (hit.source, hit.chunk) == ("a.md", 2) and hit.score == pytest.approx(1.0, abs=1e-5)


def test_delete_source_returns_the_count_and_can_keep_a_head(store):
    assert store.delete_source("docs", "a.md", min_chunk=2) == 2  # the tail of a shortened file
    assert store.count("docs", "a.md") == 2
    assert store.delete_source("docs", "b.md") == 3
    assert store.delete_source("docs", "b.md") == 0
    assert store.collections() == [("docs", 4)]


def test_the_embedded_store_persists_across_a_restart(tmp_path):
    path = tmp_path / "qdrant"
    chunks = chunks_of("a.md", 5)
    with VectorStore(DIM, path=path) as store:
        store.ensure_collection("docs")
        store.ensure_collection("other")
        store.upsert("docs", chunks, unit_vectors(5))
        before = store.search("docs", unit_vectors(5)[3], top_k=5)
    with VectorStore(DIM, path=path) as reopened:
        assert reopened.collections() == [("docs", 5), ("other", 0)]
        after = reopened.search("docs", unit_vectors(5)[3], top_k=5)
    assert [(p.source, p.chunk, p.text) for p in after] == [(p.source, p.chunk, p.text) for p in before]
    assert [p.score for p in after] == pytest.approx([p.score for p in before], abs=1e-5)


def test_a_second_client_on_the_same_folder_is_refused_by_name(store, tmp_path):
    with pytest.raises(RetrievalUnavailableError, match=str(tmp_path / "qdrant")):
        VectorStore(DIM, path=tmp_path / "qdrant")


def test_unknown_collections_are_named(store):
    with pytest.raises(UnknownCollectionError, match="'missing'.*docs"):
        store.search("missing", unit_vectors(1)[0])
    with pytest.raises(UnknownCollectionError, match="'missing'"):
        store.upsert("missing", chunks_of("a.md", 1), unit_vectors(1))
    with pytest.raises(UnknownCollectionError, match="'missing'"):
        store.delete_source("missing", "a.md")


def test_a_collection_of_another_size_is_refused(store, tmp_path):
    store.close()
    with VectorStore(DIM * 2, path=tmp_path / "qdrant") as other:
        with pytest.raises(ConfigError, match=f"'docs'.*{DIM}-d.*{DIM * 2}-d"):
            other.ensure_collection("docs")


def test_bad_shapes_are_refused(store):
    with pytest.raises(ValueError, match="query vector"):
        store.search("docs", np.ones(DIM + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="2 chunks"):
        store.upsert("docs", chunks_of("a.md", 2), unit_vectors(3))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_refuses_connections_is_unavailable():
    store = VectorStore(DIM, url=f"http://127.0.0.1:{closed_port()}", timeout_s=1)
    with pytest.raises(RetrievalUnavailableError, match="127.0.0.1.*unreachable"):
        store.search("docs", unit_vectors(1)[0])
    with pytest.raises(RetrievalUnavailableError):
        store.ensure_collection("docs")


def test_a_server_that_never_answers_times_out_within_timeout_s():
    with socket.socket() as listener:  # accepts TCP connections (backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        store = VectorStore(DIM, url=f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=1)
        start = time.monotonic()
        with pytest.raises(RetrievalUnavailableError, match="timeout 1 s"):
            store.collections()
        assert time.monotonic() - start < 5


def test_timeout_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="timeout_s"):
        VectorStore(DIM, path=tmp_path, timeout_s=0)
