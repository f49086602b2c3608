"""Retrieval: recall on labelled questions, search latency at 10k and 100k chunks, ingest throughput;
the embedded store (`VectorStore.search`: an in-memory mirror of the vectors) against qdrant-client's
own local-mode search (what `VectorStore.search` called before) and brute-force NumPy over the same
vectors, side by side in one run.

    python -m benchmarks.retrieval [--sizes 10000,100000] [--queries 200] [--filtered-queries 10]

1. Ingest the demo corpus (README.md, docs/, benchmarks/README.md, serving/demo_data/corpus.txt) into
   a fresh embedded store with `ingest_paths`: chunks/s end to end, and the embedding rate alone.
2. Ask every question of benchmarks/retrieval_questions.json: recall@5 is the share whose top 5 holds
   a chunk of an expected file; "answer@5" also needs that chunk to contain the labelled phrase.
   NumPy ranks the same vectors exactly: the reference for recall and the speed baseline.
3. Pad the collection to each size with synthetic chunks (random unit vectors, corpus texts as
   payload), written in batches of 1,000, then time top-5 searches with the question vectors,
   the store, local mode and NumPy alternating, with and without a source filter. Last, reopen the
   store (a restart) and time its first search, which loads the mirror.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from qdrant_client import models

from benchmarks.report import machine_meta, write_report
from serving.retrieval.chunking import Chunk, chunk_text
from serving.retrieval.embedder import Embedder
from serving.retrieval.ingest import find_files, ingest_paths
from serving.retrieval.store import VectorStore

CORPUS = ("README.md", "docs", "benchmarks/README.md", "serving/demo_data/corpus.txt")
QUESTIONS = Path(__file__).with_name("retrieval_questions.json")
COLLECTION = "bench"
TOP_K = 5
PAD_BATCH = 1000


def load_questions() -> tuple[list[dict], list[str]]:
    """The questions whose phrase is still in one of their files, and a note for each stale label."""
    questions, stale = [], []
    for q in json.loads(QUESTIONS.read_text())["questions"]:
        if any(Path(s).is_file() and q["answer"] in Path(s).read_text(encoding="utf-8") for s in q["sources"]):
            questions.append(q)
        else:
            stale.append(f"{q['question']!r}: {q['answer']!r} is in none of {q['sources']}")
    return questions, stale


def corpus_chunks(embedder: Embedder) -> list[Chunk]:
    """The chunks `ingest_paths` writes for CORPUS (same files, same settings)."""
    chunks = []
    for path, source in find_files(CORPUS):
        if source is not None:
            chunks += chunk_text(path.read_text(encoding="utf-8"), source, embedder.count_tokens)
    return chunks


class Exact:
    """Brute-force top-k over all vectors in memory: the reference."""

    def __init__(self, vectors: np.ndarray, labels: list[tuple[str, int]], texts: list[str]):
        self.vectors, self.labels, self.texts = vectors, labels, texts  # vectors [N, D]
        self.sources = np.array([s for s, _ in labels])

    def add(self, vectors: np.ndarray, labels: list[tuple[str, int]], texts: list[str]) -> None:
        self.vectors = np.concatenate([self.vectors, vectors])
        self.labels += labels
        self.texts += texts
        self.sources = np.array([s for s, _ in self.labels])

    def search(self, query: np.ndarray, k: int, source: str | None = None) -> list[int]:
        rows = np.flatnonzero(self.sources == source) if source is not None else None
        vectors = self.vectors if rows is None else self.vectors[rows]
        scores = vectors @ query  # [N]: cosine, all vectors are unit length
        top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
        top = top[np.argsort(-scores[top])]
        return top.tolist() if rows is None else rows[top].tolist()


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(1000 * float(np.percentile(seconds, q)), 2)


def judge(questions, hits_per_question) -> tuple[float, float]:
    """(recall@5 by file, answer@5 by file and phrase) for [[(source, text), ...] per question]."""
    by_file = by_answer = 0
    for q, hits in zip(questions, hits_per_question, strict=True):
        good = [text for source, text in hits if source in q["sources"]]
        by_file += bool(good)
        by_answer += any(q["answer"] in text for text in good)
    return round(by_file / len(questions), 3), round(by_answer / len(questions), 3)


def quality(store, exact: Exact, questions, vectors) -> dict:
    """recall@5 and answer@5 of Qdrant and of NumPy, and how often both return the same top 5."""
    ours, ref, same = [], [], 0
    for q_vec in vectors:
        passages = store.search(COLLECTION, q_vec, TOP_K)
        rows = exact.search(q_vec, TOP_K)
        ours.append([(p.source, p.text) for p in passages])
        ref.append([(exact.labels[r][0], exact.texts[r]) for r in rows])
        same += {(p.source, p.chunk) for p in passages} == {exact.labels[r] for r in rows}
    (q_file, q_answer), (n_file, n_answer) = judge(questions, ours), judge(questions, ref)
    return dict(qdrant_recall=q_file, qdrant_answer=q_answer, numpy_recall=n_file, numpy_answer=n_answer,
                agreement=round(same / len(vectors), 3))  # fmt: skip


def local_mode_search(store, query: np.ndarray, k: int, source: str | None) -> list:
    """qdrant-client's own local-mode search: the call `VectorStore.search` made before the mirror."""
    match = models.MatchAny(any=[source]) if source is not None else None
    query_filter = models.Filter(must=[models.FieldCondition(key="source", match=match)]) if match else None
    return store._client.query_points(COLLECTION, query=query.tolist(), limit=k, query_filter=query_filter).points


