"""Routed experts held by shards, reached through a transport: the remote side of the ExpertBackend seam.

Shape legend: T = tokens in the step, D = hidden, K = experts per token, E = routed experts,
R_s = token rows sent to shard s, A_s = (row, expert) assignments of shard s.

Per MoE layer and engine step this makes at most one call per shard, carrying every row routed to
that shard by every request in the step, and no call to a shard that got no rows. All calls go out
before any result is awaited, so shards compute concurrently. Each shard returns its weighted partial
sums; they are added up here in shard order (a fixed order, so results do not depend on timing).

Failures cost a retry, not a request. A call the transport reports failed (its replica died, none was
up, or it timed out) is sent again: rows of a replicated expert go to another live holder at once, the
rest to the same shard (Serve picks a live replica of it), pausing between tries while no replica is up.
A layer that still misses a shard after `wait_s` raises EngineUnavailableError: the step's requests fail
with 503 and the engine goes on. A shard that refuses calls as another app version (a rolling update) past
`stale_wait_s` raises StalePlacementError instead: the requests move to another router.

The rows of a replicated expert are split between its live holders, in the proportions that level the
step's shard loads best (router/balance.py: split_rows), so one expert's rows may go to several shards in
one step; a shard that failed gets none of them until a call to it succeeds or a probe in the background
(`transport.probe`) finds a replica up again, so they never wait for it.

Metrics: each call that returns is observed in moe_shard_call_rows{layer, shard} ((token, expert) rows, the
shard's load) and counted in moe_shard_rows_total, and kept in a window of rows per (layer, shard)
(serving/experts/shard_rows.py) whose balancedness per layer is set in moe_expert_balancedness_ratio{replica,
layer} every BALANCE_REPORT_S, as a step starts (at its first MoE layer). With no traffic the gauge keeps its
last value.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from router.balance import assignment_shards, split_rows
from router.dispatch import Assignments, ShardBatch, check_expert_map, combine, flatten, split_assignments
from router.placement import Placement
from serving.errors import EngineUnavailableError, StalePlacementError
from serving.experts.backend import LayerExperts
from serving.experts.shard_rows import ShardRowsWindow
from serving.metrics import (
    BALANCEDNESS,
    LAYER_DISPATCH,
    SHARD_CALL_ROWS,
    SHARD_FAILOVERS,
    SHARD_RETRIES,
    SHARD_ROWS,
    MetricsSink,
    NullSink,
)

BALANCE_REPORT_S = 5.0  # moe_expert_balancedness_ratio is set at most this often (from the engine thread)


@dataclass(frozen=True)
class ShardCall:
    """One shard's work for one layer: rows and their (row, expert, weight) assignments."""

    hidden: Tensor  # [R_s, D] the rows this shard needs
    local_rows: Tensor  # [A_s] int64 index into hidden
    experts: Tensor  # [A_s] int64 global expert ids, all held by the shard
    weights: Tensor  # [A_s] gate weights

    def parts(self) -> list[Tensor]:
        """Its tensors in field order (how the wire and a row channel carry them)."""
        return [self.hidden, self.local_rows, self.experts, self.weights]

    def to(self, device: torch.device | str) -> ShardCall:
        """The same call with every tensor on `device` (a no-op where they are already)."""
        return ShardCall(*(t.to(device) for t in self.parts()))


@dataclass(frozen=True)
class ShardFailure:
    """A shard call that gave no result: its replica died or was unreachable ("gone"), no replica took or
    answered it in time ("timeout"), or a replica of another app version refused it ("stale"). The backend
    tries again; any other error the shard itself raised is not a ShardFailure."""

    reason: Literal["gone", "timeout", "stale"]
    detail: str = ""


def shard_version(model_path: str, shard: int, expert_ids: Mapping[int, Sequence[int]]) -> str:
    """What a router and a shard replica must agree on: the checkpoint and the experts the shard holds in
    each MoE layer ({model layer index: expert ids}). Every call carries the router's version for that
    shard; a replica of another version refuses it."""
    held = ";".join(f"{layer}:{','.join(map(str, sorted(ids)))}" for layer, ids in sorted(expert_ids.items()))
    return hashlib.sha256(f"{model_path}|{shard}|{held}".encode()).hexdigest()[:16]


Collect = Callable[[], "dict[int, Tensor | ShardFailure]"]  # waits for the answers of calls `start` sent


