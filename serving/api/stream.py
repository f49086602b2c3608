"""Server-sent event streams for /v1/completions and /v1/chat/completions (stream=true).

>>> started = Started(first_output, rest_of_outputs)      # an engine request that was accepted
>>> events = chat_events(started, "chatcmpl-1", created, "demo", texts, logprobs=False, include_usage=True)
>>> [e async for e in events]   # ['data: {..."delta":{"role":"assistant","content":""}...}\\n\\n', ...,
...                             #  'data: [DONE]\\n\\n']

Order, as OpenAI: (extension, only for requests with `retrieval`) a chunk with empty choices and the
retrieved sources; (chat) a chunk with the role; chunks with text deltas (a delta with no text is
skipped unless it carries logprobs or the finish_reason); with include_usage a last chunk with empty
choices and the usage; then [DONE]. A failure mid-stream is sent as `data: {"error": {...}}`, then [DONE].
With continuous_usage (vLLM's stream_options.continuous_usage_stats, only together with include_usage)
every chunk before the last also carries the usage so far: the prompt's tokens and the output tokens
sent up to and including that chunk (0 on the retrieval and role chunks).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel

from serving.api.errors import as_api_error
from serving.api.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from serving.api.requests import ErrorResponse
from serving.api.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    Delta,
    PromptLogprobs,
    Usage,
)
from serving.api.retrieval_bodies import RetrievalInfo
from serving.engine_client import RequestOutput

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


class Started:
    """An accepted request: its first output (already received) and the rest; `aclose()` aborts it."""

    def __init__(self, first: RequestOutput, rest: AsyncIterator[RequestOutput]):
        self.first, self._rest = first, rest

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        yield self.first
        async for out in self._rest:
            yield out

    async def aclose(self) -> None:
        close = getattr(self._rest, "aclose", None)
        if close is not None:
            await close()


def _event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _usage(out: RequestOutput) -> Usage:
    return Usage.of(out.num_prompt_tokens, out.num_output_tokens)


def _usage_before_output(first: RequestOutput) -> Usage:
    """The usage of a chunk sent before any output token (the retrieval and role chunks)."""
    return Usage.of(first.num_prompt_tokens, 0)


async def _sse(chunks: AsyncIterator[str], request_id: str) -> AsyncIterator[str]:
    """`chunks`, then [DONE]; an exception becomes an error event first (the response has begun)."""
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk
    except Exception as exc:
        error = as_api_error(exc)
        if error.status >= 500:
            log.exception("request %s failed while streaming", request_id)
        yield _event(ErrorResponse(error=error.info))
    yield DONE


def completion_events(
    started: Started,
    request_id: str,
    created: int,
    model: str,
    texts: TokenTexts,
    echo: str,
    logprobs: bool,
    include_usage: bool,
    retrieval: RetrievalInfo | None = None,
    echo_logprobs: CompletionLogprobs | None = None,
    prompt_logprobs: PromptLogprobs | None = None,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """The /v1/completions stream; `echo` (the prompt text, or "") comes first, with `echo_logprobs` (the
    prompt's tokens) when asked for. `prompt_logprobs` (extension) goes on the first chunk with a choice."""

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None, **extra) -> str:
        body = CompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage, **extra)
        return _event(body)

    async def chunks() -> AsyncIterator[str]:
        offset, last, pending = len(echo), started.first, prompt_logprobs
        before = _usage_before_output(started.first) if continuous_usage else None
        if retrieval is not None:
            yield chunk([], before, retrieval=retrieval)
        if echo or echo_logprobs is not None:
            yield chunk([CompletionChoice(text=echo, logprobs=echo_logprobs, prompt_logprobs=pending)], before)
            pending = None
        async for out in started:
            last = out
            lp = completion_logprobs(out.new_logprobs, texts, offset) if logprobs else None
            offset += sum(len(t) for t in lp.tokens) if lp else 0
            if out.new_text or out.finished or lp or pending:
                choice = CompletionChoice(
                    text=out.new_text, logprobs=lp, finish_reason=out.finish_reason, prompt_logprobs=pending
                )
                yield chunk([choice], _usage(out) if continuous_usage else None)
                pending = None
        if include_usage:
            yield chunk([], _usage(last))

    return _sse(chunks(), request_id)


def chat_events(
    started: Started,
    request_id: str,
    created: int,
    model: str,
    texts: TokenTexts,
    logprobs: bool,
    include_usage: bool,
    retrieval: RetrievalInfo | None = None,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """The /v1/chat/completions stream."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None, **extra) -> str:
        body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage, **extra)
        return _event(body)

    async def chunks() -> AsyncIterator[str]:
        last = started.first
        before = _usage_before_output(started.first) if continuous_usage else None
        if retrieval is not None:
            yield chunk([], before, retrieval=retrieval)
        yield chunk([ChatChunkChoice(delta=Delta(role="assistant", content=""))], before)
        async for out in started:
            last = out
            lp = chat_logprobs(out.new_logprobs, texts) if logprobs else None
            if out.new_text or out.finished or lp:
                delta = Delta(content=out.new_text) if out.new_text else Delta()
                choice = ChatChunkChoice(delta=delta, logprobs=lp, finish_reason=out.finish_reason)
                yield chunk([choice], _usage(out) if continuous_usage else None)
        if include_usage:
            yield chunk([], _usage(last))

    return _sse(chunks(), request_id)