def latency(store, exact: Exact, vectors, n: int, source: str | None) -> tuple[list[float], ...]:
    """Seconds per top-5 search: the store, local mode and NumPy alternating, cycling through the question vectors."""
    ours, local, ref = [], [], []
    searches = ((lambda q: store.search(COLLECTION, q, TOP_K, source_filter=source), ours),
                (lambda q: local_mode_search(store, q, TOP_K, source), local),
                (lambda q: exact.search(q, TOP_K, source), ref))  # fmt: skip
    for i in range(n):
        for search, times in searches:
            start = time.perf_counter()
            search(vectors[i % len(vectors)])
            times.append(time.perf_counter() - start)
    return ours, local, ref


def pad(store, exact: Exact, target: int, texts: list[str], rng: np.random.Generator) -> float:
    """Grow the collection to `target` points with synthetic chunks; returns points written per second."""
    start_count, seconds = len(exact.labels), 0.0
    for first in range(start_count, target, PAD_BATCH):
        n = min(PAD_BATCH, target - first)
        labels = [(f"synthetic/{(first + i) // 100}.txt", (first + i) % 100) for i in range(n)]
        chunk_texts = [texts[(first + i) % len(texts)] for i in range(n)]
        vectors = rng.standard_normal((n, exact.vectors.shape[1])).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        chunks = [Chunk(s, i, t) for (s, i), t in zip(labels, chunk_texts, strict=True)]
        start = time.perf_counter()
        store.upsert(COLLECTION, chunks, vectors)
        seconds += time.perf_counter() - start
        exact.add(vectors, labels, chunk_texts)
        print(f"  {len(exact.labels)} points", end="\r", flush=True)
    print()
    return (target - start_count) / seconds if seconds else 0.0