class ShardTransport(Protocol):
    """Sends every call of one layer; gives each shard's partial sums [R_s, D], or a ShardFailure."""

    def start(self, layer: int, calls: dict[int, ShardCall]) -> Collect:
        """Send every call and return at once (the shards compute meanwhile); call the result to wait for
        the answers. The caller may compute something else in between (the MoE block's shared expert)."""
        ...

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor | ShardFailure]:
        """start and wait: `start(layer, calls)()`."""
        ...

    def probe(self, shard: int, timeout_s: float) -> bool:
        """Whether a replica of `shard` answers now (asked from a background thread)."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """How long a layer keeps trying a failed shard (failover.shard_wait_s in the app config)."""

    wait_s: float = 30.0  # longest a layer holds for a shard with no live replica, from its first failure
    pause_s: float = 0.05  # first pause between tries of a shard none of whose rows could move; doubles
    max_pause_s: float = 1.0  # also the pause between background probes of a failed shard
    # Longest a layer retries shards that refuse its calls as another app version (StalePlacementError):
    # long enough to reach a matching replica while a shard's replicas are replaced one at a time, short
    # enough that a router left on the old version hands its requests on (to be moved) within a second.
    stale_wait_s: float = 1.0


@dataclass
class _Layout:
    """One layer's placement as dispatch uses it."""

    placement: Placement
    holders: list[tuple[int, ...]]  # [E] shards holding each expert
    replicated: bool
    expert_to_shard: Tensor  # [E] first holders: the map when nothing is replicated

    @classmethod
    def of(cls, placement: Placement) -> _Layout:
        holders = placement.holder_table()
        expert_to_shard = placement.expert_to_shard()
        check_expert_map(expert_to_shard, placement.num_shards)  # once, not per call
        return cls(placement, holders, any(len(h) > 1 for h in holders), expert_to_shard)


