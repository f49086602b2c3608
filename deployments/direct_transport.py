"""ShardTransport over direct TCP streams to the shard replicas (`transport: direct`), Serve handles as fallback.

Why: a call through a Serve DeploymentHandle crosses the engine thread, the handle's router loop, the
replica's event loop and its user-code thread, and costs 8-15 ms here for one row; over a TCP stream to the
replica the same call costs ~1 ms (benchmarks/dispatch.py measures both; a bare socket round trip between two
processes is ~0.05 ms; the rest, framing and the shard's threads on shared cores, is not broken down). So each
ExpertShard replica also answers calls on a port of its own (serving/experts/shard_server.py) and the router
sends them there, while Serve keeps doing what it is good at: starting, restarting, scaling and replacing replicas.

Which replicas exist: a background thread asks each shard's replicas for their endpoint (host, port, replica,
version) with Serve's `broadcast`, every `refresh_s` and at once after a call to one failed. Serve's replica
set is the truth; a replica that died is not in the next answer, one that autoscaling or a rebalance added is.
A call goes to a replica of the version this router sends (round-robin over them), so a rolling update never
computes rows with another placement's experts. A shard none of whose replicas is known yet (just started, or
every known one failed) is called through its Serve handle, exactly as with `transport: handles`.

Rows on a channel (`direct_rows`, serving/experts/row_channel.py): given a `row_device`, a stream to a
replica that hosts a channel store also joins a two-rank group with it, and the rows go device to device
(NCCL between GPUs, gloo on CPUs) while the frames on the stream only describe them. `auto` picks that
between CUDA devices, where it saves a host round trip each way per call; on CPUs the frame is cheaper.

The guarantees of the handle transport hold, with the same reasons (serving/experts/sharded.py retries):
- a replica that dies closes its streams (the kernel does it for a killed process): the call is
  ShardFailure("gone") at once, that replica is dropped, and the retry goes to another one or the handle;
- a call unanswered after `hedge_after_s` is sent to another replica of the shard, first answer wins;
- one unanswered within `call_timeout_s` is ShardFailure("timeout"), and its stream is closed (a hung node);
- a replica of another app version answers "stale": ShardFailure("stale");
- an exception the shard's own code raised fails the step (ShardCallError), as with handles.
"""

from __future__ import annotations

import functools
import itertools
import logging
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from ray.serve.handle import DeploymentHandle
from torch import Tensor

