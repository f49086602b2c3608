"""A tiny OpenAI-compatible streaming server (stdlib only, 127.0.0.1) for load-test tests without Ray.

Streams `max_tokens` one-word content chunks `token_delay_s` apart, preceded (chat) by a role-only
chunk and an empty chunk, which must not count as the first token, and followed by a usage chunk and
[DONE]. Bodies with "retrieval" get a 400, as the real server answers today.

    with FakeOpenAI(token_delay_s=0.005) as server:
        httpx.get(f"{server.url}/v1/models")
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked transfer encoding, like uvicorn

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        if "retrieval" in body:
            return self._json(400, {"error": {"message": "retrieval: extra fields not permitted"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = body["max_tokens"]
        if chat:
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            self._event({"choices": [{"index": 0, "delta": {}}]})
        for i in range(n):
            time.sleep(self.server.token_delay_s)
            piece = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
            self._event({"choices": [{"index": 0, **piece, "finish_reason": "length" if i == n - 1 else None}]})
        self._event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, event: dict) -> None:
        self._chunk(f"data: {json.dumps(event)}\n\n".encode())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class FakeOpenAI:
    """The server in a background thread; a context manager that yields itself (`.url`)."""

    def __init__(self, token_delay_s: float = 0.005) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.token_delay_s = token_delay_s
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
