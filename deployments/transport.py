"""ShardTransport over Serve DeploymentHandles: the simple first transport (docs/architecture.md, "Seams").

Called from the engine thread of a Router replica (not its event loop): every call of a layer is sent
with `.remote()` first (`start`), then results are taken as they complete (the collect it returns), so
shards work concurrently, the router may compute something else in between, and each call's dispatch
latency (send to result) is its own, not the longest of the calls before it.

What a dead or slow replica costs here (the backend, serving/experts/sharded.py, retries what fails):
- a call whose replica dies fails fast (ActorDiedError) and is reported as ShardFailure("gone"); Serve
  stops choosing that replica, so the retry goes to a live one;
- a call still unanswered after `hedge_after_s` gets a second attempt (Serve picks the replica, the less
  busy one if it can tell), and the first answer wins;
- a call no replica took (the shard has none up) or none answered within `call_timeout_s` is
  ShardFailure("timeout").
- a call a replica of another app version refuses (StalePlacementError: a rolling update is under way)
  is ShardFailure("stale"), retried like the others, so rows are never computed by another placement's
  experts;
An exception the shard's own code raised otherwise is not retried: it propagates and fails the step.
`probe(shard)` asks a shard that failed whether a replica answers again (ExpertShard.ping), off the hot path.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.handle import DeploymentHandle
from torch import Tensor

from serving.errors import StalePlacementError
from serving.experts.sharded import Collect, ShardCall, ShardFailure
from serving.metrics import DISPATCH, SHARD_CALLS, SHARD_HEDGES, SHARD_TIMEOUTS, MetricsSink, NullSink


@dataclass
class _Call:
    """One shard's call of a layer: its attempts (object refs) and when it was first sent."""

    shard: int
    call: ShardCall  # on the host, ready to send again
    sent_at: float
    refs: list = field(default_factory=list)
    hedged: bool = False


def next_deadline(open_calls: dict, results: dict, call_timeout_s: float, hedge_after_s: float | None) -> float:
    """The earliest moment a still-open call (one with `sent_at` and `hedged`, by shard) needs a hedge or
    times out; both transports wait until then."""
    times = []
    for shard, c in open_calls.items():
        if shard in results:
            continue
        times.append(c.sent_at + call_timeout_s)
        if hedge_after_s is not None and not c.hedged:
            times.append(c.sent_at + hedge_after_s)
    return min(times)


def overdue(c, now: float, call_timeout_s: float, hedge_after_s: float | None) -> str | None:
    """What an open call is due at `now`: "timeout" past call_timeout_s, "hedge" past hedge_after_s (once)."""
    if now >= c.sent_at + call_timeout_s:
        return "timeout"
    if hedge_after_s is not None and not c.hedged and now >= c.sent_at + hedge_after_s:
        return "hedge"
    return None


