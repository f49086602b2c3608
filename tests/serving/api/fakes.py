"""Fast fakes of the API's seams, for tests that send many requests (schemathesis): an engine client that
checks requests as the real engines do and answers in microseconds, an in-memory retriever, and a fixed
expert load."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from serving.engine_client import RequestOutput, SamplingParams, TokenLogprobs, check_request
from serving.errors import UnknownCollectionError
from serving.expert_load import ExpertLoad
from serving.retrieval.ingest import Document, IngestReport
from serving.retrieval.store import Passage

FAKE_TOKEN = 5  # every generated token


class ScriptedEngine:
    """An EngineClient that refuses what the real engines refuse (check_request) and generates at most
    `max_new` tokens of FAKE_TOKEN, with logprobs and prompt logprobs when asked (all -0.5, rank 1)."""

    def __init__(self, vocab_size: int, max_model_len: int, max_new: int = 3):
        self.vocab_size, self.max_model_len, self.max_new = vocab_size, max_model_len, max_new

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        check_request(prompt_ids, params, self.vocab_size, self.max_model_len)
        prompt_lp = None
        if params.prompt_logprobs is not None:
            prompt_lp = [None] + [_entry(t, params.prompt_logprobs) for t in prompt_ids[1:]]
        n = min(params.max_tokens, self.max_new)
        if n == 0:
            yield RequestOutput(request_id or "r", [], "", [], True, "length", len(prompt_ids), 0, prompt_lp)
            return
        for i in range(n):
            logprobs = [_entry(FAKE_TOKEN, params.logprobs)] if params.logprobs is not None else []
            done = i == n - 1
            yield RequestOutput(
                request_id or "r", [FAKE_TOKEN], "x", logprobs, done, "length" if done else None, len(prompt_ids),
                i + 1, prompt_lp if i == 0 else None,
            )  # fmt: skip


def _entry(token_id: int, top_n: int) -> TokenLogprobs:
    return TokenLogprobs(token_id, -0.5, tuple((token_id + k, -0.5 - k) for k in range(top_n)), rank=1)


class MemoryRetriever:
    """A RetrieverClient over dicts: collection -> source -> text (one chunk per document)."""

    def __init__(self, default: str = "docs"):
        self.default = default
        self.stores: dict[str, dict[str, str]] = {default: {"intro.md": "Experts live on shards."}}

    def _collection(self, name: str | None) -> dict[str, str]:
        name = name or self.default
        if name not in self.stores:
            raise UnknownCollectionError(f"collection {name!r} does not exist; there are {sorted(self.stores)}")
        return self.stores[name]

    async def retrieve(
        self, query: str, top_k: int, collection: str | None = None, sources: Sequence[str] | None = None
    ) -> list[Passage]:
        docs = self._collection(collection)
        hits = [Passage(1.0, s, 0, t) for s, t in docs.items() if t and (sources is None or s in sources)]
        return hits[:top_k]

    async def ingest(self, documents: Sequence[Document], collection: str | None = None) -> IngestReport:
        docs = self.stores.setdefault(collection or self.default, {})
        for d in documents:
            docs[d.source] = d.text
        return IngestReport(files=len(documents), chunks=sum(bool(d.text) for d in documents))

    async def delete(self, sources: Sequence[str], collection: str | None = None) -> int:
        docs = self._collection(collection)
        return sum(docs.pop(s, None) is not None for s in sources)

    async def collections(self) -> list[tuple[str, int]]:
        return [(name, len(docs)) for name, docs in self.stores.items()]


class FixedExpertLoad:
    """An ExpertLoadSource (serving/expert_load.py) that always answers LOAD: 2 MoE layers of 4 experts."""

    LOAD = ExpertLoad((0, 1), 4, 60.0, ((10, 3, 2, 1), (4, 4, 4, 4)), routers=2)

    async def expert_load(self) -> ExpertLoad:
        return self.LOAD


class PlanningTarget:
    """A RebalanceTarget (serving/rebalancing.py) that plans for real (router/rebalance.py) from FixedExpertLoad's
    load, against a contiguous placement on 2 shards, and "deploys" by counting; `refuse` is raised instead."""

    def __init__(self, refuse: Exception | None = None):
        self.refuse, self.calls, self.deployed = refuse, [], 0

    async def rebalance(self, redundant: int | None, dry_run: bool) -> dict:
        import torch

        from router.placement import LayeredPlacement, Placement, PlacementError
        from router.rebalance import rebalance
        from serving.errors import RequestError

        self.calls.append((redundant, dry_run))
        if self.refuse is not None:
            raise self.refuse
        load = FixedExpertLoad.LOAD
        current = LayeredPlacement.uniform(Placement.contiguous(load.num_experts, 2), len(load.layers))
        try:
            report = rebalance(torch.tensor(load.load), 2, redundant or 0, current=current).to_json()
        except PlacementError as e:  # as EngineReplica.plan_rebalance answers it
            raise RequestError(f"redundant={redundant}: {e}") from None
        self.deployed += not dry_run
        applied = {"applied": not dry_run, "reason": "dry run" if dry_run else "rolling update started"}
        return {**report, **applied, "redundant": redundant or 0, "rows": sum(load.load[0])}
