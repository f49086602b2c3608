"""Chunk vectors in Qdrant: an embedded store in a local folder, or a Qdrant server.

    >>> store = VectorStore(dim=384, path=".data/qdrant")            # embedded, persisted in that folder
    >>> store = VectorStore(dim=384, url="http://qdrant:6333", api_key=key, timeout_s=5)   # a server
    >>> store.ensure_collection("docs")
    >>> store.upsert("docs", chunks, vectors)                         # vectors [N, 384], one row per chunk
    >>> [p.source for p in store.search("docs", query_vector, top_k=3, source_filter="docs/x.md")]
    ['docs/x.md', 'docs/x.md', 'docs/x.md']
    >>> store.delete_source("docs", "docs/x.md")
    7
    >>> store.collections()
    [('docs', 120)]
    >>> store.close()

Both modes go through the same qdrant-client calls. Each point is one chunk: its id is the chunk's
stable uuid5 (so writing a chunk again overwrites it), its payload holds `source`, `chunk` (index)
and `text`. Collections use cosine distance (`DISTANCE`), the measure sentence-transformers models
are trained for; our vectors are unit length, so it equals the dot product.

Embedded searches do not go through qdrant-client's local mode, whose every search re-normalises
all stored vectors in place (a temporary as large as the collection), argsorts every score and
evaluates a payload filter in Python point by point: ~180 ms p50 and ~1 s p99 at 100k 384-d chunks
on 2 cores. This store keeps its own copy of each searched collection's vectors instead (`_Mirror`:
float32 [N, dim], 150 MB at 100k x 384, plus source and chunk per row), built on the collection's
first search after opening (a scroll through all points: ~13 s at 100k) and updated by `upsert` and
`delete_source`, so a search is one matrix-vector product and an argpartition; payloads of the hits
come from the store by id. The copy stays exact because the embedded store's folder is locked to one
client, this one, and every write goes through this class; a write that fails drops the copy (the next
search rebuilds it). Only one process may open the folder; a Qdrant server indexes vectors (HNSW) and
payload fields, many processes can share it, and it is searched with `query_points` directly.
One VectorStore may be shared by threads (a search while an ingest runs): its calls take turns on a
lock, and only the store calls do; embedding happens outside it.
Calls to a server time out after `timeout_s` (whole seconds: qdrant-client rounds up), and every
transport failure is raised as `RetrievalUnavailableError` naming the server.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from serving.errors import ConfigError, RetrievalUnavailableError, UnknownCollectionError
from serving.retrieval.chunking import Chunk

DISTANCE = models.Distance.COSINE
DEFAULT_TIMEOUT_S = 5.0
UPSERT_BATCH = 256  # points per request: keeps a request far below the server's 32 MiB body limit


@dataclass(frozen=True)
class Passage:
    """One search hit: cosine similarity `score` (higher is closer) and the chunk it found."""

    score: float
    source: str
    chunk: int
    text: str


def _serialised(method: Callable) -> Callable:
    """Run `method` holding the store's lock (reentrant: a method may call another)."""

    @functools.wraps(method)
    def locked(self: VectorStore, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class VectorStore:
    """Qdrant behind a small API: collections of chunk vectors, written by source, searched by vector.

    `url` selects a server (with optional `api_key`); otherwise the embedded store lives in `path`.
    `dim` is the vector size for collections this store creates (the embedder's `dim`); None for a
    store that only searches and deletes.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        path: str | Path = ".data/qdrant",
        url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        if timeout_s <= 0:
            raise ConfigError(f"retrieval timeout_s must be > 0, got {timeout_s}")
        self.dim = dim
        self.timeout_s = timeout_s
        self.location = url or str(Path(path))
        self._is_server = url is not None
        self._mirrors: dict[str, _Mirror] = {}  # embedded mode: collection name -> its vectors in memory
        self._lock = threading.RLock()
        try:
            if url is not None:
                # check_compatibility=False: the version probe would make a request (and warn) right here.
                self._client = QdrantClient(url=url, api_key=api_key, timeout=timeout_s, check_compatibility=False)
            else:
                Path(path).mkdir(parents=True, exist_ok=True)
                self._client = QdrantClient(path=str(path))
        except RuntimeError as exc:  # the embedded store's folder lock is held by another client
            raise RetrievalUnavailableError(
                f"the embedded Qdrant store in {path} is open in another process or client ({exc}); "
                "only one may open it: stop the other one, send the documents to the running server "
                "(`moe-serve ingest --url`), or use a Qdrant server (url) to share a store"
            ) from exc

    @contextlib.contextmanager
    def _guard(self, what: str, collection: str | None = None) -> Iterator[None]:
        """Turn qdrant-client's errors into ours: unreachable -> RetrievalUnavailableError, missing
        `collection` -> UnknownCollectionError, a bad request -> ValueError; each naming the store."""
        try:
            yield
        except ResponseHandlingException as exc:  # connect error, timeout, broken response
            raise RetrievalUnavailableError(
                f"Qdrant at {self.location} is unreachable ({what}, timeout {self.timeout_s:g} s): {exc.source!r}"
            ) from exc
        except UnexpectedResponse as exc:
            status = exc.status_code or 0
            if status == 404 and collection is not None:
                raise self._unknown(collection) from exc
            message = f"Qdrant at {self.location} refused {what}: HTTP {status} {exc.reason_phrase}"
            if status in (401, 403):
                raise RetrievalUnavailableError(f"{message} (check the API key)") from exc
            if 400 <= status < 500:
                raise ValueError(f"{message}: {exc.content[:300]!r}") from exc
            raise RetrievalUnavailableError(message) from exc
        except ValueError as exc:  # the embedded store's way of saying "no such collection"
            if collection is not None and not self._client.collection_exists(collection):
                raise self._unknown(collection) from exc
            raise

    def _unknown(self, collection: str) -> UnknownCollectionError:
        with self._guard("list collections"):
            names = sorted(c.name for c in self._client.get_collections().collections)
        return UnknownCollectionError(f"no collection {collection!r} in {self.location}; it has {names or 'none'}")

    @_serialised
    def ensure_collection(self, name: str) -> None:
        """Create collection `name` (size `dim`, cosine) unless it exists; an existing one must have size `dim`."""
        with self._guard(f"ensure_collection({name!r})"):
            if self._client.collection_exists(name):
                size = self._client.get_collection(name).config.params.vectors.size
                if self.dim is not None and size != self.dim:
                    raise ConfigError(
                        f"collection {name!r} in {self.location} holds {size}-d vectors but the embedder makes "
                        f"{self.dim}-d ones: use another collection name or the embedding model it was built with"
                    )
                return
            if self.dim is None:
                raise ConfigError(f"cannot create collection {name!r}: this VectorStore was opened without dim")
            try:
                self._client.create_collection(name, models.VectorParams(size=self.dim, distance=DISTANCE))
            except UnexpectedResponse as exc:
                if exc.status_code != 409:
                    raise
                return self.ensure_collection(name)  # another client created it meanwhile: check its size
            if self._is_server:  # the embedded store has no payload indexes (it scans payloads)
                self._client.create_payload_index(name, "source", models.PayloadSchemaType.KEYWORD)
                self._client.create_payload_index(name, "chunk", models.PayloadSchemaType.INTEGER)

    @_serialised
    def upsert(self, name: str, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Write `chunks` with their `vectors` [N, dim]; a chunk already stored (same source and index) is replaced."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(chunks):
            raise ValueError(f"upsert into {name!r}: {len(chunks)} chunks need vectors [{len(chunks)}, dim], "
                             f"got shape {list(vectors.shape)}")  # fmt: skip
        for start in range(0, len(chunks), UPSERT_BATCH):
            batch = chunks[start : start + UPSERT_BATCH]
            points = models.Batch(
                ids=[str(c.point_id) for c in batch],
                vectors=vectors[start : start + UPSERT_BATCH].tolist(),
                payloads=[{"source": c.source, "chunk": c.index, "text": c.text} for c in batch],
            )
            with self._writing(name):
                with self._guard(f"upsert into {name!r}", name):
                    self._client.upsert(name, points=points, wait=True)
                if name in self._mirrors:
                    self._mirrors[name].put(points.ids, vectors[start : start + UPSERT_BATCH], batch)

    @_serialised
    def count(self, name: str, source: str | None = None, *, min_chunk: int = 0) -> int:
        """Points in `name` (of `source` only, with chunk index >= `min_chunk`, when given)."""
        with self._guard(f"count in {name!r}", name):
            return self._client.count(name, count_filter=_source_filter(source, min_chunk), exact=True).count

    @_serialised
    def delete_source(self, name: str, source: str, *, min_chunk: int = 0) -> int:
        """Delete the chunks of `source` (those with index >= `min_chunk`); returns how many there were."""
        selector = _source_filter(source, min_chunk)
        found = self.count(name, source, min_chunk=min_chunk)
        if found:
            with self._writing(name):
                with self._guard(f"delete {source!r} from {name!r}", name):
                    self._client.delete(name, points_selector=models.FilterSelector(filter=selector), wait=True)
                if name in self._mirrors:
                    self._mirrors[name].delete(source, min_chunk)
        return found

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """A write to `name` that fails may have been applied in part: drop its mirror (the next search reloads it)."""
        try:
            yield
        except BaseException:
            self._mirrors.pop(name, None)
            raise

    @_serialised
    def search(
        self, name: str, vector: np.ndarray, top_k: int = 5, source_filter: str | list[str] | None = None
    ) -> list[Passage]:
        """The `top_k` chunks closest to `vector` [dim], best first; only from `source_filter`'s source(s) if set."""
        if top_k < 1:
            raise ValueError(f"search top_k must be >= 1, got {top_k}")
        vector = np.asarray(vector, dtype=np.float32)
        if vector.ndim != 1 or (self.dim is not None and len(vector) != self.dim):
            raise ValueError(f"search in {name!r}: the query vector must be [{self.dim}], got {list(vector.shape)}")
        sources = None
        if source_filter is not None:
            sources = [source_filter] if isinstance(source_filter, str) else list(source_filter)
        with self._guard(f"search in {name!r}", name):
            if self._is_server:
                hits = self._client.query_points(name, query=vector.tolist(), limit=top_k,
                                                 query_filter=_sources_filter(sources)).points  # fmt: skip
                return [Passage(h.score, h.payload["source"], h.payload["chunk"], h.payload["text"]) for h in hits]
            if np.isnan(vector).any():
                raise ValueError(f"search in {name!r}: the query vector contains NaN")
            if name not in self._mirrors:
                self._mirrors[name] = _Mirror.load(self._client, name)
            ids, scores = self._mirrors[name].search(vector, top_k, sources)
            payloads = {str(r.id): r.payload for r in self._client.retrieve(name, ids, with_payload=True)}
        hits = [(score, payloads[i]) for i, score in zip(ids, scores, strict=True)]
        return [Passage(score, p["source"], p["chunk"], p["text"]) for score, p in hits]

    @_serialised
    def preload(self) -> None:
        """Embedded mode: copy every collection's vectors into memory now (~13 s per 100k chunks), not on
        its first search, which would otherwise wait for it. A server needs nothing."""
        if self._is_server:
            return
        with self._guard("preload"):
            names = [c.name for c in self._client.get_collections().collections]
            for name in names:
                if name not in self._mirrors:
                    self._mirrors[name] = _Mirror.load(self._client, name)

    @_serialised
    def collections(self) -> list[tuple[str, int]]:
        """(name, point count) of every collection, sorted by name."""
        with self._guard("list collections"):
            names = sorted(c.name for c in self._client.get_collections().collections)
            return [(n, self._client.count(n, exact=True).count) for n in names]

    @_serialised
    def close(self) -> None:
        """Release the client (and the embedded store's folder lock) and the mirrors."""
        self._mirrors.clear()
        self._client.close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VectorStore({self.location!r}, dim={self.dim})"


class _Mirror:
    """The vectors of one embedded collection in memory, searched by brute force in NumPy.

    Row r holds point `ids[r]`: its unit-length vector, its source (as a code), its chunk index, and
    whether it is `alive` (a deleted point keeps its row, for when its id is written again).
    """

    def __init__(self, dim: int):
        self.ids: list[str] = []
        self.row_of: dict[str, int] = {}
        self.code_of: dict[str, int] = {}  # source -> code
        self.vectors = np.zeros((0, dim), dtype=np.float32)  # capacity rows; the first len(ids) are used
        self.codes = np.zeros(0, dtype=np.int32)
        self.chunks = np.zeros(0, dtype=np.int64)
        self.alive = np.zeros(0, dtype=bool)

    @classmethod
    def load(cls, client: QdrantClient, name: str, page: int = 4096) -> _Mirror:
        """Every point of collection `name`, read through `client` a page at a time."""
        mirror = cls(client.get_collection(name).config.params.vectors.size)
        offset = None
        while True:
            records, offset = client.scroll(name, limit=page, offset=offset, with_payload=["source", "chunk"],
                                            with_vectors=True)  # fmt: skip
            if records:
                vectors = np.asarray([r.vector for r in records], dtype=np.float32)
                mirror.put([str(r.id) for r in records], vectors, [_Row(r.payload) for r in records])
            if offset is None:
                return mirror

    def put(self, ids: Sequence[str], vectors: np.ndarray, chunks: Sequence[Chunk | _Row]) -> None:
        """Write points (as the store did): a new id takes a new row, a known one is overwritten and revived."""
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # the store keeps cosine vectors unit length
        vectors = vectors / np.where(norms > _EPSILON, norms, 1.0)  # as local mode does
        rows = []
        for point_id in ids:
            row = self.row_of.get(point_id)
            if row is None:
                row = self.row_of[point_id] = len(self.ids)
                self.ids.append(point_id)
            rows.append(row)
        if len(self.ids) > len(self.vectors):
            capacity = max(len(self.ids), 2 * len(self.vectors))
            self.vectors = _grown(self.vectors, capacity)
            self.codes, self.chunks, self.alive = (_grown(a, capacity) for a in (self.codes, self.chunks, self.alive))
        rows = np.array(rows, dtype=np.int64)
        self.vectors[rows] = vectors
        self.codes[rows] = [self.code_of.setdefault(c.source, len(self.code_of)) for c in chunks]
        self.chunks[rows] = [c.index for c in chunks]
        self.alive[rows] = True

    def delete(self, source: str, min_chunk: int = 0) -> None:
        """Mark the points of `source` with chunk index >= `min_chunk` deleted."""
        code = self.code_of.get(source)
        if code is not None:
            n = len(self.ids)
            self.alive[:n] &= (self.codes[:n] != code) | (self.chunks[:n] < min_chunk)

    def search(self, vector: np.ndarray, top_k: int, sources: list[str] | None) -> tuple[list[str], list[float]]:
        """Ids and cosine scores of the `top_k` live points closest to `vector`, best first."""
        n = len(self.ids)
        norm = np.linalg.norm(vector)
        query = vector / (norm if norm != 0 else _EPSILON)
        keep = self.alive[:n]
        if sources is not None:
            codes = [self.code_of[s] for s in sources if s in self.code_of]
            keep = keep & np.isin(self.codes[:n], codes)
        rows = None if keep.all() else np.flatnonzero(keep)
        if rows is None:
            scores = self.vectors[:n] @ query
        elif sources is not None:  # few rows, usually: score only those
            scores = self.vectors[rows] @ query
        else:  # all but the deleted rows: scoring every row beats copying the live ones
            scores = (self.vectors[:n] @ query)[rows]
        k = min(top_k, len(scores))
        if k == 0:
            return [], []
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        found = top if rows is None else rows[top]
        return [self.ids[r] for r in found], scores[top].astype(float).tolist()


@dataclass(frozen=True)
class _Row:
    """The payload fields a mirror keeps, from a stored point."""

    payload: dict

    @property
    def source(self) -> str:
        return self.payload["source"]

    @property
    def index(self) -> int:
        return self.payload["chunk"]


_EPSILON = 1.1920929e-7  # what qdrant-client's local mode divides by instead of a zero norm


def _grown(array: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
    out[: len(array)] = array
    return out


def _sources_filter(sources: list[str] | None) -> models.Filter | None:
    if sources is None:
        return None
    return models.Filter(must=[models.FieldCondition(key="source", match=models.MatchAny(any=sources))])


def _source_filter(source: str | None, min_chunk: int) -> models.Filter | None:
    if source is None:
        return None
    must = [models.FieldCondition(key="source", match=models.MatchValue(value=source))]
    if min_chunk > 0:
        must.append(models.FieldCondition(key="chunk", range=models.Range(gte=min_chunk)))
    return models.Filter(must=must)
