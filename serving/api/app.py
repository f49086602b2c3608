"""The OpenAI-compatible HTTP API as a FastAPI app around any engine client (no Ray here).

>>> engine = AsyncEngine(lambda: LLMEngine.from_pretrained("demo/"))
>>> app = build_api(engine, engine.engine.tokenizer, "demo", max_model_len=engine.engine.max_model_len,
...                 api_keys=load_api_keys())
>>> uvicorn.run(app)            # or, in deployments/: @serve.ingress(app)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /healthz (no API key; also
as GET /health, vLLM's name), with `retrieval` the RAG routes of serving/api/retrieval.py (/v1/retrieve,
/v1/documents, /v1/collections), and the admin route GET /v1/admin/expert-load (serving/api/admin.py).
/v1/completions encodes a string prompt with `tokenizer.encode` (no special tokens, as `moe-serve generate
--prompt`); /v1/chat/completions renders the messages with the checkpoint's chat template. A request with a
`retrieval` field gets the retrieved passages fused into its prompt by serving/retrieval/rag.py (a system
message for chat, a prefix for a raw prompt) before it is encoded.
Streams are server-sent events (`data: {json}` ... `data: [DONE]`); a failure after the stream began
is sent as a `data: {"error": {...}}` event before [DONE]. A client that disconnects, streaming or
not, aborts its engine request. Request fields and errors: `serving/api/requests.py`, `serving/api/errors.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.api.admin import install_admin_routes
from serving.api.errors import APIError, Guard, install_error_handlers
from serving.api.logprobs import TokenTexts, chat_logprobs, completion_logprobs, echo_logprobs, prompt_logprobs
from serving.api.openapi import document_api, errors
from serving.api.requests import ChatCompletionRequest, CompletionRequest
from serving.api.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    CompletionChunk,
    ModelCard,
    ModelList,
    Usage,
)
from serving.api.retrieval import Retrieval, install_retrieval_routes, retrieval_off
from serving.api.retrieval_bodies import RetrievalInfo
from serving.api.stream import Started, chat_events, completion_events
from serving.engine_client import EngineClient, RequestOutput, SamplingParams, TokenLogprobs
from serving.errors import ConfigError, RequestError
from serving.expert_load import ExpertLoadSource
from serving.rebalancing import RebalanceTarget
from serving.retrieval.rag import fuse
from serving.retrieval.store import Passage
from serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class _Result:
    """A whole request's output, gathered from its stream."""

    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=lambda: Usage.of(0, 0))

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.logprobs += out.new_logprobs
        self.finish_reason = out.finish_reason
        self.usage = Usage.of(out.num_prompt_tokens, out.num_output_tokens)