class ShardedExpertBackend:
    """ExpertBackend whose experts live on the shards of `placement`, reached through `transport`.

    placement: one Placement for every MoE layer, or one per MoE layer keyed by the model's layer index
    (shards may hold different experts in different layers; every layer has the same shards).

    >>> backend = ShardedExpertBackend(Placement.contiguous(8, 2), InProcessTransport(shard_experts))
    >>> out = backend(layer, hidden, weights, ids)  # same numbers as LocalExpertBackend

    replica labels this router's balancedness gauge; shard_rows is the window it is computed over (default:
    60 s, engine_config.expert_load_window_s in a deployment).
    """

    def __init__(
        self,
        placement: Placement | Mapping[int, Placement],
        transport: ShardTransport,
        policy: RetryPolicy | None = None,
        metrics: MetricsSink | None = None,
        model: str = "model",
        replica: str = "0",
        shard_rows: ShardRowsWindow | None = None,
    ):
        self.transport, self.policy = transport, policy or RetryPolicy()
        self.metrics, self.model, self.replica = metrics or NullSink(), model, replica
        self.every_layer: _Layout | None = None  # one placement for every layer, or
        self.layouts: dict[int, _Layout] = {}  # one per MoE layer (model layer index)
        if isinstance(placement, Placement):
            self.every_layer = _Layout.of(placement)
        else:
            self.layouts = {layer: _Layout.of(p) for layer, p in placement.items()}
        layouts = [self.every_layer] if self.every_layer else list(self.layouts.values())
        if not layouts or len({lay.placement.num_shards for lay in layouts}) > 1:
            raise ValueError("ShardedExpertBackend: needs a placement, the same shards in every layer")
        self.num_shards = layouts[0].placement.num_shards
        self.shard_rows = shard_rows or ShardRowsWindow(self.num_shards, window_s=60.0)
        if self.shard_rows.num_shards != self.num_shards:
            raise ValueError(f"ShardedExpertBackend: shard_rows counts {self.shard_rows.num_shards} shards, the "
                             f"placement has {self.num_shards}")  # fmt: skip
        self._first_layer: int | None = None  # the MoE layer each step starts with (the first one called)
        self._next_report = float("-inf")
        self._row_labels: dict[tuple[int, int], dict[str, str]] = {}  # (layer, shard) -> labels of the rows metrics
        self._layer_labels: dict[int, dict[str, str]] = {}  # layer -> labels of moe_layer_dispatch_seconds
        self.replicated = any(lay.replicated for lay in layouts)  # any layer: the probes serve them all
        self.failed: set[int] = set()  # shards replicated experts keep off until they answer again
        self._probing: set[int] = set()
        self._lock = threading.Lock()  # `failed` is shared with the probe threads

    def _layout(self, layer: int, device: torch.device) -> _Layout:
        layout = self.every_layer or self.layouts.get(layer)
        if layout is None:
            raise KeyError(f"ShardedExpertBackend: no placement for layer {layer} (have {sorted(self.layouts)})")
        if layout.expert_to_shard.device != device:  # once: the map lives where the gate's ids are
            layout.expert_to_shard = layout.expert_to_shard.to(device)
        return layout

    def __call__(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        return self.start(layer, hidden, weights, ids).result()

    def start(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> InFlight:
        """Send the layer's first round of shard calls and return at once; `.result()` waits for them, retries
        what failed, and gives out [T, D]. In between the shards compute and this thread is free."""
        layout = self._layout(layer, ids.device)
        if layer == self._first_layer and self.shard_rows.clock() >= self._next_report:
            self.report_balancedness()  # as a step starts: the window holds whole steps, every layer in them
        elif self._first_layer is None:
            self._first_layer = layer
        out = torch.zeros_like(hidden)  # [T, D]
        sent_at = time.perf_counter()
        first_round = self._start_round(layer, layout, hidden, flatten(weights, ids))
        return InFlight(self, layer, layout, hidden, out, first_round, sent_at)

    def _complete(self, flight: InFlight) -> Tensor:
        """Wait for the first round, then retry what failed until every row has its partial sums (or give up)."""
        layer, layout, hidden, out = flight.layer, flight.layout, flight.hidden, flight.out
        batches, failed = self._finish_round(layer, *flight.first_round, out)
        deadline, stale_deadline, pause = None, None, self.policy.pause_s
        while failed:
            now = time.monotonic()
            deadline = deadline or now + self.policy.wait_s
            if stale := sorted(s for s, failure in failed.items() if failure.reason == "stale"):
                stale_deadline = stale_deadline or now + self.policy.stale_wait_s
                if now >= stale_deadline:  # this router and those shards are of different app versions
                    raise StalePlacementError(
                        f"expert shard(s) {stale} refused calls of layer {layer} as another app version for "
                        f"{self.policy.stale_wait_s:g} s (a rolling update: "
                        f"{_why({s: failed[s] for s in stale})}); the requests move to another router"
                    )
            if now >= deadline:
                raise EngineUnavailableError(
                    f"expert shard(s) {sorted(failed)} answered no call of layer {layer} for "
                    f"failover.shard_wait_s={self.policy.wait_s:g} s ({_why(failed)}); retry later"
                )
            for shard in failed:
                self._mark_failed(shard)
                self.metrics.record(SHARD_RETRIES, 1, {"model": self.model, "shard": str(shard)})
            pending = _concat([_assignments(batches[shard]) for shard in sorted(failed)])
            if self._movable(layout, pending, failed):
                for shard in failed:
                    self.metrics.record(SHARD_FAILOVERS, 1, {"model": self.model, "shard": str(shard)})
            else:  # every row waits for a shard that just failed: give Serve time to bring a replica up
                time.sleep(min(pause, max(0.0, deadline - now)))
                pause = min(2 * pause, self.policy.max_pause_s)
            batches, failed = self._finish_round(layer, *self._start_round(layer, layout, hidden, pending), out)
        # Answers are read when the layer needs them: router work in between (the shared expert, the other
        # micro-batch) counts here as it does in each shard's moe_dispatch_seconds.
        labels = self._layer_labels.get(layer)
        if labels is None:
            labels = self._layer_labels[layer] = {"model": self.model, "layer": str(layer)}
        self.metrics.record(LAYER_DISPATCH, time.perf_counter() - flight.sent_at, labels)
        return out

    def _start_round(
        self, layer: int, layout: _Layout, hidden: Tensor, assignments: Assignments
    ) -> tuple[list[ShardBatch | None], Collect]:
        """Send one round: a call to each shard `assignments` need. Returns the round's batches and its collect."""
        shard_of = self._route(layout, assignments)  # [A]
        batches = split_assignments(assignments, shard_of, self.num_shards, hidden.shape[0])
        calls = {
            shard: ShardCall(hidden[b.rows], b.local_rows, b.experts, b.weights)  # [R_s, D], [A_s] x3
            for shard, b in enumerate(batches)
            if b is not None
        }
        return batches, self.transport.start(layer, calls)

    def _finish_round(
        self, layer: int, batches: list[ShardBatch | None], collect: Collect, out: Tensor
    ) -> tuple[list[ShardBatch | None], dict[int, ShardFailure]]:
        """Wait for a round's answers and add them into `out` (in shard order). Returns the round's batches and
        the failed shards with why."""
        results = collect()  # {shard: [R_s, D] | ShardFailure}
        failed, rows = {}, {}
        for shard in sorted(results):
            result = results[shard]
            if isinstance(result, ShardFailure):
                failed[shard] = result
            else:
                combine(out, batches[shard].rows, result)  # moves a host result to out's device
                rows[shard] = batches[shard].experts.numel()  # A_s: a shape, no device sync
                if self.failed:
                    with self._lock:
                        self.failed.discard(shard)  # it answers again
        self._count_rows(layer, rows)
        return batches, failed

    def _count_rows(self, layer: int, rows: dict[int, int]) -> None:
        """The rows each shard computed in this round: into moe_shard_call_rows, moe_shard_rows_total, the window."""
        for shard, n in rows.items():
            labels = self._row_labels.get((layer, shard))
            if labels is None:  # made once per (layer, shard): this runs for every shard call
                labels = {"model": self.model, "layer": str(layer), "shard": str(shard)}
                self._row_labels[layer, shard] = labels
            self.metrics.record(SHARD_CALL_ROWS, n, labels)
            self.metrics.record(SHARD_ROWS, n, labels)
        self.shard_rows.add(layer, rows)

    def report_balancedness(self) -> None:
        """Set moe_expert_balancedness_ratio of every layer that ran, from the window as it stands now
        (`__call__` calls it as a step starts, every BALANCE_REPORT_S; the same thread: the window has no lock)."""
        self._next_report = self.shard_rows.clock() + BALANCE_REPORT_S
        labels = {"model": self.model, "replica": self.replica}
        for layer, value in self.shard_rows.balancedness().items():
            self.metrics.record(BALANCEDNESS, value, {**labels, "layer": str(layer)})

    def _route(self, layout: _Layout, assignments: Assignments) -> Tensor:
        """[A] the shard each assignment goes to now: its expert's only holder, or for a replicated expert the
        live holder split_rows gives it (avoiding shards recently failed; one host sync for the counts)."""
        if not layout.replicated:
            return layout.expert_to_shard[assignments.experts]
        with self._lock:
            avoid = set(self.failed)
        counts = torch.bincount(assignments.experts, minlength=layout.placement.num_experts).tolist()  # host sync
        return assignment_shards(assignments.experts, split_rows(counts, layout.holders, avoid))

    def _mark_failed(self, shard: int) -> None:
        """Keep replicated experts off `shard`, and probe it in the background until a replica answers."""
        with self._lock:
            self.failed.add(shard)
            if not self.replicated or shard in self._probing:
                return
            self._probing.add(shard)
        threading.Thread(target=self._probe, args=(shard,), name=f"probe-shard-{shard}", daemon=True).start()

    def _probe(self, shard: int) -> None:
        while True:
            with self._lock:
                if shard not in self.failed:  # a call to it succeeded meanwhile
                    self._probing.discard(shard)
                    return
            if self.transport.probe(shard, timeout_s=self.policy.max_pause_s):
                with self._lock:
                    self.failed.discard(shard)
                    self._probing.discard(shard)
                return
            time.sleep(self.policy.max_pause_s)

    def _movable(self, layout: _Layout, pending: Assignments, failed: dict[int, ShardFailure]) -> bool:
        """Whether some of `pending` can go to a holder other than the shards that just failed."""
        experts = set(pending.experts.unique().tolist())
        return any(set(layout.holders[e]) - set(failed) for e in experts)


@dataclass
class InFlight:
    """A layer's routed experts on their way: the shard calls of its first round are sent (what
    ShardedExpertBackend.start returns). `result()` once: waits, retries what failed, gives out [T, D]."""

    backend: ShardedExpertBackend
    layer: int
    layout: _Layout
    hidden: Tensor  # [T, D]
    out: Tensor  # [T, D] the partial sums are added into
    first_round: tuple[list[ShardBatch | None], Collect]
    sent_at: float  # time.perf_counter() as the first round was sent

    def result(self) -> Tensor:
        return self.backend._complete(self)


def _why(failed: dict[int, ShardFailure]) -> str:
    return "; ".join(f"shard {shard}: {f.reason} {f.detail}".strip() for shard, f in sorted(failed.items()))


def _assignments(batch: ShardBatch) -> Assignments:
    """A shard batch back as batch-level assignments (to send them again)."""
    return Assignments(rows=batch.rows[batch.local_rows], experts=batch.experts, weights=batch.weights)


def _concat(parts: list[Assignments]) -> Assignments:
    return Assignments(*(torch.cat([getattr(p, f) for p in parts]) for f in ("rows", "experts", "weights")))


def run_shard_call(layers: dict[int, LayerExperts], layer: int, call: ShardCall) -> Tensor:
    """What a shard does with a call: its experts of `layer` over the rows it was sent. [R_s, D]"""
    return layers[layer].forward(call.hidden, call.local_rows, call.experts, call.weights)


class InProcessTransport:
    """Calls shards living in this process, one after another: tests and overhead baselines."""

    def __init__(self, shards: dict[int, dict[int, LayerExperts]]):
        self.shards = shards  # shard -> layer -> experts

    def start(self, layer: int, calls: dict[int, ShardCall]) -> Collect:
        results = self.run(layer, calls)  # computed here and now: nothing runs meanwhile
        return lambda: results

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor | ShardFailure]:
        return {shard: run_shard_call(self.shards[shard], layer, call) for shard, call in calls.items()}

    def probe(self, shard: int, timeout_s: float) -> bool:
        return shard in self.shards
