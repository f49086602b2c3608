"""Every metric the service exports, declared in one place, and the pure-Python parts that record them.

Names carry the `moe_` prefix and their unit (`_seconds`, `_total`, `_rows`, `_ratio`); labels are bounded
(model, replica, route, status, shard, layer, expert, kernel), never a request id. What measures what:

    TTFT, ITL, end-to-end     MeteredClient, around the engine client the HTTP API calls: what users feel
    HTTP requests             HttpMetrics, an ASGI middleware (route and status code)
    engine step, queue, KV    LLMEngine.record_step, once per engine step
    tokens per expert         RoutingCounter (serving/experts/routing_counter.py), the gate's choices
    expert kernel             each replica holding experts, once at start (shard, or router with shards: 0)
    dispatch per shard        the shard transport (deployments/transport.py)
    rows per shard, balance   the sharded expert backend (serving/experts/sharded.py), where a layer's rows are
                                split between shards: each call's rows (a histogram, and a counter: exact sums),
                                each layer's balancedness over the router's window of them
                                (serving/experts/shard_rows.py); none with shards: 0
    shard retries, hedges,    the sharded expert backend (serving/experts/sharded.py) and the transport:
      timeouts, failovers       what a dead or slow shard replica cost
    request migrations        the Ingress's router client (deployments/ingress.py): streams moved off a dead router
    retrieval latency, errors the API's retrieval calls (serving/api/retrieval.py), hop to the Retriever included

The definitions follow vLLM's serving benchmark: TTFT is the time from receiving the request to its
first output token; ITL is each gap between successive output tokens; end-to-end is receipt to last token.
Export is pluggable (`MetricsSink`); on Ray Serve the sink is deployments/metrics.py (ray.util.metrics).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal, Protocol

from serving.engine_client import EngineClient, RequestOutput, SamplingParams

# Bucket edges, in seconds or counts.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# One shard call and its parts: a direct hop is ~0.3-1 ms, a call's compute from ~0.1 ms (1 row) up. Steps of
# 1.5-2x up to 100 ms, so that quantiles interpolated within a bucket (PromQL's histogram_quantile) are close.
SHARD_CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                      0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# (token, expert) rows of one shard call: up to max_batched_tokens x top-k in a prefill step
SHARD_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    labels: tuple[str, ...] = ("model",)
    buckets: tuple[float, ...] = ()


TTFT = Metric("moe_time_to_first_token_seconds", "histogram", "Request receipt to first output token.",
              buckets=LATENCY_BUCKETS)  # fmt: skip
ITL = Metric("moe_inter_token_latency_seconds", "histogram", "Gap between successive output tokens.",
             buckets=TOKEN_GAP_BUCKETS)  # fmt: skip
E2E = Metric("moe_e2e_request_latency_seconds", "histogram", "Request receipt to last output token.",
             buckets=LATENCY_BUCKETS)  # fmt: skip
QUEUE = Metric("moe_request_queue_seconds", "histogram", "Time a request waited before its first engine step.",
               buckets=LATENCY_BUCKETS)  # fmt: skip
PROMPT_TOKENS = Metric("moe_prompt_tokens_total", "counter", "Prompt tokens of finished requests.")
GENERATED_TOKENS = Metric("moe_generation_tokens_total", "counter", "Tokens generated.")
RUNNING = Metric("moe_requests_running", "gauge", "Requests in the running batch (per router replica).",
                 labels=("model", "replica"))  # fmt: skip
WAITING = Metric("moe_requests_waiting", "gauge", "Requests queued for the running batch (per router replica).",
                 labels=("model", "replica"))  # fmt: skip
KV_USAGE = Metric("moe_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use (per router replica).",
                  labels=("model", "replica"))  # fmt: skip
STEP = Metric("moe_engine_step_seconds", "histogram", "Duration of one engine step.", buckets=STEP_BUCKETS)
BATCH = Metric("moe_engine_batch_tokens", "histogram", "Tokens run in one engine step.", buckets=BATCH_BUCKETS)
EXPERT_TOKENS = Metric("moe_expert_tokens_total", "counter", "Token rows the gate routed to each expert.",
                       labels=("model", "layer", "expert"))  # fmt: skip
EXPERT_KERNEL = Metric("moe_expert_kernel_info", "gauge", "1 for the expert kernel (loop or vllm, auto resolved) "
                       "a replica holding experts runs.", labels=("model", "kernel"))  # fmt: skip
DISPATCH = Metric("moe_dispatch_seconds", "histogram", "One MoE layer's call to one shard, send to result.",
                  labels=("model", "shard"), buckets=SHARD_CALL_BUCKETS)  # fmt: skip
LAYER_DISPATCH = Metric("moe_layer_dispatch_seconds", "histogram", "One MoE layer's routed experts over the shards, "
                        "first send to the last answer in (retries included): the layer's wait for its slower shard, "
                        "what a placement's balance changes.", labels=("model", "layer"),
                        buckets=SHARD_CALL_BUCKETS)  # fmt: skip
# moe_dispatch_seconds split in two, for calls over the direct transport (the shard reports its part)
SHARD_COMPUTE = Metric("moe_shard_compute_seconds", "histogram", "The shard replica's own time on one call, as "
                       "its answer reports it: its experts, and the result's copy to the host (direct transport).",
                       labels=("model", "shard"), buckets=SHARD_CALL_BUCKETS)  # fmt: skip
SHARD_HOP = Metric("moe_shard_hop_seconds", "histogram", "One shard call's round trip minus the shard's own time: "
                   "framing, the network, and waiting for the shard's and the router's threads (direct transport).",
                   labels=("model", "shard"), buckets=SHARD_CALL_BUCKETS)  # fmt: skip
SHARD_CALL_ROWS = Metric("moe_shard_call_rows", "histogram", "(token, expert) rows one MoE layer call sent to one "
                         "shard and got results for: the shard's load as router/balance.py counts it.",
                         labels=("model", "layer", "shard"), buckets=SHARD_ROWS_BUCKETS)  # fmt: skip
# The same rows counted exactly: Ray exports a histogram's _sum estimated from bucket midpoints, not the sum
SHARD_ROWS = Metric("moe_shard_rows_total", "counter", "(token, expert) rows shards computed, per MoE layer (the "
                    "sum of moe_shard_call_rows, exact).", labels=("model", "layer", "shard"))  # fmt: skip
BALANCEDNESS = Metric("moe_expert_balancedness_ratio", "gauge", "Mean shard rows / max shard rows of one MoE layer "
                      "over this router's expert_load_window_s (1 = even; router/planner.py balancedness).",
                      labels=("model", "replica", "layer"))  # fmt: skip
SHARD_RETRIES = Metric("moe_shard_retries_total", "counter", "Shard calls sent again after an attempt failed "
                       "(replica died or unreachable, or timed out).", labels=("model", "shard"))  # fmt: skip
SHARD_CALLS = Metric("moe_shard_calls_total", "counter", "Shard call attempts sent, by transport: direct (a TCP "
                     "stream to a replica, rows in the frame), channel (the same, rows on its row channel: "
                     "direct_rows) or handles (a Serve handle: transport: handles, or a shard whose replicas' ports "
                     "are not known yet).", labels=("model", "shard", "transport"))  # fmt: skip
SHARD_TIMEOUTS = Metric("moe_shard_timeouts_total", "counter", "Shard call attempts that passed "
                        "shard_call_timeout_s.", labels=("model", "shard"))  # fmt: skip
SHARD_HEDGES = Metric("moe_shard_hedges_total", "counter", "Second attempts sent because a shard call was slow "
                      "(shard_hedge_after_s).", labels=("model", "shard"))  # fmt: skip
SHARD_FAILOVERS = Metric("moe_shard_failovers_total", "counter", "Rows of replicated experts sent to another "
                         "holder because this shard failed.", labels=("model", "shard"))  # fmt: skip
MIGRATIONS = Metric("moe_request_migrations_total", "counter", "Streams re-submitted to another router: theirs "
                    "died (reason router_died), or its shards run another app version (stale_placement, during a "
                    "rolling update).", labels=("model", "reason"))  # fmt: skip
REBALANCES = Metric("moe_rebalances_total", "counter", "Rolling updates to a placement planned from the expert "
                    "load, by trigger (request: POST /v1/admin/rebalance; auto: rebalance.auto_below).",
                    labels=("model", "trigger"))  # fmt: skip
HTTP_REQUESTS = Metric("moe_http_requests_total", "counter", "HTTP requests by route and status code.",
                       labels=("model", "route", "status"))  # fmt: skip
RETRIEVAL = Metric("moe_retrieval_seconds", "histogram", "One search: embed the query and search Qdrant, as the "
                   "API waits for it.", buckets=LATENCY_BUCKETS)  # fmt: skip
RETRIEVAL_ERRORS = Metric("moe_retrieval_errors_total", "counter", "Searches that failed, by reason "
                          "(unavailable, timeout, unknown_collection, bad_request).",
                          labels=("model", "reason"))  # fmt: skip

ALL = (TTFT, ITL, E2E, QUEUE, PROMPT_TOKENS, GENERATED_TOKENS, RUNNING, WAITING, KV_USAGE, STEP, BATCH,
       EXPERT_TOKENS, EXPERT_KERNEL, DISPATCH, LAYER_DISPATCH, SHARD_COMPUTE, SHARD_HOP, SHARD_CALL_ROWS, SHARD_ROWS,
       BALANCEDNESS, SHARD_RETRIES, SHARD_CALLS, SHARD_TIMEOUTS, SHARD_HEDGES, SHARD_FAILOVERS, MIGRATIONS, REBALANCES,
       HTTP_REQUESTS, RETRIEVAL, RETRIEVAL_ERRORS)  # fmt: skip


class MetricsSink(Protocol):
    """Where recorded values go: counters add, gauges set, histograms observe."""

    def record(self, metric: Metric, value: float, labels: dict[str, str]) -> None: ...


class NullSink:
    def record(self, metric: Metric, value: float, labels: dict[str, str]) -> None:
        pass


class MemorySink:
    """Keeps every record in a list: for tests, and a fake that implements the same protocol."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, dict[str, str]]] = []

    def record(self, metric: Metric, value: float, labels: dict[str, str]) -> None:
        self.records.append((metric.name, value, dict(labels)))

    def values(self, name: str) -> list[float]:
        return [v for n, v, _ in self.records if n == name]