class _SSEResponse(StreamingResponse):
    """Server-sent events that always end the request: however the response ends (done, client gone,
    cancelled), the event generator is closed and `on_close` (the request's aclose) runs."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass  # the client left mid-stream (ASGI 2.4 servers report it so); closing below aborts the request
        finally:
            await self.body_iterator.aclose()
            await self._on_close()


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _Api:
    """The routes' logic; one per app, holding what they share (no module globals)."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        retrieval: Retrieval | None,
    ):
        self.client, self.tokenizer, self.model_name = client, tokenizer, model_name
        self.max_model_len, self.retrieval = max_model_len, retrieval
        self.texts = TokenTexts(tokenizer)
        self.created = int(time.time())

    def models(self) -> Response:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)
        return _json(ModelList(data=[card]))

    # The two generation routes differ in how a prompt is made (raw text or ids vs a chat template), in
    # their stream events and in their body (OpenAI's two schemas); everything else is `_generate`.

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        passages, info = await self._context(req)
        prompt = fuse(req.prompt, passages) if passages else req.prompt
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        started = await self._begin(req, prompt_ids, info, request_id)
        try:  # decoded only now that the engine has checked the ids
            echo = self._echo(req.prompt) if req.echo else ""
        except BaseException:
            await started.aclose()
            raise
        with_logprobs = req.logprobs is not None
        scored = started.first.prompt_logprobs  # the prompt's logprobs come with the first output
        echo_lp = echo_logprobs(prompt_ids, scored, self.texts, req.logprobs) if req.echo and with_logprobs else None
        prompt_lp = (
            prompt_logprobs(scored, self.texts, req.prompt_logprobs) if req.prompt_logprobs is not None else None
        )

        def events() -> AsyncIterator[str]:
            return completion_events(
                started, request_id, created, self.model_name, self.texts, echo, with_logprobs, req.include_usage, info,
                echo_lp, prompt_lp, continuous_usage=req.continuous_usage,
            )  # fmt: skip

        def body(result: _Result) -> Completion:
            logprobs = completion_logprobs(result.logprobs, self.texts, len(echo)) if with_logprobs else None
            if echo_lp is not None and logprobs is not None:
                logprobs = echo_lp.followed_by(logprobs)
            choice = CompletionChoice(
                text=echo + result.text,
                logprobs=logprobs,
                finish_reason=result.finish_reason,
                prompt_logprobs=prompt_lp,
            )
            return Completion(
                id=request_id, created=created, model=self.model_name, choices=[choice], usage=result.usage,
                retrieval=info,
            )  # fmt: skip

        return await self._respond(req.stream, started, request, events, body)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        passages, info = await self._context(req)
        prompt_ids = self.tokenizer.apply_chat_template(fuse(req.template_messages(), passages))
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        started = await self._begin(req, prompt_ids, info, request_id)

        def events() -> AsyncIterator[str]:
            return chat_events(
                started, request_id, created, self.model_name, self.texts, req.logprobs, req.include_usage, info,
                continuous_usage=req.continuous_usage,
            )  # fmt: skip

        def body(result: _Result) -> ChatCompletion:
            choice = ChatChoice(
                message=AssistantMessage(content=result.text),
                logprobs=chat_logprobs(result.logprobs, self.texts) if req.logprobs else None,
                finish_reason=result.finish_reason,
            )
            return ChatCompletion(
                id=request_id, created=created, model=self.model_name, choices=[choice], usage=result.usage,
                retrieval=info,
            )  # fmt: skip

        return await self._respond(req.stream, started, request, events, body)

    async def _begin(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        prompt_ids: list[int],
        info: RetrievalInfo | None,
        request_id: str,
    ) -> Started:
        """Validate the sampling fields against the prompt and start the request (refusals raise here)."""
        with _rag_hint(info):
            params = req.sampling_params(len(prompt_ids), self.max_model_len)
            return await self._start(prompt_ids, params, request_id)

    async def _respond(
        self,
        stream: bool,
        started: Started,
        request: Request,
        events: Callable[[], AsyncIterator[str]],
        body: Callable[[_Result], BaseModel],
    ) -> Response:
        """A started request as server-sent events, or gathered into one JSON body."""
        if stream:
            return _SSEResponse(events(), started.aclose)
        result = await self._collect(started, request.receive)
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return _json(body(result))

    async def _context(
        self, req: CompletionRequest | ChatCompletionRequest
    ) -> tuple[list[Passage], RetrievalInfo | None]:
        """The passages to fuse into the request's prompt (none without a `retrieval` field)."""
        if req.retrieval is None:
            return [], None
        if self.retrieval is None:
            raise retrieval_off("retrieval")
        return await self.retrieval.context(req.retrieval, req.retrieval_query())

    def _echo(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=False)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _start(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> Started:
        """Submit a request and wait for its first output, so a refusal becomes an HTTP error, not a stream."""
        outputs = aiter(self.client.generate(prompt_ids, params, request_id))
        try:
            first = await anext(outputs)
        except StopAsyncIteration:
            raise RuntimeError(f"the engine ended request {request_id} without any output") from None
        return Started(first, outputs)

    @staticmethod
    async def _collect(started: Started, receive: Receive) -> _Result | None:
        """All of a request's outputs; None if the client disconnected first (the request is then aborted)."""

        async def drain() -> _Result:
            result = _Result()
            async for out in started:
                result.add(out)
            return result

        gathering = asyncio.ensure_future(drain())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({gathering, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            gathering.cancel()  # no-op once done; otherwise leaving the engine's stream aborts the request
            await asyncio.gather(gathering, gone, return_exceptions=True)
            await started.aclose()
        return None if gathering.cancelled() else gathering.result()


def build_api(
    client: EngineClient,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    api_keys: frozenset[str] = frozenset(),
    admin_keys: frozenset[str] = frozenset(),
    max_body_bytes: int = 1 << 20,
    max_model_len: int,
    retrieval: Retrieval | None = None,
    expert_load: ExpertLoadSource | None = None,
    rebalancer: RebalanceTarget | None = None,
) -> FastAPI:
    """The OpenAI-compatible app serving `model_name` from `client`, with RAG through `retrieval` if given,
    GET /v1/admin/expert-load read from `expert_load` and POST /v1/admin/rebalance done by `rebalancer`
    (serving/api/admin.py; each a 404 when None).

    `max_model_len` is the context the engine enforces (prompt and output together); a chat request
    without max_tokens may use all of it. With keys configured every route but /healthz (/health) needs
    `Authorization: Bearer <key>`: an admin key opens every route, an API key all but the writes to the
    document store (POST/DELETE /v1/documents) and /v1/admin/*. Bodies over `max_body_bytes` get 413.
    """
    api = _Api(client, tokenizer, model_name, max_model_len, retrieval)
    app = FastAPI(title="moe-serve", summary="OpenAI-compatible API for Mixture-of-Experts models")
    install_error_handlers(app)
    app.add_middleware(Guard, api_keys=api_keys, admin_keys=admin_keys, max_body_bytes=max_body_bytes)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # vLLM's name for it, which load generators check before a run (guidellm's openai_http backend does)
    app.get("/health", include_in_schema=False)(healthz)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> Response:
        return api.models()

    @app.post("/v1/completions", response_model=Completion, responses=errors(400, 404, 429, 503))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.completion(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=errors(400, 404, 429, 503))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.chat(body, request)

    install_retrieval_routes(app, retrieval)
    install_admin_routes(app, expert_load, rebalancer)
    streams = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}
    document_api(
        app, auth=bool(api_keys or admin_keys), model_name=model_name, max_model_len=max_model_len, streams=streams
    )
    return app


@contextmanager
def _rag_hint(info: RetrievalInfo | None) -> Iterator[None]:
    """A prompt that retrieved passages made too long: say so, and what to change."""
    try:
        yield
    except RequestError as exc:
        if info is None or not info.used:
            raise
        hint = f"the prompt includes {len(info.sources)} retrieved passages: lower retrieval.top_k"
        raise RequestError(f"{exc} ({hint})") from None


def load_api_keys(env_var: str = "MOE_SERVE_API_KEYS", file: str | None = None) -> frozenset[str]:
    """API keys from `env_var` (comma-separated) and from `file` (one per line; blank lines and lines
    starting with # are skipped). Empty when neither holds a key, which turns authentication off;
    there is no default key.

    >>> load_api_keys(file="/etc/moe-serve/keys")
    """
    keys = os.environ.get(env_var, "").split(",")
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"API key file {file}: cannot read it ({exc})") from exc
        keys += [line for line in lines if not line.strip().startswith("#")]
    return frozenset(k.strip() for k in keys if k.strip())
