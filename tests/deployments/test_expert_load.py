"""RouterLoads (deployments/expert_load.py) on a fake handle: the sum of the replicas that answered, and 503s.
On the session cluster with 2 routers: tests/deployments/test_failures.py (it has that app already)."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import DeploymentUnavailableError

from deployments.expert_load import RouterLoads
from serving.errors import EngineUnavailableError
from serving.expert_load import ExpertLoad


def load(rows) -> ExpertLoad:
    return ExpertLoad((0, 1), 2, 60.0, tuple(map(tuple, rows)))


class FakeBroadcast:
    def __init__(self, answers):
        self.answers = answers

    async def results_async(self, timeout_s: float, return_exceptions: bool):
        assert return_exceptions and timeout_s > 0
        if isinstance(self.answers, BaseException):
            raise self.answers
        return self.answers


class FakeRouterHandle:
    """What RouterLoads uses of a DeploymentHandle: broadcast(method).results_async(...)."""

    def __init__(self, answers):
        self.answers, self.methods = answers, []

    def broadcast(self, method: str) -> FakeBroadcast:
        self.methods.append(method)
        return FakeBroadcast(self.answers)


def test_router_loads_adds_up_the_replicas_that_answered():
    died = ActorDiedError()
    handle = FakeRouterHandle([load([[1, 2], [3, 4]]), died, load([[10, 0], [0, 10]])])
    total = asyncio.run(RouterLoads(handle).expert_load())
    assert handle.methods == ["expert_load"]
    assert total.load == ((11, 2), (3, 14)) and total.routers == 2


@pytest.mark.parametrize(
    "answers, says",
    [
        (DeploymentUnavailableError("Router"), "no Router replica is up"),
        (TimeoutError(), "did not all answer within 5 s"),
        ([ActorDiedError()], "none of 1 Router replicas answered"),
    ],
)
def test_router_loads_without_an_answer_is_engine_unavailable(answers, says):
    with pytest.raises(EngineUnavailableError, match=says):
        asyncio.run(RouterLoads(FakeRouterHandle(answers)).expert_load())
