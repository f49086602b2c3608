"""What the engine and the API layer record, through an in-memory sink (same protocol as Ray's)."""

from __future__ import annotations

import asyncio

import httpx
import torch
from fastapi import FastAPI

from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig, SamplingParams
from serving.experts.routing_counter import RoutingCounter
from serving.metrics import ALL, EXPERT_TOKENS, HttpMetrics, MemorySink, MeteredClient


def test_names_units_and_labels_follow_the_conventions():
    for m in ALL:
        assert m.name.startswith("moe_"), m.name
        assert m.kind != "counter" or m.name.endswith("_total"), m.name
        assert "request_id" not in m.labels and "model" in m.labels
        assert (m.kind == "histogram") == bool(m.buckets)
        assert list(m.buckets) == sorted(m.buckets)


def test_engine_records_steps_and_expert_tokens_that_add_up(mixtral):
    model, experts = mixtral
    sink = MemorySink()
    engine = LLMEngine(model, experts, None, EngineConfig(), metrics=sink, metric_labels={"model": "m", "replica": "r"})
    prompt, new = [5, 6, 7, 8, 9], 4
    engine.generate_batch([prompt], SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    # tokens through the model x top-2 x 2 MoE layers
    assert sum(sink.values(EXPERT_TOKENS.name)) == (len(prompt) + new - 1) * 2 * 2
    # the sliding window holds the same rows as the counter, per (layer, expert)
    counted: dict[tuple[str, str], float] = {}
    for name, value, labels in sink.records:
        if name == EXPERT_TOKENS.name:
            key = (labels["layer"], labels["expert"])
            counted[key] = counted.get(key, 0) + value
    window = engine.expert_load.snapshot()
    assert {(str(layer), str(e)): n for layer, row in zip(window.layers, window.load, strict=True)
            for e, n in enumerate(row) if n} == counted  # fmt: skip
    assert sum(sink.values("moe_generation_tokens_total")) == new
    assert sink.values("moe_prompt_tokens_total") == [len(prompt)]
    assert len(sink.values("moe_request_queue_seconds")) == 1
    assert len(sink.values("moe_engine_step_seconds")) == new
    gauges = [labels for name, _, labels in sink.records if name == "moe_kv_cache_usage_ratio"]
    assert gauges and all(labels == {"model": "m", "replica": "r"} for labels in gauges)


def test_routing_counter_counts_each_choice_once():
    counter = RoutingCounter(lambda layer, hidden, weights, ids: hidden, num_experts=4)
    counter(1, torch.zeros(3, 2), torch.ones(3, 2), torch.tensor([[0, 1], [1, 2], [1, 3]]))
    counter(3, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[2, 0]]))
    layers, rows = counter.drain()
    assert layers == [1, 3] and rows.tolist() == [[1, 3, 1, 1], [1, 0, 1, 0]]
    layers, rows = counter.drain()
    assert layers == [] and rows.shape == (0, 4)


class FakeOutput:
    def __init__(self, tokens, finished):
        self.new_token_ids, self.finished = tokens, finished


class FakeClient:
    async def generate(self, prompt_ids, params, request_id=None):
        for i in range(3):
            yield FakeOutput([i], finished=i == 2)


def test_metered_client_records_ttft_itl_and_e2e():
    sink = MemorySink()

    async def main():
        return [o async for o in MeteredClient(FakeClient(), sink, "m").generate([1], SamplingParams())]

    assert len(asyncio.run(main())) == 3
    assert len(sink.values("moe_time_to_first_token_seconds")) == 1
    assert len(sink.values("moe_inter_token_latency_seconds")) == 2
    [e2e] = sink.values("moe_e2e_request_latency_seconds")
    assert e2e >= sink.values("moe_time_to_first_token_seconds")[0]


def test_http_metrics_bound_the_route_label():
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {}

    sink = MemorySink()
    wrapped = HttpMetrics(app, sink, "m", frozenset({"/v1/models"}))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t") as client:
            await client.get("/v1/models")
            await client.get("/v1/requests/123")  # unknown paths must not become labels

    asyncio.run(main())
    assert [labels for _, _, labels in sink.records] == [
        {"model": "m", "route": "/v1/models", "status": "200"},
        {"model": "m", "route": "other", "status": "404"},
    ]


def test_leaving_a_metered_stream_early_closes_the_inner_stream_at_once():
    closed = []

    class Endless:
        async def generate(self, prompt_ids, params, request_id=None):
            try:
                while True:
                    yield FakeOutput([1], finished=False)
            finally:
                closed.append(True)  # AsyncEngine aborts the request here

    async def main():
        stream = MeteredClient(Endless(), MemorySink(), "m").generate([1], SamplingParams())
        async for _ in stream:
            break
        await stream.aclose()
        return list(closed)

    assert asyncio.run(main()) == [True]
