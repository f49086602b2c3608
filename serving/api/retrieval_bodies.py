"""Retrieval in the HTTP API: the `retrieval` extension of chat/completions requests, and the bodies of
/v1/retrieve, /v1/documents and /v1/collections.

    POST /v1/chat/completions {"model": ..., "messages": [...],
                               "retrieval": {"top_k": 4, "collection": "docs", "required": false}}
    -> the usual response, plus "retrieval": {"collection": "docs", "used": true, "error": null,
                                              "sources": [{"index": 1, "source": "README.md", ...}]}
    POST /v1/retrieve    {"query": "where do experts live?", "top_k": 4, "filter": {"source": ["README.md"]}}
    POST /v1/documents   {"collection": "docs", "documents": [{"source": "notes.md", "text": "..."}]}
    DELETE /v1/documents?collection=docs&source=notes.md&source=old.md
    GET /v1/collections

`index` in a response's sources is the number the prompt gave that passage ([1], [2], ...), so an
answer's citations map back to sources. Field rules are as in serving/api/requests.py: unknown fields are
refused with a 400 that names them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from serving.api.fields import NOT_BLANK, json_int
from serving.retrieval.ingest import Document, IngestReport
from serving.retrieval.store import Passage

MAX_TOP_K = 20  # passages per request: more would not fit a prompt anyway
DEFAULT_TOP_K = 4
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255, strip_whitespace=True),
    Field(json_schema_extra={"pattern": NOT_BLANK}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # accept what the schema says (serving/api/fields.py)


class SourceFilter(_Strict):
    source: Name | list[Name] = Field(description="Only passages from this source (or these sources).")

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)


class RetrievalOptions(_Strict):
    """The `retrieval` field of /v1/chat/completions and /v1/completions (an extension)."""

    top_k: json_int(ge=1, le=MAX_TOP_K) = Field(DEFAULT_TOP_K, description="Passages fused into the prompt.")
    collection: Name | None = Field(None, description="Collection to search; default: the server's.")
    required: bool = Field(
        False, description="true: fail with 503 when retrieval fails; false: answer without context and say so."
    )
    filter: SourceFilter | None = Field(None, description="Search only these sources.")


class RetrieveRequest(_Strict):
    query: Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)] = Field(
        description="The text to search for (not blank).", json_schema_extra={"pattern": NOT_BLANK}
    )
    top_k: json_int(ge=1, le=MAX_TOP_K) = Field(DEFAULT_TOP_K)
    collection: Name | None = Field(None, description="Default: the server's collection.")
    filter: SourceFilter | None = None


class PassageOut(BaseModel):
    index: int = Field(description="1-based rank; the [n] the prompt gave it.")
    score: float = Field(description="Cosine similarity of query and passage (higher is closer).")
    source: str
    chunk: int = Field(description="The chunk's index within its source.")
    text: str

    @classmethod
    def ranked(cls, passages: list[Passage]) -> list[PassageOut]:
        return [
            cls(index=i, score=p.score, source=p.source, chunk=p.chunk, text=p.text)
            for i, p in enumerate(passages, start=1)
        ]


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    collection: str
    data: list[PassageOut]


class RetrievalInfo(BaseModel):
    """What retrieval did for a chat/completions request (in the response, and in a stream's first chunk)."""

    collection: str
    used: bool = Field(description="Whether passages were put into the prompt.")
    sources: list[PassageOut]
    error: str | None = Field(None, description="Why retrieval failed, when `required` was false.")


class DocumentIn(_Strict):
    source: Name = Field(description="A stable name (a file's relative path): sending it again replaces it.")
    text: str = Field(description="The whole document; an empty text deletes the source's chunks.")


class IngestRequest(_Strict):
    collection: Name | None = Field(None, description="Default: the server's collection; created if missing.")
    documents: list[DocumentIn] = Field(min_length=1)

    @field_validator("documents")
    @classmethod
    def _unique(cls, v: list[DocumentIn]) -> list[DocumentIn]:
        seen = set()
        for doc in v:
            if doc.source in seen:
                raise ValueError(f"source {doc.source!r} is given twice; send each document once")
            seen.add(doc.source)
        return v

    def to_documents(self) -> list[Document]:
        return [Document(d.source, d.text) for d in self.documents]


class IngestResponse(BaseModel):
    collection: str
    documents: int
    chunks: int = Field(description="Chunks written.")
    stale_deleted: int = Field(description="Old chunks of documents that got shorter, deleted.")
    seconds: float

    @classmethod
    def of(cls, collection: str, report: IngestReport) -> IngestResponse:
        return cls(
            collection=collection, documents=report.files, chunks=report.chunks,
            stale_deleted=report.stale_deleted, seconds=round(report.seconds, 3),
        )  # fmt: skip


class DeleteResponse(BaseModel):
    collection: str
    deleted: int = Field(description="Chunks deleted.")


class CollectionOut(BaseModel):
    name: str
    points: int


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionOut]
