"""Retrieval for RAG: embed documents, keep their chunks in Qdrant, search them, fuse hits into a prompt.

    >>> from serving.retrieval import Embedder, VectorStore, fuse, ingest_paths
    >>> embedder = Embedder()                                   # all-MiniLM-L6-v2, 384-d, offline
    >>> store = VectorStore(embedder.dim, path=".data/qdrant")  # or url="http://qdrant:6333"
    >>> ingest_paths(["README.md", "docs"], store, embedder, "docs").summary()
    '3 files, 50 chunks in 4.0 s (12 chunks/s), 0 stale chunks deleted, 0 files skipped'
    >>> hits = store.search("docs", embedder.embed_query("where do experts live?"), top_k=3)
    >>> messages = fuse([{"role": "user", "content": "Where do experts live?"}], hits)

Modules: `embedder` (sentence-transformers), `chunking` (token-bounded chunks, stable ids), `store`
(qdrant-client: embedded folder or server), `ingest` (files -> chunks -> store), `rag` (the prompt
template). No Ray, no HTTP: the Retriever deployment and the routes wrap these.
"""

from serving.retrieval.chunking import Chunk, chunk_text
from serving.retrieval.embedder import Embedder
from serving.retrieval.ingest import IngestReport, delete_paths, ingest_paths
from serving.retrieval.rag import fuse
from serving.retrieval.store import Passage, RetrievalUnavailableError, UnknownCollectionError, VectorStore

__all__ = [
    "Chunk",
    "Embedder",
    "IngestReport",
    "Passage",
    "RetrievalUnavailableError",
    "UnknownCollectionError",
    "VectorStore",
    "chunk_text",
    "delete_paths",
    "fuse",
    "ingest_paths",
]
