"""The locust user: streams OpenAI completions and chat requests and reports TTFT, ITL, TPOT and E2E.

`moe-serve loadtest` runs this file for you. To run it by hand, from the repository root:

    .venv/bin/python -m locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 8 -t 60s --max-tokens 64 --records-file /tmp/requests.jsonl

Importing locust monkey-patches the process with gevent, which breaks Ray and qdrant-client: this
module is only ever imported inside a locust process, never by tests or by `moe-serve`.

What locust sees (request_type / name = completions or chat; times in ms; see stream.py for definitions):
    TTFT   one per successful request
    ITL    one per gap between content chunks
    TPOT   one per successful request with at least two output tokens
    E2E    one per request, failures included; its response_length is the request's output tokens,
           so locust's "Average size" of an E2E row is the mean output tokens per request
locust's "Aggregated" row adds these different metrics together and means nothing here: read the
runner's summary.json. With --records-file, each request also appends one JSON line of timings.
Auth: $MOE_LOADTEST_API_KEY (else $OPENAI_API_KEY) is sent as a bearer token when set.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import requests
from locust import User, constant_throughput, events, task
from locust.exception import StopUser

from loadtests.stream import Timing, time_stream
from loadtests.workload import Workload, add_locust_arguments

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 300  # the longest silence between two chunks before a request fails
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@events.init_command_line_parser.add_listener
def _workload_arguments(parser) -> None:
    add_locust_arguments(parser)


class OpenAIUser(User):
    """One simulated client: sends streaming requests back to back, or paced to the workload's rate."""

    _spawned = itertools.count()  # each user's own prompt stream, by spawn order

    def on_start(self) -> None:
        user_index = next(self._spawned)  # before any request: a request lets the other users start meanwhile
        options = self.environment.parsed_options
        runner = self.environment.runner
        self.workload = Workload.from_options(options)
        self.http = requests.Session()
        api_key = os.environ.get("MOE_LOADTEST_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        # Line-buffered append: every record is one write(), so users sharing the file never interleave.
        self.records = open(options.records_file, "a", buffering=1) if options.records_file else None
        self.model = self.workload.model or self._first_model()  # may stop the user (then on_stop runs)
        self.sampler = self.workload.sampler(user_index)
        users = max(runner.target_user_count, 1)
        self.pace = constant_throughput(self.workload.rate / users) if self.workload.rate else None

    def on_stop(self) -> None:
        if self.records is not None:
            self.records.close()
        self.http.close()

    def wait_time(self) -> float:
        return self.pace(self) if self.pace else 0.0

    def _first_model(self) -> str:
        """The first id of GET /v1/models; a user that cannot learn it stops (reported as a failure)."""
        start = time.perf_counter()
        try:
            r = self.http.get(f"{self.host}/v1/models", timeout=(CONNECT_TIMEOUT_S, 60))
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
            error = None
        except (requests.RequestException, ValueError, KeyError, IndexError) as e:
            model, error = "", e
        elapsed_ms = (time.perf_counter() - start) * 1000
        self.environment.events.request.fire(
            request_type="GET", name="/v1/models", response_time=elapsed_ms, response_length=0, exception=error
        )
        if error is not None:
            raise StopUser()
        return model

    @task
    def stream_one(self) -> None:
        kind, prompt = self.sampler.next()
        body = self.workload.body(kind, self.model, prompt)
        started_at = time.time()  # wall clock, for throughput over time
        sent = time.perf_counter()  # monotonic, for every interval
        status = None
        try:
            with self.http.post(
                self.host + PATHS[kind], json=body, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
            ) as r:
                status = r.status_code
                if status != 200:
                    timing = Timing(e2e=time.perf_counter() - sent, error=f"HTTP {status}: {r.text[:200]}")
                else:
                    # chunk_size=None: hand over each HTTP chunk (one SSE event) as soon as it arrives
                    timing = time_stream(r.iter_lines(chunk_size=None), sent, time.perf_counter)
        except (requests.RequestException, ValueError) as e:  # connection errors, timeouts, bad JSON
            timing = Timing(e2e=time.perf_counter() - sent, error=f"{type(e).__name__}: {e}")
        self._report(kind, timing)
        if self.records is not None:
            record = timing.record(
                start=started_at, kind=kind, model=self.model, status=status, prompt_words=len(prompt.split())
            )
            self.records.write(json.dumps(record) + "\n")

    def _report(self, kind: str, t: Timing) -> None:
        fire = self.environment.events.request.fire
        if t.error is None:
            fire(request_type="TTFT", name=kind, response_time=t.ttft * 1000, response_length=0, exception=None)
            for gap in t.itl:
                fire(request_type="ITL", name=kind, response_time=gap * 1000, response_length=0, exception=None)
            if t.tpot is not None:
                fire(request_type="TPOT", name=kind, response_time=t.tpot * 1000, response_length=0, exception=None)
        error = None if t.error is None else RuntimeError(t.error)
        tokens = t.output_tokens
        fire(request_type="E2E", name=kind, response_time=t.e2e * 1000, response_length=tokens, exception=error)
