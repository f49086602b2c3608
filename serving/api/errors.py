"""Errors of the HTTP API in OpenAI's JSON, and the guard in front of every route (API key, body size, 500s).

>>> app.add_middleware(Guard, api_keys=frozenset({"sk-1"}), max_body_bytes=1 << 20)
>>> install_error_handlers(app)

Every failure answers {"error": {"message", "type", "param", "code"}}; bad input is a 4xx naming the
field, never a 500, and the app keeps serving.

| status | when | type / code |
|---|---|---|
| 400 | invalid JSON or field, engine RequestError (prompt too long, ...) | invalid_request_error |
| 401 | keys configured, `Authorization: Bearer <key>` missing or wrong | invalid_request_error / invalid_api_key |
| 403 | an admin route (ADMIN_ROUTES) with a key that is not an admin key | invalid_request_error / admin_key_required |
| 404 | unknown route, model or collection; retrieval off; expert load with engine vllm | model_not_found, ... |
| 405 | wrong method for a route | invalid_request_error |
| 409 | rebalance during an update, or with too little load measured (RebalanceConflictError) | rebalance_conflict |
| 413 | body over max_body_bytes (Content-Length or bytes actually sent) | invalid_request_error / request_too_large |
| 429 | engine queue full (EngineOverloadedError); has Retry-After | rate_limit_error / engine_overloaded |
| 503 | engine shut down or shutting down (EngineStoppedError); has Retry-After | server_error / engine_stopped |
| 503 | no router up, or a shard down past its bound (EngineUnavailableError); has Retry-After | engine_unavailable |
| 503 | vector store unreachable or slow (RetrievalUnavailableError); has Retry-After | retrieval_unavailable |
| 500 | a bug: logged, generic message | server_error |
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.requests import ErrorInfo, ErrorResponse
from serving.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    EngineUnavailableError,
    RebalanceConflictError,
    RequestError,
    RetrievalUnavailableError,
    UnknownCollectionError,
)
from serving.expert_load import ROUTE as EXPERT_LOAD_ROUTE
from serving.rebalancing import ROUTE as REBALANCE_ROUTE

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1  # what a 429 asks the client to wait
OPEN_PATHS = frozenset({"/healthz", "/health"})  # answered without an API key (liveness probes)
# need an admin key: the writes to the document store, and the admin routes (serving/api/admin.py)
ADMIN_ROUTES = frozenset(
    {("POST", "/v1/documents"), ("DELETE", "/v1/documents"), ("GET", EXPERT_LOAD_ROUTE), ("POST", REBALANCE_ROUTE)}
)
INVALID = "invalid_request_error"


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields; raise it from a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.info).model_dump(), self.status, headers=self.headers)


def as_api_error(exc: Exception) -> APIError:
    """The APIError for an exception from a route or the engine; anything unexpected becomes a generic 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, str(exc))
    if isinstance(exc, EngineOverloadedError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(429, str(exc), type="rate_limit_error", code="engine_overloaded", headers=headers)
    if isinstance(exc, EngineStoppedError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(503, str(exc), type="server_error", code="engine_stopped", headers=headers)
    if isinstance(exc, EngineUnavailableError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(503, str(exc), type="server_error", code="engine_unavailable", headers=headers)
    if isinstance(exc, RetrievalUnavailableError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(503, str(exc), type="server_error", code="retrieval_unavailable", headers=headers)
    if isinstance(exc, UnknownCollectionError):
        return APIError(404, str(exc), param="collection", code="collection_not_found")
    if isinstance(exc, RebalanceConflictError):
        return APIError(409, str(exc), code="rebalance_conflict")
    return APIError(500, "internal server error; the request was not completed", type="server_error")


def _field_path(loc: Sequence[str | int]) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validation_error(errors: Sequence[Any]) -> APIError:
    """A 400 listing each invalid field (`param` is the first one)."""
    parts, params = [], []
    for e in errors:
        loc = list(e["loc"][1:] if e["loc"] and e["loc"][0] == "body" else e["loc"])
        field = _field_path(loc)
        if e["type"] == "json_invalid":
            return APIError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}")
        if e["type"] == "extra_forbidden":
            message = "unknown or unsupported field; remove it (GET /docs lists the fields this server accepts)"
        elif e["type"] == "missing":
            message = "missing; send a JSON object" if not field else "required field is missing"
        else:
            message = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{field or 'request body'}: {message}")
        params.append(field or None)
    return APIError(400, "; ".join(parts), param=params[0] if params else None)


def install_error_handlers(app: FastAPI) -> None:
    """Answer FastAPI's own errors (422, 404, 405) and the engine's in OpenAI's error JSON."""

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type and await request.body():  # FastAPI parses only declared JSON (CSRF)
            got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
            message = f"request body: send JSON with 'Content-Type: application/json' (got {got})"
            return APIError(400, message).response()
        return validation_error(exc.errors()).response()

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"no route {where}; this server has {', '.join(_paths(request))}"
        elif exc.status_code == 405:
            allowed = _allowed_methods(request)  # Starlette's Allow names only the first route on the path
            message = f"method {request.method} is not allowed on {request.url.path}; use {allowed}"
            return APIError(405, message, headers={**(exc.headers or {}), "Allow": allowed}).response()
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, headers=exc.headers).response()

    async def on_engine(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    for cls in (
        APIError,
        RequestError,
        EngineOverloadedError,
        EngineStoppedError,
        EngineUnavailableError,
        RebalanceConflictError,
        RetrievalUnavailableError,
        UnknownCollectionError,
    ):
        app.add_exception_handler(cls, on_engine)


class Guard:
    """ASGI middleware for HTTP requests: checks the API key (except on OPEN_PATHS), reads the body up to
    `max_body_bytes` (413 past it, whatever Content-Length said), and turns an unhandled exception into a
    logged 500 in OpenAI's JSON, so a bug in one request never takes the server down.

    Authentication is on when any key is configured. `admin_keys` open every route; `api_keys` open
    every route but ADMIN_ROUTES (the writes to the document store, /v1/admin/*), which answer 403 to them."""

    def __init__(
        self, app: ASGIApp, api_keys: frozenset[str], max_body_bytes: int, admin_keys: frozenset[str] = frozenset()
    ):
        self.app, self.max_body_bytes = app, max_body_bytes
        self._admin = [k.encode() for k in sorted(admin_keys)]
        self._keys = [k.encode() for k in sorted(api_keys)] + self._admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_key(scope)
            body = await self._read_body(scope, receive)
        except APIError as exc:
            await exc.response()(scope, receive, send)
            return
        if body is None:
            return  # the client left while sending
        started = False

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()  # after the body: disconnect notices
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracking_send)
        except Exception as exc:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await as_api_error(exc).response()(scope, receive, send)

    def _check_key(self, scope: Scope) -> None:
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if not self._keys or path in OPEN_PATHS:
            return
        scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise self._unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        sent = key.strip().encode()
        if not _matches(sent, self._keys):
            raise self._unauthorized("invalid API key")
        if (scope["method"], path) in ADMIN_ROUTES and not _matches(sent, self._admin):
            raise APIError(
                403, f"{scope['method']} {path} is an admin route (writes to the document store, /v1/admin/*) and "
                "needs an admin key (AppConfig admin_keys_env / admin_keys_file); this key is an API key",
                code="admin_key_required",
            )  # fmt: skip

    @staticmethod
    def _unauthorized(message: str) -> APIError:
        return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        too_large = APIError(
            413, f"request body is larger than {self.max_body_bytes} bytes (max_body_bytes)", code="request_too_large"
        )
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, f"Content-Length: {length!r} is not a byte count")
            if int(length) > self.max_body_bytes:
                raise too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _matches(sent: bytes, keys: list[bytes]) -> bool:
    """Whether `sent` is one of `keys`, in time that does not depend on which one (or how much of one) matched."""
    return any([hmac.compare_digest(sent, k) for k in keys])  # a list: compare with every key


def _allowed_methods(request: Request) -> str:
    """Every method some route takes on this request's path (GET /v1/documents: "DELETE, POST")."""
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _paths(request: Request) -> list[str]:
    """The app's routes, for a 404's message."""
    return sorted({route.path for route in request.app.routes if route.path.startswith(("/v1", "/healthz"))})