class HandleTransport:
    def __init__(
        self,
        handles: list[DeploymentHandle],
        metrics: MetricsSink | None = None,
        model: str = "model",
        call_timeout_s: float = 5.0,
        hedge_after_s: float | None = None,
        versions: list[str] | None = None,
    ):
        self.handles = handles  # shard id -> handle of ExpertShard-<id>
        self.versions = versions  # shard id -> its shard_version, sent with every call (None: unchecked)
        self.metrics, self.model = metrics or NullSink(), model
        self.call_timeout_s, self.hedge_after_s = call_timeout_s, hedge_after_s

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor | ShardFailure]:
        return self.start(layer, calls)()

    def start(self, layer: int, calls: dict[int, ShardCall]) -> Collect:
        # Device -> host before sending (Serve pickles the call; a CUDA tensor would not unpickle on another
        # node), one copy per shard call; each ExpertShard moves the rows to its own device on arrival.
        now = time.perf_counter()
        open_calls = {shard: _Call(shard, call.to("cpu"), now) for shard, call in calls.items()}
        responses = {shard: self._send(shard, layer, c.call) for shard, c in open_calls.items()}
        results: dict[int, Tensor | ShardFailure] = {}
        owner: dict = {}  # object ref -> its _Call
        for shard, response in responses.items():
            self._track(open_calls[shard], response, owner, results)
        return functools.partial(self._collect_all, layer, open_calls, owner, results)

    def _collect_all(self, layer: int, open_calls: dict[int, _Call], owner: dict, results: dict) -> dict:
        while open_calls.keys() - results.keys():
            timeout = next_deadline(open_calls, results, self.call_timeout_s, self.hedge_after_s) - time.perf_counter()
            done, _ = ray.wait(list(owner), num_returns=1, timeout=max(0.0, timeout))
            for ref in done:
                self._collect(ref, owner, results)
            self._hedge_or_expire(layer, open_calls, owner, results)
        return results

    def _send(self, shard: int, layer: int, call: ShardCall):
        version = None if self.versions is None else self.versions[shard]
        self.metrics.record(SHARD_CALLS, 1, {"model": self.model, "shard": str(shard), "transport": "handles"})
        return self.handles[shard].run.remote(layer, call, version)

    def probe(self, shard: int, timeout_s: float) -> bool:
        """Whether a replica of `shard` answers a ping within `timeout_s`."""
        try:
            ray.get(self.handles[shard].ping.remote()._to_object_ref_sync(_timeout_s=timeout_s), timeout=timeout_s)
            return True
        except (TimeoutError, ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return False

    def _track(self, c: _Call, response, owner: dict, results: dict) -> None:
        """Turn a sent response into an object ref to wait on (Serve's documented escape hatch from a
        DeploymentResponse to its ObjectRef; it returns once a replica has taken the call: at once where
        one is up, a little later on a new handle, which learns the replicas from Serve's controller)."""
        budget = c.sent_at + self.call_timeout_s - time.perf_counter()
        try:
            ref = response._to_object_ref_sync(_timeout_s=max(budget, 0.001))
        except TimeoutError:
            response.cancel()
            if not c.refs:  # a hedge that found no replica leaves the first attempt running
                self.metrics.record(SHARD_TIMEOUTS, 1, {"model": self.model, "shard": str(c.shard)})
                detail = f"no replica took it in {self.call_timeout_s:g} s"
                results.setdefault(c.shard, ShardFailure("timeout", detail))
            return
        c.refs.append(ref)
        owner[ref] = c

    def _collect(self, ref, owner: dict, results: dict) -> None:
        # A ref still in `owner` belongs to a call with no result yet: an answer or a timeout takes every
        # attempt of its call out of `owner`.
        c = owner.pop(ref)
        c.refs.remove(ref)
        try:
            value = ray.get(ref)
        except RayTaskError as e:  # the shard's own code raised
            if not isinstance(e.cause, StalePlacementError):
                raise
            if not c.refs:
                results[c.shard] = ShardFailure("stale", str(e.cause))
            return
        except (ActorDiedError, ActorUnavailableError) as e:
            if not c.refs:  # no other attempt of this call is still running
                results[c.shard] = ShardFailure("gone", type(e).__name__)
            return
        results[c.shard] = value
        for other in c.refs:  # a hedge that lost: its answer is not needed
            owner.pop(other, None)
        c.refs.clear()
        self.metrics.record(DISPATCH, time.perf_counter() - c.sent_at, {"model": self.model, "shard": str(c.shard)})

    def _hedge_or_expire(self, layer: int, open_calls: dict[int, _Call], owner: dict, results: dict) -> None:
        now = time.perf_counter()
        for shard, c in open_calls.items():
            if shard in results:
                continue
            labels = {"model": self.model, "shard": str(shard)}
            due = overdue(c, now, self.call_timeout_s, self.hedge_after_s)
            if due == "timeout":
                self.metrics.record(SHARD_TIMEOUTS, 1, labels)
                for ref in c.refs:
                    owner.pop(ref, None)
                c.refs.clear()
                results[shard] = ShardFailure("timeout", f"no answer in {self.call_timeout_s:g} s")
            elif due == "hedge":
                c.hedged = True
                self.metrics.record(SHARD_HEDGES, 1, labels)
                self._track(c, self._send(shard, layer, c.call), owner, results)
