"""OpenAI API request bodies (/v1/completions, /v1/chat/completions) and the error body, as pydantic models.

>>> req = ChatCompletionRequest.model_validate({"model": "demo", "messages": [{"role": "user", "content": "Hi"}]})
>>> params = req.sampling_params(prompt_tokens=len(prompt_ids), max_model_len=2048)

Which fields are accepted (a field not listed here is refused with a 400 naming it, never ignored):
- supported: model, max_tokens (chat also max_completion_tokens), temperature (0..2), top_p, stop (up to 16),
  seed, stream, stream_options.include_usage, user (ignored), and per route: completions prompt, echo,
  logprobs (0..5; with echo the prompt's tokens are scored too); chat messages (system/user/assistant,
  string or text-part content), logprobs (bool), top_logprobs (0..20). Extensions, as in vLLM: top_k,
  ignore_eos, stream_options.continuous_usage_stats (with include_usage, every chunk carries the usage so
  far; guidellm sends it), completions prompt_logprobs (0..20); ours: retrieval (RAG, see
  serving/api/retrieval_bodies.py).
- accepted only at their no-op value, because clients send them by default: n=1, best_of=1,
  frequency_penalty=0, presence_penalty=0, repetition_penalty=1 (vLLM's extension; `vllm bench serve`
  sends it), logit_bias={} / null, response_format={"type": "text"}, suffix=null.
  Any other value is a 400 that names the field.
- refused: tools, functions, audio, images, several prompts in one request, unknown fields, unknown roles.
- rules between fields: stream_options needs stream=true; chat top_logprobs needs logprobs=true; chat
  max_tokens and max_completion_tokens must agree when both are sent; completions max_tokens=0 only scores
  a prompt (echo with logprobs, or prompt_logprobs), and prompt scoring does not mix with retrieval (it
  would score the retrieved passages). Text parts of one message are joined with newlines.
- the schema (/openapi.json) says all of this: field validators keep their own messages, and
  json_schema_extra writes what they enforce (_documented, _one_of) and the rules between fields (_when)
  into it; validation is strict, as the schema reads (serving/api/fields.py).
Responses are in `serving/api/responses.py`; token logprobs in `serving/api/logprobs.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from serving.api.fields import json_int
from serving.api.retrieval_bodies import RetrievalOptions
from serving.engine_client import MAX_LOGPROBS, SamplingParams
from serving.errors import RequestError

# OpenAI takes 4, vLLM any number. lm-evaluation-harness sends a task's `until` strings and, with num_concurrent=1,
# the EOS string: up to 7 for the tasks of lm-eval 0.4.13, 6 for HumanEval. Each costs one search of a few
# held-back characters per generated token.
MAX_STOP_STRINGS = 16
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions `logprobs` is capped at 5 by OpenAI; chat allows MAX_LOGPROBS
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _one_prompt(value: Any) -> Any:
    """A completion prompt: a string, a list of token ids, or a list holding exactly one of those."""
    if isinstance(value, list) and value and isinstance(value[0], str | list):
        if len(value) != 1:
            raise ValueError(f"{len(value)} prompts in one request; this server takes one prompt per request")
        value = value[0]
    if isinstance(value, list) and all(type(v) is float and v.is_integer() for v in value if type(v) is not int):
        return [int(v) for v in value]  # JSON has one number type: 7.0 is the integer 7 (as JSON Schema says)
    if isinstance(value, str):
        return value
    raise ValueError("must be a string, a list of token ids, or a list holding exactly one of those")


def _message_text(value: Any) -> Any:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts (joined with newlines)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError('must be a string or a non-empty list of {"type": "text", "text": ...} parts')
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f'part {i} has type {kind!r}; only {{"type": "text", "text": ...}} parts are supported')
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ValueError(f'part {i} must be exactly {{"type": "text", "text": <string>}}')
        texts.append(part["text"])
    return "\n".join(texts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # accept what the schema says (serving/api/fields.py)


def _one_of(*alternatives: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """json_schema_extra that documents a field as exactly these alternatives: what the field's own validator
    enforces (with its own messages), written where a generated client can see it."""

    def document(schema: dict[str, Any]) -> None:
        schema.pop("type", None)
        schema["anyOf"] = list(alternatives)

    return document


def _documented(*alternatives: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """_one_of these, or null (an optional field)."""
    return _one_of(*alternatives, {"type": "null"})


_ONLY_ZERO = _documented({"type": "number", "minimum": 0, "maximum": 0})
_ONLY_ONE = _documented({"type": "integer", "minimum": 1, "maximum": 1})
_ONLY_ONE_NUMBER = _documented({"type": "number", "minimum": 1, "maximum": 1})
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


def _when(condition: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """A rule between fields, in JSON Schema: a body whose fields match `condition` must match `then`."""
    return {"if": {"properties": condition, "required": list(condition)}, "then": then}


def _must_be(**fields: Any) -> dict[str, Any]:
    return {"properties": {name: {"const": value} for name, value in fields.items()}, "required": list(fields)}


# The rules between fields that the validators below enforce, for the schema (model json_schema_extra).
_STREAM_OPTIONS_NEED_STREAM = _when({"stream_options": {"type": "object"}}, _must_be(stream=True))
_TOP_LOGPROBS_NEED_LOGPROBS = _when({"top_logprobs": {"type": "integer"}}, _must_be(logprobs=True))
_SCORING = {  # what makes a completions request score its prompt
    "anyOf": [
        {"properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}}, "required": ["echo", "logprobs"]},
        {"properties": {"prompt_logprobs": {"type": "integer"}}, "required": ["prompt_logprobs"]},
    ]
}
_ZERO_TOKENS_SCORE = _when({"max_tokens": {"const": 0}}, _SCORING)
_RETRIEVAL_DOES_NOT_SCORE = _when({"retrieval": {"type": "object"}}, {"not": _SCORING})
_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
    "additionalProperties": False,
}


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with token usage (and empty choices).")
    continuous_usage_stats: bool = Field(
        False, description="Extension (as vLLM): with include_usage, every chunk also carries the usage so far."
    )


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description="Only plain text; JSON modes are not supported.")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_message_text)] = Field(
        description="A string, or text parts (joined with newlines).",
        json_schema_extra=_one_of({"type": "string"}, {"type": "array", "items": _TEXT_PART, "minItems": 1}),
    )


class _SamplingRequest(_Strict):
    """Fields both routes share, and their conversion to SamplingParams."""

    model: str = Field(description="Must be the served model's name (GET /v1/models).")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass; default 1.")
    top_k: json_int(ge=1) | None = Field(None, description="Extension: sample among the k most likely tokens.")
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(
        None,
        description=f"Up to {MAX_STOP_STRINGS} strings; the text ends before the first one generated.",
        json_schema_extra=_documented(
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
        ),
    )
    seed: json_int(ge=SEED_RANGE[0], le=SEED_RANGE[1]) | None = Field(None, description="Same seed, same tokens.")
    stream: bool = Field(False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence tokens.")
    user: str | None = Field(None, description="Accepted and ignored.")
    n: json_int() | None = Field(None, description="Only 1.", json_schema_extra=_ONLY_ONE)
    frequency_penalty: float | None = Field(
        None, description="Only 0 (penalties are not implemented).", json_schema_extra=_ONLY_ZERO
    )
    presence_penalty: float | None = Field(
        None, description="Only 0 (penalties are not implemented).", json_schema_extra=_ONLY_ZERO
    )
    repetition_penalty: float | None = Field(
        None, description="Extension (as vLLM): only 1 (penalties are not implemented).",
        json_schema_extra=_ONLY_ONE_NUMBER,
    )  # fmt: skip
    logit_bias: dict[str, float] | None = Field(
        None, description="Only empty.", json_schema_extra=_documented({"type": "object", "maxProperties": 0})
    )
    response_format: ResponseFormat | None = Field(None, description='Only {"type": "text"}.')
    retrieval: RetrievalOptions | None = Field(
        None, description="Extension: retrieve passages and put them in the prompt (RAG); omitted: no retrieval."
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "":
            raise ValueError("must not be empty")
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(v)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError(f"{v}: only one choice per request is supported; send {v} requests instead")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0):
            raise ValueError(f"{v}: penalties are not supported; omit the field or send 0")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 1):
            raise ValueError(f"{v}: penalties are not supported; omit the field or send 1")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported; omit the field or send {}")
        return v

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk: only with include_usage, as vLLM (continuous_usage_stats alone does nothing)."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    def _max_tokens(self) -> int | None:
        raise NotImplementedError

    def _logprobs(self) -> int | None:
        raise NotImplementedError

    def _prompt_logprobs(self) -> int | None:
        return None

    def sampling_params(self, prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """The engine's parameters. A request without max_tokens may fill the context: max_model_len - prompt_tokens.
        Raises RequestError (naming the field) for values the engine cannot take."""
        max_tokens = self._max_tokens()
        prompt_logprobs = self._prompt_logprobs()
        if max_tokens is None:
            if prompt_tokens >= max_model_len:
                raise RequestError(
                    f"the prompt has {prompt_tokens} tokens and fills this model's maximum context length of "
                    f"{max_model_len} tokens (prompt and output together); shorten the prompt"
                )
            max_tokens = max_model_len - prompt_tokens
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            logprobs=self._logprobs(),
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions: complete a raw prompt (no chat template)."""

    model_config = ConfigDict(
        json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM, _ZERO_TOKENS_SCORE, _RETRIEVAL_DOES_NOT_SCORE]}
    )

    prompt: Annotated[str | list[int], BeforeValidator(_one_prompt)] = Field(
        description="A string (encoded without special tokens), token ids, or a list holding one of those.",
        json_schema_extra=_one_of(
            {"type": "string", "minLength": 1},
            _TOKEN_IDS,
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
            {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1},
        ),
    )
    max_tokens: json_int(ge=0) | None = Field(
        16,
        description="Default 16, as OpenAI; null: fill the context; 0 scores the prompt without generating "
        "(with echo and logprobs, or prompt_logprobs).",
    )
    logprobs: json_int(ge=0, le=MAX_COMPLETION_LOGPROBS) | None = Field(
        None,
        description="Log-probabilities of each token and its N best rivals; with echo, of the prompt's tokens too "
        "(the first one's is null).",
    )
    echo: bool = Field(False, description="Prepend the prompt to the returned text.")
    best_of: json_int() | None = Field(None, description="Only 1.", json_schema_extra=_ONLY_ONE)
    suffix: str | None = Field(
        None,
        description="Only null or empty (no insertion).",
        json_schema_extra=_documented({"type": "string", "maxLength": 0}),
    )
    prompt_logprobs: json_int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None,
        description="Extension (as vLLM): each prompt token's log-probability and its N best rivals, in "
        "choices[0].prompt_logprobs (null for the first token).",
    )

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError(f"{v}: only 1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("insertion after a suffix is not supported; omit the field")
        return v

    def _max_tokens(self) -> int | None:
        scoring = self._prompt_logprobs() is not None
        if self.max_tokens == 0 and not scoring:
            raise RequestError(
                "max_tokens: 0 only scores a prompt; send echo=true with logprobs (or prompt_logprobs), "
                "or ask for at least 1 token"
            )
        if scoring and self.retrieval is not None:
            raise RequestError(
                "retrieval: cannot be combined with prompt scoring (echo with logprobs, or prompt_logprobs): "
                "the logprobs would score the retrieved passages, not the prompt you sent"
            )
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        """What the engine scores in the prompt: echo with logprobs needs `logprobs` rivals per token, the
        prompt_logprobs extension its own number. The engine scores the larger; each response field keeps its own."""
        wanted = [n for n in (self.logprobs if self.echo else None, self.prompt_logprobs) if n is not None]
        return max(wanted) if wanted else None

    def retrieval_query(self) -> str:
        """What retrieval searches for: the prompt text."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("retrieval: needs a text prompt to search for (not token ids, not blank)")
        return self.prompt


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions: messages rendered with the checkpoint's chat template."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM, _TOP_LOGPROBS_NEED_LOGPROBS]})

    messages: list[ChatMessage] = Field(min_length=1, description="system / user / assistant turns.")
    max_tokens: json_int(ge=1) | None = Field(None, description="Deprecated by OpenAI; default: fill the context.")
    max_completion_tokens: json_int(ge=1) | None = Field(None, description="Default: fill the context.")
    logprobs: bool = Field(False, description="Return each output token's log-probability.")
    top_logprobs: json_int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="With logprobs=true: the N most likely tokens at each position."
    )

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, v: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if v is not None and other is not None and v != other:
            raise ValueError(f"{v} disagrees with max_tokens={other}; send only one of them")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs=true")
        return v

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def retrieval_query(self) -> str:
        """What retrieval searches for: the last user message."""
        for m in reversed(self.messages):
            if m.role == "user" and m.content.strip():
                return m.content
        raise RequestError("retrieval: needs a non-empty user message to search for")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo
