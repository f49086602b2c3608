"""OpenAI API response bodies: completions, chat completions, their stream chunks, and the model list.

>>> Completion(id="cmpl-1", created=0, model="demo", choices=[CompletionChoice(index=0, text="hi",
...     finish_reason="length")], usage=Usage.of(prompt=3, completion=1)).model_dump_json()

Field names and nesting follow OpenAI exactly, so the official clients parse them; `system_fingerprint`
is always null. Stream chunks carry `usage: null` except the last one when stream_options.include_usage
is set, which has empty `choices` and the totals (with vLLM's continuous_usage_stats too, every chunk
carries the usage so far). Extension: `retrieval` (what RAG retrieved) on a
whole response, and on a stream's first chunk (empty `choices`), only for requests that asked for it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serving.api.retrieval_bodies import RetrievalInfo

FinishReason = Literal["stop", "length"]


def _is_none(value: object) -> bool:
    return value is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# -- logprobs ---------------------------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    """/v1/completions: parallel lists, one entry per token: with echo the prompt's tokens, then the output's.
    The prompt's first token has no logprob (null in token_logprobs and top_logprobs), as OpenAI."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)  # N best (and the chosen) -> logprob
    text_offset: list[int] = Field(default_factory=list)  # where each token starts in the returned text

    def followed_by(self, other: CompletionLogprobs) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=self.tokens + other.tokens,
            token_logprobs=self.token_logprobs + other.token_logprobs,
            top_logprobs=self.top_logprobs + other.top_logprobs,
            text_offset=self.text_offset + other.text_offset,
        )


class PromptTokenLogprob(BaseModel):
    """Extension (vLLM's `prompt_logprobs` format): one token at one prompt position."""

    logprob: float
    rank: int | None  # 1: the most likely token at this position
    decoded_token: str


# Per prompt token: null for the first, then {token id: its logprob} for the prompt's token and its N best rivals.
PromptLogprobs = list[dict[int, PromptTokenLogprob] | None]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may hold part of a character)


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


# -- /v1/completions --------------------------------------------------------------------------------


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    # extension, as vLLM: requests with `prompt_logprobs` (a stream's first chunk with choices carries it)
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=_is_none)


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # always set on a whole completion; on chunks only the usage chunk's
    system_fingerprint: None = None
    retrieval: RetrievalInfo | None = Field(None, exclude_if=_is_none)  # extension: requests with `retrieval`


CompletionChunk = Completion  # OpenAI streams the same object, with text deltas


# -- /v1/chat/completions ---------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None
    retrieval: RetrievalInfo | None = Field(None, exclude_if=_is_none)  # extension: requests with `retrieval`


class Delta(BaseModel):
    """A stream delta: the first carries the role, the others content; unset fields are left out."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: None = None
    retrieval: RetrievalInfo | None = Field(None, exclude_if=_is_none)  # extension: requests with `retrieval`


# -- /v1/models -------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-serve"
    max_model_len: int  # extension (as vLLM): the context limit, prompt and output together


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