def row(measure, chunks, qdrant, numpy="-", goal="", unit_ratio=True, local="-") -> dict:
    ratio = f"{qdrant / numpy:.1f}x" if unit_ratio and isinstance(numpy, float) and numpy > 0 else "-"
    return dict(measure=measure, chunks=chunks, qdrant=qdrant, local=local, numpy=numpy, ratio=ratio, goal=goal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="collection sizes to time searches at")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per size")
    parser.add_argument("--filtered-queries", type=int, default=10, help="timed source-filtered searches per size")
    parser.add_argument("--data-dir", help="where the embedded store goes (default: a temporary folder, removed)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    questions, stale = load_questions()
    for note in stale:
        print(f"stale label, skipped: {note}")
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="moe-serve-retrieval-"))
    embedder = Embedder()
    rows = []
    try:
        store = VectorStore(embedder.dim, path=data_dir / "qdrant")
        report = ingest_paths(CORPUS, store, embedder, COLLECTION, progress=False)
        chunks = corpus_chunks(embedder)
        start = time.perf_counter()
        vectors = embedder.embed([c.text for c in chunks])
        embed_rate = len(chunks) / (time.perf_counter() - start)
        question_vectors = embedder.embed([q["question"] for q in questions])
        start = time.perf_counter()
        embedder.embed([q["question"] for q in questions] * 5)
        sentence_rate = 5 * len(questions) / (time.perf_counter() - start)
        exact = Exact(vectors, [(c.source, c.index) for c in chunks], [c.text for c in chunks])
        assert store.count(COLLECTION) == len(chunks), "the store and the reference must hold the same chunks"
        print(report.summary())

        n = len(chunks)
        found = quality(store, exact, questions, question_vectors)
        rows += [
            row(f"recall@5 ({len(questions)} questions)", n, found["qdrant_recall"], found["numpy_recall"], ">= 0.9",
                unit_ratio=False),
            row("answer@5 (file and phrase)", n, found["qdrant_answer"], found["numpy_answer"], unit_ratio=False),
            row("same top 5 as exact", n, found["agreement"], 1.0, unit_ratio=False),
            row("ingest chunks/s, end to end", n, round(report.chunks_per_s, 1), goal=">= 300"),
            row("embed chunks/s (<= 200 tokens)", n, round(embed_rate, 1)),
            row("embed questions/s (~12 tokens)", len(questions) * 5, round(sentence_rate, 1)),
        ]  # fmt: skip
        rng = np.random.default_rng(0)
        for size in [int(s) for s in args.sizes.split(",")]:
            print(f"padding to {size} chunks ...")
            write_rate = pad(store, exact, size, [c.text for c in chunks], rng)
            ours, local, ref = latency(store, exact, question_vectors, args.queries, None)
            f_ours, f_local, f_ref = latency(store, exact, question_vectors, args.filtered_queries, "README.md")
            found = quality(store, exact, questions, question_vectors)
            goal = "<= 20 ms at 100k" if size >= 100_000 else ""
            rows += [
                row("search p50 ms (top 5)", size, percentile_ms(ours, 50), percentile_ms(ref, 50),
                    local=percentile_ms(local, 50)),
                row("search p99 ms (top 5)", size, percentile_ms(ours, 99), percentile_ms(ref, 99), goal,
                    local=percentile_ms(local, 99)),
                row("filtered search p50 ms (1 source)", size, percentile_ms(f_ours, 50), percentile_ms(f_ref, 50),
                    local=percentile_ms(f_local, 50)),
                row("recall@5 with distractors", size, found["qdrant_recall"], found["numpy_recall"], unit_ratio=False),
                row("store writes points/s (batches of 1,000)", size, round(write_rate, 1)),
            ]  # fmt: skip
            print(rows[-5:])
        store.close()
        start = time.perf_counter()
        with VectorStore(embedder.dim, path=data_dir / "qdrant") as reopened:
            assert reopened.count(COLLECTION) == len(exact.labels)
            rows.append(row("reopen the store s (restart)", len(exact.labels), round(time.perf_counter() - start, 2)))
            start = time.perf_counter()
            reopened.search(COLLECTION, question_vectors[0], TOP_K)
            rows.append(row("first search after reopening s (loads the mirror)", len(exact.labels),
                            round(time.perf_counter() - start, 2)))  # fmt: skip
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)

    meta = machine_meta(embedder=embedder.name, top_k=TOP_K, queries=args.queries, questions=len(questions),
                        stale_labels=stale, store="qdrant-client embedded + numpy mirror")  # fmt: skip
    columns = {"measure": "measure", "chunks": "chunks", "store (embedded)": "qdrant",
               "qdrant local mode (before)": "local", "numpy brute force": "numpy", "store / numpy": "ratio",
               "goal": "goal"}  # fmt: skip
    write_report(args.out, "retrieval", meta, rows, columns)


if __name__ == "__main__":
    main()
