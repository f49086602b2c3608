"""RouterClient's failover, against a handle that implements the streaming protocol the Ingress uses
(`handle.options(stream=True).generate.remote(...)` -> an async iterator with `cancel()`), so the timing of a
router's death can be chosen exactly. The real kills under load are in test_failures.py."""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError

from deployments.config import FailoverConfig
from deployments.ingress import RouterClient
from serving.engine_client import RequestOutput, SamplingParams
from serving.metrics import MIGRATIONS, MemorySink


def output(tokens: list[int], total: int, max_tokens: int) -> RequestOutput:
    done = total >= max_tokens
    return RequestOutput("r", tokens, "", [], done, "length" if done else None, 3, total)


class Stream:
    """One call's stream: its outputs, then (if `dies`) the replica's death."""

    def __init__(self, outputs: list[RequestOutput], dies: bool):
        self.outputs, self.dies, self.cancelled = outputs, dies, False

    async def _to_object_ref_gen(self):
        return None

    async def __aiter__(self):
        for out in self.outputs:
            yield out
        if self.dies:
            raise ActorDiedError()

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """Answers the n-th call with `plan[n](resumed_ids)` and records each call's resumed_ids."""

    def __init__(self, plan):
        self.plan, self.calls = plan, []

    def options(self, stream: bool) -> Handle:
        return self

    @property
    def generate(self) -> Handle:
        return self

    def remote(self, prompt_ids, params, request_id, resumed_ids) -> Stream:
        self.calls.append(list(resumed_ids))
        return self.plan[len(self.calls) - 1](resumed_ids)


def collect(handle: Handle, max_tokens: int) -> tuple[list[RequestOutput], MemorySink]:
    sink = MemorySink()
    client = RouterClient(handle, FailoverConfig(router_wait_s=1.0), sink)

    async def main():
        return [out async for out in client.generate([1, 2, 3], SamplingParams(max_tokens=max_tokens), "r")]

    return asyncio.run(main()), sink


def test_a_router_dying_after_the_last_token_but_before_its_stream_closes_costs_nothing():
    """The request is complete once its finished output arrived: it is not sent again (a resume with every
    token already produced is a request with nothing left to do, which the engine refuses)."""
    handle = Handle([lambda _: Stream([output([7, 8], 2, 4), output([9, 10], 4, 4)], dies=True)])
    outs, sink = collect(handle, max_tokens=4)
    assert [t for o in outs for t in o.new_token_ids] == [7, 8, 9, 10]
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert len(handle.calls) == 1 and sink.values(MIGRATIONS.name) == []


def test_a_router_dying_mid_stream_resumes_on_another_with_the_tokens_sent():
    handle = Handle(
        [
            lambda _: Stream([output([7, 8], 2, 4)], dies=True),
            lambda resumed: Stream([output([9, 10], 2 + len(resumed), 4)], dies=False),
        ]
    )
    outs, sink = collect(handle, max_tokens=4)
    assert [t for o in outs for t in o.new_token_ids] == [7, 8, 9, 10]
    assert handle.calls == [[], [7, 8]] and outs[-1].finished
    assert len(sink.values(MIGRATIONS.name)) == 1
