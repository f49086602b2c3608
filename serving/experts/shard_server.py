"""The shard side of the direct transport: a TCP server that answers shard calls (serving/experts/wire.py).

    >>> server = ShardServer(shard.run, host="10.0.0.5")   # in an ExpertShard replica
    >>> server.port                                          # published to routers (deployments/direct_transport.py)
    41237
    >>> server.close()                                       # at replica shutdown: routers see the streams end

One thread accepts connections and one thread serves each of them, a call at a time in the order it was
sent (a router has at most one call in flight per connection, so that is no wait). The handler is the
replica's own `run(layer, call, version)`, the same method Serve handles call: a StalePlacementError
answers "stale", any other exception "error" with its message, and the connection stays open. Bytes that
are not a frame close that connection only.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable

from torch import Tensor

from serving.errors import StalePlacementError
from serving.experts.sharded import ShardCall
from serving.experts.wire import WireError, decode_call, encode_answer, read_frame

log = logging.getLogger(__name__)

Handler = Callable[[int, ShardCall, "str | None"], Tensor]


class ShardServer:
    def __init__(self, handler: Handler, host: str, port: int = 0):
        """Listen on host:port (port 0: one the OS picks) and serve calls with `handler` in background threads."""
        self.handler = handler
        self._listener = socket.create_server((host, port))
        self.host, self.port = host, self._listener.getsockname()[1]
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
        try:
            while True:
                request_id, layer, version, call = decode_call(read_frame(conn))
                try:
                    answer = encode_answer(request_id, "ok", self.handler(layer, call, version))
                except StalePlacementError as e:
                    answer = encode_answer(request_id, "stale", detail=str(e))
                except Exception as e:  # the shard's own code: the router fails the step with this message
                    log.exception("shard call failed")
                    answer = encode_answer(request_id, "error", detail=f"{type(e).__name__}: {e}")
                conn.sendall(answer)
        except WireError:  # the router went away (or closed this stream after a timeout)
            pass
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            if not self._closed:
                log.warning("shard server: closing a connection that sent a bad frame or broke (%s)", e)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop accepting and end every open stream (a router's call on one fails over at once)."""
        with self._lock:
            self._closed = True
            conns, self._open = list(self._open), set()
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
