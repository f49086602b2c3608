"""Ingest with real all-MiniLM-L6-v2 embeddings into the embedded store: idempotence, shortened and
deleted files, search quality on a small corpus, filters, restart, and the `moe-serve ingest` command."""

from __future__ import annotations

import pytest

from serving.retrieval.embedder import Embedder
from serving.retrieval.ingest import delete_paths, ingest_paths
from serving.retrieval.store import VectorStore

CORPUS = {
    "bees.md": "# Bees\n\nA forager bee returning to the hive dances in a figure of eight. The angle of the "
    "waggle run tells the other bees the direction of the flowers, and its length tells the distance.",
    "soup.txt": "Chop an onion, two carrots and celery, soften them in olive oil, add lentils and stock, and "
    "simmer for half an hour. Season the soup with pepper and lemon.",
    "gpu/shards.md": "Each expert shard is a Ray Serve deployment on its own GPU. The router sends every shard "
    "the token rows routed to its experts and adds up the weighted results.",
    "notes/todo.json": '{"not": "ingested"}',
    ".hidden/secret.md": "Hidden folders are not walked.",
}
LONG = "\n\n".join(f"Paragraph {i} talks about trains, rivers and mountain villages. " * 12 for i in range(6))


@pytest.fixture(scope="module")
def embedder():
    return Embedder()  # loading the model takes a few seconds: once per module


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in CORPUS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def store(tmp_path, embedder):
    with VectorStore(embedder.dim, path=tmp_path / "qdrant") as store:
        yield store


def point_ids(store: VectorStore, collection: str) -> dict[str, tuple[str, int]]:
    points, _ = store._client.scroll(collection, limit=10_000)
    return {str(p.id): (p.payload["source"], p.payload["chunk"]) for p in points}


def ask(store, embedder, question, **kwargs):
    return store.search("docs", embedder.embed_query(question), **kwargs)


def test_embeddings_are_unit_length_float32(embedder):
    vectors = embedder.embed(["experts live on shards", "bees dance"])
    assert vectors.shape == (2, embedder.dim) == (2, 384) and vectors.dtype.name == "float32"
    assert abs(float((vectors**2).sum(axis=1).max()) - 1.0) < 1e-5
    assert embedder.embed([]).shape == (0, 384)
    assert embedder.embed_query("bees dance") == pytest.approx(vectors[1], abs=1e-5)


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    from serving.errors import ConfigError

    with pytest.raises(ConfigError, match=str(tmp_path)):
        Embedder(tmp_path)


def test_ingest_twice_gives_the_same_points(store, embedder, corpus):
    report = ingest_paths([corpus], store, embedder, "docs", root=corpus, progress=False)
    assert (report.files, report.chunks, report.stale_deleted) == (3, 3, 0)
    assert [s.split(" ")[0] for s in report.skipped] == [str(corpus / "notes/todo.json")]
    first = point_ids(store, "docs")
    assert sorted(first.values()) == [("bees.md", 0), ("gpu/shards.md", 0), ("soup.txt", 0)]

    again = ingest_paths([corpus, corpus / "bees.md"], store, embedder, "docs", root=corpus, progress=False)
    assert again.chunks == 3  # bees.md reached twice counts once
    assert point_ids(store, "docs") == first


def test_search_finds_the_right_source_and_honours_the_filter(store, embedder, corpus):
    ingest_paths([corpus], store, embedder, "docs", root=corpus, progress=False)
    assert ask(store, embedder, "How do bees tell each other where flowers are?", top_k=1)[0].source == "bees.md"
    assert ask(store, embedder, "Which GPU holds an expert shard?", top_k=1)[0].source == "gpu/shards.md"
    assert ask(store, embedder, "How long should lentil soup simmer?", top_k=1)[0].source == "soup.txt"
    filtered = ask(store, embedder, "How do bees find flowers?", top_k=3, source_filter=["soup.txt"])
    assert [p.source for p in filtered] == ["soup.txt"]


def test_a_shortened_file_leaves_no_stale_chunks(store, embedder, corpus):
    (corpus / "trains.md").write_text(LONG, encoding="utf-8")
    long_report = ingest_paths([corpus / "trains.md"], store, embedder, "docs", root=corpus, progress=False)
    assert long_report.chunks >= 3
    (corpus / "trains.md").write_text("Trains are slow now.", encoding="utf-8")
    short = ingest_paths([corpus / "trains.md"], store, embedder, "docs", root=corpus, progress=False)
    assert (short.chunks, short.stale_deleted) == (1, long_report.chunks - 1)
    assert sorted(point_ids(store, "docs").values()) == [("trains.md", 0)]
    [hit] = ask(store, embedder, "trains", top_k=5)
    assert hit.text == "Trains are slow now."


def test_delete_paths_removes_files_even_after_they_are_gone(store, embedder, corpus):
    ingest_paths([corpus], store, embedder, "docs", root=corpus, progress=False)
    assert delete_paths([corpus / "gpu"], store, "docs", root=corpus) == 1
    (corpus / "soup.txt").unlink()
    assert delete_paths([corpus / "soup.txt"], store, "docs", root=corpus) == 1
    assert store.collections() == [("docs", 1)]


def test_the_store_answers_the_same_after_a_restart(tmp_path, embedder, corpus):
    question = embedder.embed_query("waggle dance")
    with VectorStore(embedder.dim, path=tmp_path / "q") as store:
        ingest_paths([corpus], store, embedder, "docs", root=corpus, progress=False)
        before = [(p.source, p.chunk, round(p.score, 5)) for p in store.search("docs", question, top_k=3)]
        ids = point_ids(store, "docs")
    with VectorStore(embedder.dim, path=tmp_path / "q") as store:
        assert store.collections() == [("docs", 3)]
        assert [(p.source, p.chunk, round(p.score, 5)) for p in store.search("docs", question, top_k=3)] == before
        assert point_ids(store, "docs") == ids


def test_missing_paths_fail_before_anything_is_written(store, embedder, corpus):
    with pytest.raises(FileNotFoundError, match="nope.md"):
        ingest_paths([corpus, corpus / "nope.md"], store, embedder, "docs", root=corpus, progress=False)
    assert store.collections() == []


def test_the_ingest_command(tmp_path, embedder, corpus, monkeypatch, capsys):
    from deployments.cli import main

    monkeypatch.chdir(corpus)
    monkeypatch.setattr("serving.retrieval.embedder.Embedder", lambda: embedder)  # reuse the loaded model
    data = str(tmp_path / "data")
    assert main(["ingest", ".", "--collection", "kb", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "3 files, 3 chunks" in out and "skipped notes/todo.json" in out
    assert main(["ingest", "bees.md", "--delete", "--collection", "kb", "--data-dir", data]) == 0
    assert "deleted 1 chunks from 'kb'" in capsys.readouterr().out
    with VectorStore(path=tmp_path / "data" / "qdrant") as store:
        assert store.collections() == [("kb", 2)]
    assert main(["ingest", "nope.md", "--data-dir", data]) == 2
    assert "nope.md does not exist" in capsys.readouterr().err
