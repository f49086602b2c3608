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


# Embedded searches scan an in-memory mirror of the collection; qdrant-client's own local-mode search
# over the same store is the reference it must agree with, through every kind of write.


def reference(store, query, top_k, sources=None):
    """(source, chunk, score) of qdrant-client's own local-mode search, best first."""
    from serving.retrieval.store import _sources_filter

    hits = store._client.query_points("docs", query=query.tolist(), limit=top_k, query_filter=_sources_filter(sources))
    return [(h.payload["source"], h.payload["chunk"], h.score) for h in hits.points]


def assert_same_as_reference(store, queries, sources_options=(None, ["b.md"], ["a.md", "c.md", "nope.md"])):
    for query in queries:
        for sources in sources_options:
            for top_k in (1, 3, 50):
                ours = [(p.source, p.chunk, p.score) for p in store.search("docs", query, top_k, sources)]
                ref = reference(store, query, top_k, sources)
                assert [o[:2] for o in ours] == [r[:2] for r in ref], (sources, top_k)
                assert [o[2] for o in ours] == pytest.approx([r[2] for r in ref], abs=1e-5)


def test_search_agrees_with_local_mode_through_upserts_and_deletes(store):
    queries = unit_vectors(5, seed=7)
    assert_same_as_reference(store, queries)  # the first search loads the mirror
    assert "docs" in store._mirrors
    rng = np.random.default_rng(3)
    store.upsert("docs", chunks_of("a.md", 6), 3 * rng.standard_normal((6, DIM)))  # 4 replaced, 2 new, not unit
    store.upsert("docs", chunks_of("d.md", 2), unit_vectors(2, seed=4))  # a new source
    assert_same_as_reference(store, queries, (None, ["a.md"], ["d.md", "b.md"]))
    store.delete_source("docs", "a.md", min_chunk=3)
    store.delete_source("docs", "c.md")
    assert_same_as_reference(store, queries, (None, ["a.md"], ["c.md"], ["c.md", "d.md"]))
    store.upsert("docs", chunks_of("c.md", 1), unit_vectors(1, seed=5))  # a deleted point written again
    assert_same_as_reference(store, queries, (None, ["c.md"]))
    hits = store.search("docs", unit_vectors(1, seed=5)[0], top_k=2)
    assert (hits[0].source, hits[0].chunk, hits[0].text) == ("c.md", 0, "c.md chunk 0")
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_the_mirror_matches_one_loaded_from_the_store(store):
    store.search("docs", unit_vectors(1)[0])
    store.upsert("docs", chunks_of("e.md", 300), unit_vectors(300, seed=9))  # grows the mirror's arrays
    store.delete_source("docs", "b.md", min_chunk=1)
    kept = store._mirrors.pop("docs")
    store.search("docs", unit_vectors(1)[0])  # loads a fresh one
    fresh = store._mirrors["docs"]
    alive = {i: row for i, row in kept.row_of.items() if kept.alive[row]}
    assert set(alive) == {i for i, row in fresh.row_of.items() if fresh.alive[row]} and len(alive) == 9 + 300 - 2
    for point_id, row in alive.items():
        np.testing.assert_allclose(kept.vectors[row], fresh.vectors[fresh.row_of[point_id]], atol=1e-6)
        assert kept.chunks[row] == fresh.chunks[fresh.row_of[point_id]]


def test_a_failed_write_drops_the_mirror_and_the_next_search_reloads_it(store, monkeypatch):
    store.search("docs", unit_vectors(1)[0])

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store._client, "upsert", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        store.upsert("docs", chunks_of("a.md", 1), unit_vectors(1, seed=2))
    assert "docs" not in store._mirrors
    monkeypatch.undo()
    assert_same_as_reference(store, unit_vectors(2, seed=7))


def test_searches_of_an_empty_collection_and_bad_queries(store):
    store.ensure_collection("empty")
    assert store.search("empty", unit_vectors(1)[0], top_k=3) == []
    with pytest.raises(ValueError, match="NaN"):
        store.search("docs", np.full(DIM, np.nan, dtype=np.float32))
    hits = store.search("docs", np.zeros(DIM, dtype=np.float32), top_k=9)  # a zero vector: every score 0
    assert len(hits) == 9 and all(h.score == 0.0 for h in hits)
    with pytest.raises(ValueError, match="top_k"):
        store.search("docs", unit_vectors(1)[0], top_k=0)


def test_search_after_a_restart_agrees_with_local_mode(tmp_path):
    path = tmp_path / "qdrant"
    with VectorStore(DIM, path=path) as store:
        store.ensure_collection("docs")
        store.upsert("docs", chunks_of("a.md", 40) + chunks_of("b.md", 30), unit_vectors(70))
        store.delete_source("docs", "a.md", min_chunk=20)
    with VectorStore(DIM, path=path) as reopened:  # local mode reloads vectors as float64; the mirror holds float32
        assert_same_as_reference(reopened, unit_vectors(3, seed=7), (None, ["a.md"]))