from deployments.transport import next_deadline, overdue
from serving.experts.row_channel import ROUTER_RANK, ChannelStore, RowChannel
from serving.experts.sharded import Collect, ShardCall, ShardFailure, ShardTransport
from serving.experts.wire import WireError, encode, encode_call, read_frame
from serving.metrics import (
    DISPATCH,
    SHARD_CALLS,
    SHARD_COMPUTE,
    SHARD_HEDGES,
    SHARD_HOP,
    SHARD_TIMEOUTS,
    MetricsSink,
    NullSink,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
DISCOVERY_TIMEOUT_S = 2.0  # one shard's broadcast, all its replicas together


class ShardCallError(RuntimeError):
    """The shard's own code raised on a call (not a transport failure): the step fails, as with handles."""


@dataclass(frozen=True)
class Endpoint:
    """Where one shard replica answers direct calls (what ExpertShard.direct_endpoint returns)."""

    replica: str
    host: str
    port: int
    version: str | None = None
    store_port: int | None = None  # its row channels' store (None: rows only in frames)


Discover = Callable[[int], list[Endpoint]]  # shard id -> the endpoints of its replicas up now


def serve_discovery(handles: list[DeploymentHandle]) -> Discover:
    """Endpoints from Serve: every running replica of the shard answers `direct_endpoint` (broadcast)."""

    def discover(shard: int) -> list[Endpoint]:
        response = handles[shard].broadcast("direct_endpoint")
        answers = response.results(timeout_s=DISCOVERY_TIMEOUT_S, return_exceptions=True)
        return [Endpoint(**a) for a in answers if isinstance(a, dict)]

    return discover


class _Conn:
    """One open stream to one replica, and its row channel when rows go device to device."""

    def __init__(self, shard: int, endpoint: Endpoint, row_device: torch.device | None, channel_timeout_s: float):
        self.shard, self.endpoint = shard, endpoint
        self.sock = socket.create_connection((endpoint.host, endpoint.port), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.channel: RowChannel | None = None
        if row_device is not None and endpoint.store_port is not None:
            try:
                key = uuid.uuid4().hex
                self.sock.sendall(encode({"hello": key}, []))  # the replica joins the group under this key
                store = ChannelStore.client_of(endpoint.host, endpoint.store_port, CONNECT_TIMEOUT_S)
                self.channel = RowChannel.open(store, key, ROUTER_RANK, row_device, channel_timeout_s)
            except Exception:
                self.sock.close()
                raise

    def close(self) -> None:
        self.sock.close()
        if self.channel is not None:
            self.channel.close()


@dataclass
class _Call:
    shard: int
    call: ShardCall  # on the host, ready to send again
    sent_at: float
    attempts: dict = field(default_factory=dict)  # request id -> _Conn it went on
    tried: set = field(default_factory=set)  # replicas tried (a hedge goes elsewhere)
    hedged: bool = False
    sends: dict = field(default_factory=dict)  # request id -> its row channel sends, kept until answered


class DirectTransport:
    def __init__(
        self,
        fallback: ShardTransport,
        discover: Discover,
        num_shards: int,
        metrics: MetricsSink | None = None,
        model: str = "model",
        call_timeout_s: float = 5.0,
        hedge_after_s: float | None = None,
        versions: list[str] | None = None,
        refresh_s: float = 1.0,
        row_device: torch.device | None = None,
    ):
        """fallback: the transport for shards with no known replica (HandleTransport on the same shards).
        row_device: send rows on row channels from this device to replicas that take them (None: in frames)."""
        self.fallback, self.discover, self.num_shards = fallback, discover, num_shards
        self.row_device = row_device
        self.metrics, self.model = metrics or NullSink(), model
        self.call_timeout_s, self.hedge_after_s = call_timeout_s, hedge_after_s
        self.versions, self.refresh_s = versions, refresh_s
        self._endpoints: dict[int, list[Endpoint]] = {}  # written by the discovery thread, read by run()
        self._conns: dict[str, _Conn] = {}  # replica -> its stream (engine thread only)
        self._turn = {s: itertools.count() for s in range(num_shards)}
        self._ids = itertools.count()
        self._wake, self._stopped = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._discover_loop, name="shard-discovery", daemon=True)
        self._thread.start()

    # ---- which replicas exist (background thread) ----

    def _discover_loop(self) -> None:
        while not self._stopped.is_set():
            for shard in range(self.num_shards):
                try:
                    self._endpoints[shard] = self.discover(shard)
                except Exception as e:  # Serve busy or the shard has no replica: keep what we knew
                    log.debug("shard %d: endpoint discovery failed (%s)", shard, e)
            self._wake.wait(self.refresh_s)
            self._wake.clear()

    def endpoints(self, shard: int) -> list[Endpoint]:
        """The replicas of `shard` a call may go to now (of this router's version)."""
        want = None if self.versions is None else self.versions[shard]
        return [e for e in self._endpoints.get(shard, []) if want is None or e.version == want]

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # ---- calls (engine thread) ----

    def run(self, layer: int, calls: dict[int, ShardCall]) -> dict[int, Tensor | ShardFailure]:
        return self.start(layer, calls)()

    def start(self, layer: int, calls: dict[int, ShardCall]) -> Collect:
        """Send every call (the shards start computing); the returned collect waits for their answers."""
        # Rows in frames: device -> host before sending, one copy per shard call (the shard moves them to its
        # device on arrival). On row channels they stay on row_device. Handles pickle host tensors.
        now = time.perf_counter()
        open_calls: dict[int, _Call] = {}
        by_handle: dict[int, ShardCall] = {}
        for shard, call in calls.items():
            c = _Call(shard, call.to(self.row_device or "cpu"), now)
            if self._send(c, layer):
                open_calls[shard] = c
            else:
                by_handle[shard] = c.call.to("cpu")
        # The handle calls go out too before anything is awaited; the direct answers wait in the socket buffers.
        by_handle_collect = self.fallback.start(layer, by_handle) if by_handle else dict
        return functools.partial(self._collect_all, layer, open_calls, by_handle_collect)

    def _collect_all(self, layer: int, open_calls: dict[int, _Call], by_handle_collect: Collect) -> dict:
        results = by_handle_collect()
        while open_calls.keys() - results.keys():
            self._wait_and_read(open_calls, results)
            self._hedge_or_expire(layer, open_calls, results)
        return results

    def probe(self, shard: int, timeout_s: float) -> bool:
        self._wake.set()  # a shard failed: learn its replicas again now, not in refresh_s
        return self.fallback.probe(shard, timeout_s)

    def _send(self, c: _Call, layer: int) -> bool:
        """Send `c` to a replica of its shard not tried yet; False when none is known or reachable."""
        candidates = [e for e in self.endpoints(c.shard) if e.replica not in c.tried]
        start = next(self._turn[c.shard])
        version = None if self.versions is None else self.versions[c.shard]
        for i in range(len(candidates)):
            endpoint = candidates[(start + i) % len(candidates)]
            c.tried.add(endpoint.replica)
            request_id = next(self._ids)
            try:
                conn = self._conn(c.shard, endpoint)
                conn.sock.settimeout(self.call_timeout_s)  # a read left its own, shorter timeout on the socket
                if conn.channel is None:  # no-op copies where the rows are on the host already
                    conn.sock.sendall(encode_call(request_id, layer, version, c.call.to("cpu")))
                else:
                    conn.sock.sendall(encode_call(request_id, layer, version, c.call, on_channel=True))
                    c.sends[request_id] = conn.channel.send(c.call.parts())
            except (OSError, RuntimeError) as e:  # RuntimeError: a row channel that would not open or broke
                self._drop(c.shard, endpoint.replica, f"send failed: {e}")
                continue
            c.attempts[request_id] = conn
            kind = "direct" if conn.channel is None else "channel"
            self.metrics.record(SHARD_CALLS, 1, {"model": self.model, "shard": str(c.shard), "transport": kind})
            return True
        return False

    def _conn(self, shard: int, endpoint: Endpoint) -> _Conn:
        conn = self._conns.get(endpoint.replica)
        if conn is None or conn.endpoint != endpoint:
            if conn is not None:
                conn.close()
            conn = self._conns[endpoint.replica] = _Conn(shard, endpoint, self.row_device, self.call_timeout_s)
        return conn

    def _drop(self, shard: int, replica: str, why: str) -> None:
        """Forget a replica's stream and endpoint until discovery lists it again."""
        conn = self._conns.pop(replica, None)
        if conn is not None:
            conn.close()
        self._endpoints[shard] = [e for e in self._endpoints.get(shard, []) if e.replica != replica]
        log.info("direct transport: shard %d replica %s dropped (%s)", shard, replica, why)
        self._wake.set()

    def _wait_and_read(self, open_calls: dict[int, _Call], results: dict) -> None:
        """Wait until an awaited stream has bytes or the next deadline, and read one answer from each ready one."""
        with selectors.DefaultSelector() as selector:  # per wait: the streams change as replicas fail
            for c in open_calls.values():
                if c.shard not in results:
                    for conn in set(c.attempts.values()):
                        selector.register(conn.sock, selectors.EVENT_READ, conn)
            timeout = next_deadline(open_calls, results, self.call_timeout_s, self.hedge_after_s) - time.perf_counter()
            ready = [key.data for key, _ in selector.select(timeout=max(0.0, timeout))]
        for conn in ready:
            self._read(conn, open_calls, results)

    def _read(self, conn: _Conn, open_calls: dict[int, _Call], results: dict) -> None:
        c = next((c for c in open_calls.values() if any(a is conn for a in c.attempts.values())), None)
        if c is None or conn.sock.fileno() < 0:  # failed by an earlier read of this wait
            return
        try:
            conn.sock.settimeout(max(c.sent_at + self.call_timeout_s - time.perf_counter(), 0.001))
            frame = read_frame(conn.sock, conn.channel)
        except (OSError, WireError) as e:  # the replica died, or hung mid-answer past the call's deadline
            reason = "timeout" if isinstance(e, TimeoutError) else "gone"
            self._fail_stream(conn, open_calls, results, reason, f"replica {conn.endpoint.replica}: {e}")
            return
        request_id = int(frame.header["id"])
        owner = next((c for c in open_calls.values() if request_id in c.attempts), None)
        if owner is None or owner.shard in results:  # a hedge that lost, answering late: not needed
            return
        del owner.attempts[request_id]
        for work, _ in owner.sends.pop(request_id, []):  # answered, so its rows arrived: this returns at once
            work.wait()
        status = frame.header.get("status")
        if status == "ok":
            results[owner.shard] = frame.tensors[0]
            labels = {"model": self.model, "shard": str(owner.shard)}
            round_trip = time.perf_counter() - owner.sent_at  # from the first attempt: a hedge's wait counts
            self.metrics.record(DISPATCH, round_trip, labels)
            if (compute_s := frame.header.get("compute_s")) is not None:
                self.metrics.record(SHARD_COMPUTE, compute_s, labels)
                self.metrics.record(SHARD_HOP, max(round_trip - compute_s, 0.0), labels)
        elif status == "stale":
            if not owner.attempts:
                results[owner.shard] = ShardFailure("stale", frame.header.get("detail", ""))
        else:
            detail = frame.header.get("detail")
            raise ShardCallError(f"ExpertShard-{owner.shard} replica {conn.endpoint.replica}: {detail}")

    def _fail_stream(self, conn: _Conn, open_calls: dict, results: dict, reason: str, detail: str) -> None:
        """Every call waiting on `conn` loses that attempt; one with no other attempt is a ShardFailure."""
        self._drop(conn.shard, conn.endpoint.replica, detail)
        for c in open_calls.values():
            for request_id in [r for r, a in c.attempts.items() if a is conn]:
                del c.attempts[request_id]
            if c.shard not in results and not c.attempts:
                results[c.shard] = ShardFailure(reason, detail)

    def _hedge_or_expire(self, layer: int, open_calls: dict[int, _Call], results: dict) -> None:
        now = time.perf_counter()
        for shard, c in open_calls.items():
            if shard in results:
                continue
            labels = {"model": self.model, "shard": str(shard)}
            due = overdue(c, now, self.call_timeout_s, self.hedge_after_s)
            if due == "timeout":
                self.metrics.record(SHARD_TIMEOUTS, 1, labels)
                for conn in list(c.attempts.values()):  # hung: a late answer must not wait in the stream
                    self._drop(shard, conn.endpoint.replica, f"no answer in {self.call_timeout_s:g} s")
                c.attempts.clear()
                results[shard] = ShardFailure("timeout", f"no answer in {self.call_timeout_s:g} s")
            elif due == "hedge":
                c.hedged = True
                if self._send(c, layer):  # another replica of the shard, if one is known
                    self.metrics.record(SHARD_HEDGES, 1, labels)