class MeteredClient:
    """An EngineClient (serving/engine_client.py) that records TTFT, ITL and end-to-end latency per request."""

    def __init__(self, client: EngineClient, sink: MetricsSink, model: str):
        self.client, self.sink, self.labels = client, sink, {"model": model}

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        start = last = time.perf_counter()
        first = True
        # aclosing: leaving early (client gone) closes the inner stream at once, which aborts the request
        async with aclosing(self.client.generate(prompt_ids, params, request_id)) as stream:
            async for out in stream:
                if out.new_token_ids:
                    now = time.perf_counter()
                    if first:
                        self.sink.record(TTFT, now - start, self.labels)
                        first = False
                    else:
                        self.sink.record(ITL, now - last, self.labels)
                    last = now
                if out.finished:
                    self.sink.record(E2E, time.perf_counter() - start, self.labels)
                yield out


class HttpMetrics:
    """ASGI middleware: counts HTTP requests by route template and status code (bounded labels:
    unknown paths are counted as route "other")."""

    def __init__(self, app, sink: MetricsSink, model: str, routes: frozenset[str]):
        self.app, self.sink, self.model, self.routes = app, sink, model, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in self.routes if path.endswith(r)), "other")
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            labels = {"model": self.model, "route": route, "status": str(status["code"])}
            self.sink.record(HTTP_REQUESTS, 1, labels)
