"""The shard side of the direct transport: a TCP server that answers shard calls (serving/experts/wire.py).

    >>> server = ShardServer(shard.compute, host="10.0.0.5")   # in an ExpertShard replica
    >>> server.port                                          # published to routers (deployments/direct_transport.py)
    41237
    >>> server.close()                                       # at replica shutdown: routers see the streams end

One thread accepts connections and one thread serves each of them, a call at a time in the order it was
sent (a router has at most one call in flight per connection, so that is no wait). An answer carries the
seconds the call took here (`compute_s`: the handler, and on the frame path the copy to the host), which the
router subtracts from its round trip to see the hop alone. The handler is the
replica's own `compute(layer, call, version)`: a StalePlacementError answers "stale", any other exception
"error" with its message, and the connection stays open. Bytes that are not a frame close that connection only.

Rows on a channel (`channel_device` set: `direct_rows: collective`): the server also hosts a ChannelStore,
published as `store_port`. A router that wants a channel opens its stream with a hello frame naming a key,
and both ends join a two-rank group under it (serving/experts/row_channel.py); from then on a call's
tensors arrive on the channel onto `channel_device` and its answer goes back the same way, device to
device. Without a hello, the stream carries its rows in the frames, as host bytes.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable

import torch

from serving.errors import StalePlacementError
from serving.experts.row_channel import SHARD_RANK, ChannelStore, RowChannel
from serving.experts.sharded import ShardCall
from serving.experts.wire import WireError, decode_call, encode_answer, read_frame

log = logging.getLogger(__name__)

Handler = Callable[[int, ShardCall, "str | None"], torch.Tensor]  # [R_s, D] on the replica's device


class ShardServer:
    def __init__(self, handler: Handler, host: str, port: int = 0, channel_device: torch.device | None = None):
        """Listen on host:port (port 0: one the OS picks) and serve calls with `handler` in background threads.
        channel_device: also accept row channels, whose tensors land on this device (None: frames only)."""
        self.handler, self.channel_device = handler, channel_device
        self._listener = socket.create_server((host, port))
        self.host, self.port = host, self._listener.getsockname()[1]
        self.channels = ChannelStore(host) if channel_device is not None else None
        self.store_port = self.channels.port if self.channels else None
        self.channels_opened = 0  # row channels routers have opened here, ever
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"shard-server:{self.port}", daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame is one write; send it now
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"shard-conn:{self.port}", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        channel = None
        try:
            frame = read_frame(conn)
            if "hello" in frame.header:  # the router asks for a row channel before its first call
                channel = self._open_channel(str(frame.header["hello"]))
                frame = read_frame(conn, channel)
            while True:
                request_id, layer, version, call = decode_call(frame)
                on_channel, works = None, []  # on_channel: what the answer's frame says follows on the channel
                try:
                    started = time.perf_counter()
                    out = self.handler(layer, call, version)  # [R_s, D] on this replica's device
                    if channel is None:  # device -> host: the frame carries host bytes
                        out = out.cpu()
                        answer = encode_answer(request_id, "ok", out, compute_s=time.perf_counter() - started)
                    else:  # (on CUDA the kernels may still run: compute_s is then their launch)
                        compute_s = time.perf_counter() - started
                        answer = encode_answer(request_id, "ok", out, on_channel=True, compute_s=compute_s)
                        on_channel = out
                except StalePlacementError as e:
                    answer = encode_answer(request_id, "stale", detail=str(e))
                except Exception as e:  # the shard's own code: the router fails the step with this message
                    log.exception("shard call failed")
                    answer = encode_answer(request_id, "error", detail=f"{type(e).__name__}: {e}")
                conn.sendall(answer)
                if on_channel is not None:
                    works = channel.send([on_channel])  # the frame above told the router its shape
                frame = read_frame(conn, channel)  # the router has the answer before it sends again...
                for work, _ in works:  # ...so this send is done: wait frees it (at once)
                    work.wait()
        except WireError:  # the router went away (or closed this stream after a timeout)
            pass
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as e:
            if not self._closed:
                log.warning("shard server: closing a connection that sent a bad frame or broke (%s)", e)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()
            if channel is not None:
                channel.close()

    def _open_channel(self, key: str) -> RowChannel:
        if self.channels is None:
            raise ValueError("a row channel was asked for, and this replica serves rows in frames only")
        channel = RowChannel.open(self.channels.store, key, SHARD_RANK, self.channel_device)
        self.channels_opened += 1
        return channel

    def close(self) -> None:
        """Stop accepting and end every open stream (a router's call on one fails over at once); the channel
        store stops once the streams' channels, which hold it, are gone."""
        with self._lock:
            self._closed = True
            conns, self._open = list(self._open), set()
        self.channels = None
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
