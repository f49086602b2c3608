"""An ASGI app on uvicorn at http://127.0.0.1:<free port>, in a thread of this process: for clients that need
a real socket (schemathesis, lm-evaluation-harness).

>>> with live_server(app) as url:
...     httpx.get(f"{url}/healthz")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from deployments.local_cluster import free_port


@contextmanager
def live_server(app, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started serving (see its log above)"
        assert time.monotonic() < deadline, f"uvicorn did not start within {start_timeout_s} s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
