"""The OpenAPI document (/openapi.json) as the server really answers: every error a route gives, in OpenAI's
error body, and none it does not give.

>>> @app.post("/v1/completions", responses=errors(400, 404, 429, 503))   # what the route itself raises
>>> document_api(app, auth=True, model_name="demo", max_model_len=2048)   # then what the app adds

FastAPI documents a 422 on every route with parameters, but this server answers validation errors with
400 (serving/api/errors.py), so the 422 and its schemas go. The Guard in front of every route adds 401
(when keys are configured; every route but OPEN_PATHS, with the bearer scheme declared), 403 (ADMIN_ROUTES)
and 413 (routes with a body). 429 and 503 carry Retry-After. What only the app knows goes into the request
schemas: the one model it serves, and that max_tokens cannot exceed its context. What no schema can say
(a prompt's length in tokens, token ids past the model's vocabulary, two fields that must agree) stays
in the 400s, and tests/serving/api/schemathesis-baseline.json lists each with its reason.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serving.api.errors import ADMIN_ROUTES, OPEN_PATHS, RETRY_AFTER_SECONDS
from serving.api.requests import ErrorResponse

WHEN = {
    400: "Invalid JSON, field or prompt (the message names it; `param` is the first bad field).",
    401: "Missing or invalid API key (`Authorization: Bearer <key>`).",
    403: "An API key on an admin route (writes to the document store, /v1/admin/*): it needs an admin key.",
    404: "Unknown model or collection, or retrieval is off on this server.",
    409: "The request conflicts with what the server is doing now (the message says what; retry later).",
    413: "The body is larger than the server's max_body_bytes.",
    429: "The engine's queue is full; retry after Retry-After seconds.",
    503: "The engine is shutting down, or the vector store is unreachable; retry after Retry-After seconds.",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": f"Seconds to wait before retrying ({RETRY_AFTER_SECONDS}).",
        "schema": {"type": "integer", "minimum": 0},
    }
}
_UNUSED = ("HTTPValidationError", "ValidationError")  # the 422 body's schemas


def errors(*statuses: int, describe: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for the error statuses a route raises itself, each with OpenAI's error body;
    `describe` says when this route gives a status where WHEN's general words would not."""
    return {status: _error(status, (describe or {}).get(status, WHEN[status])) for status in statuses}


def _error(status: int, description: str) -> dict[str, Any]:
    response: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response


def document_api(
    app: FastAPI, *, auth: bool, model_name: str, max_model_len: int, streams: dict[str, type[BaseModel]]
) -> None:
    """Make `app.openapi()` add the Guard's errors to every operation, drop FastAPI's unused 422, put the
    served model and context limit into the request schemas, and document the server-sent events of the
    `streams` routes (path -> the chunk model each `data:` event holds)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        body = {"application/json": {"schema": ref}}
        for path, operations in doc["paths"].items():
            for method, operation in operations.items():
                responses = operation["responses"]
                responses.pop("422", None)
                added = []
                if "requestBody" in operation:
                    added.append(413)
                if auth and path not in OPEN_PATHS:
                    added.append(401)
                    operation["security"] = [{"bearer": []}]
                    if (method.upper(), path) in ADMIN_ROUTES:
                        added.append(403)
                for status in added:
                    responses.setdefault(str(status), {"description": WHEN[status], "content": body})
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in _UNUSED:
            schemas.pop(name, None)
        for path, chunk in streams.items():
            _document_events(doc["paths"][path]["post"]["responses"]["200"], chunk, schemas)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            if name in schemas:
                _limit_generation(schemas[name]["properties"], model_name, max_model_len)
        if auth:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _limit_generation(properties: dict[str, Any], model_name: str, max_model_len: int) -> None:
    """Other model names get 404; a prompt has at least one token, so more than max_model_len - 1 new tokens
    never fit."""
    properties["model"]["enum"] = [model_name]
    for name in ("max_tokens", "max_completion_tokens"):
        for alternative in properties.get(name, {}).get("anyOf", []):
            if alternative.get("type") == "integer":
                alternative["maximum"] = max_model_len - 1


def _document_events(ok: dict[str, Any], chunk: type[BaseModel], schemas: dict[str, Any]) -> None:
    """With stream=true a 200 is server-sent events: each `data:` is a chunk as JSON, an error as JSON (a
    failure after the stream began), or the last one, [DONE] (serving/api/stream.py)."""
    _, defs = models_json_schema([(chunk, "serialization")], ref_template="#/components/schemas/{model}")
    for name, schema in defs["$defs"].items():
        schemas.setdefault(name, schema)
    payloads = [{"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"contentMediaType": "application/json", "contentSchema": {"anyOf": payloads}},
                ]
            }
        },
    }
    ok["description"] += "; with stream=true, server-sent events: `data: <chunk JSON>` ..., then `data: [DONE]`"
    ok["content"]["text/event-stream"] = {"schema": event}
