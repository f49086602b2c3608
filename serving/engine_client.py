"""The engine contract: what the HTTP API, the Ingress and the app config know about an engine.

Torch-free on purpose: the Ingress process imports this (and serving/api/), never the model stack,
so it starts fast and small. Both engines implement it, ours (serving/engine/async_engine.py) and
vLLM's adapter (serving/vllm_engine.py).

>>> params = SamplingParams(max_tokens=8, temperature=0)
>>> async for out in client.generate([1, 2, 3], params):      # any EngineClient
...     print(out.new_text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from serving.errors import RequestError

MAX_LOGPROBS = 20  # as OpenAI: at most 20 alternatives per token
DType = Literal["float32", "bfloat16", "float16"]  # serving/model/dtypes.py maps them to torch dtypes
# How the native engine computes routed experts (serving/experts/kernels.py resolves "auto").
EXPERT_KERNELS = ("auto", "loop", "vllm")
ExpertKernel = Literal["auto", "loop", "vllm"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 means greedy (argmax). Validated once, here.

    >>> SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, stop=("\\n\\n",))
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k cut
    seed: int | None = None  # set: the same request gives the same tokens
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks, parity tests)
    logprobs: int | None = None  # None: no logprobs; N: the chosen token's and the N best alternatives'
    # None: no prompt logprobs; N: each prompt token's logprob (scored in the prefill) and its N best alternatives
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            raise RequestError(
                f"max_tokens={self.max_tokens}: must be at least 1 (0 only scores a prompt: with prompt_logprobs set)"
            )
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature={self.temperature}: must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise RequestError(f"top_k={self.top_k}: must be a positive integer (or omitted)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs={self.logprobs}: must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise RequestError(f"prompt_logprobs={self.prompt_logprobs}: must be in [0, {MAX_LOGPROBS}]")
        if any(not s for s in self.stop):
            raise RequestError("stop: stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the `logprobs` most likely alternatives (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = field(default=())
    rank: int | None = None  # the token's place in the distribution (1: the most likely); None: not computed


@dataclass
class RequestOutput:
    """What one engine step produced for one request: new tokens and text, and whether it is finished.

    `prompt_logprobs` (with SamplingParams.prompt_logprobs set) comes on the request's first output only:
    one entry per prompt token, None for the first (nothing before it to predict it). Plain data, so it
    crosses Ray Serve between the Router and the Ingress unchanged."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class EngineConfig(BaseModel):
    """Engine limits, shared by both engines. Memory is bounded by `kv_cache_mb`; queueing by `max_waiting`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: DType = Field("float32", description="Weights, activations and cache.")
    kv_cache_mb: float = Field(256, gt=0, description="Memory for the KV cache, in MiB; sets how many tokens fit.")
    block_size: int = Field(16, ge=1, le=1024, description="Token slots per cache block.")
    max_batched_tokens: int = Field(512, ge=1, description="Token budget of one engine step (prefill chunk size).")
    max_running: int = Field(64, ge=1, description="Most sequences decoded together in one step.")
    max_waiting: int = Field(256, ge=0, description="Most requests queued; past it requests are refused.")
    max_model_len: int | None = Field(None, ge=1, description="Context limit; default: the model's.")
    device: str | None = Field(
        None,
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="Where a replica computes: cpu, cuda or cuda:N. Default: the replica's GPU with "
        "accelerator: gpu, else cpu (native engine; vLLM places itself).",
    )
    expert_kernel: ExpertKernel = Field(
        "loop",
        description="Routed experts (native engine): loop runs one matmul pair per expert in torch; vllm runs "
        "vLLM's fused MoE op (needs vLLM installed); auto takes vllm where it is installed and supports the "
        "dtype, else loop.",
    )
    overlap_min_tokens: int | None = Field(
        None,
        ge=2,
        description="Native engine: split a step of at least this many tokens (and two or more sequences) into "
        "two micro-batches kept in flight together, so the router runs one's attention while the shards compute "
        "the other's experts (benchmarks/README.md measures when it pays); null: never split.",
    )
    expert_load_window_s: float = Field(
        60.0,
        ge=1,
        le=86400,
        description="Native engine: the sliding window of expert load each router keeps (token rows per MoE "
        "layer and expert, for GET /v1/admin/expert-load), in seconds; it moves in steps of 1/60 of itself.",
    )


def check_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise RequestError if a request can never be served: every engine runs these checks, with these
    messages, so the API answers the same whichever engine is behind it."""
    if not prompt_ids:
        raise RequestError("prompt: empty; give at least one token")
    if bad := [t for t in prompt_ids if not 0 <= t < vocab_size]:
        raise RequestError(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    total = len(prompt_ids) + params.max_tokens
    if total > max_model_len:
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens; the request asks for "
            f"{total} ({len(prompt_ids)} in the prompt + {params.max_tokens} max_tokens)"
        )


def check_resumed(resumed_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
    """Raise RequestError unless `resumed_ids` (output tokens a migrated request already has) can be resumed."""
    if not resumed_ids:
        return  # a new request
    if len(resumed_ids) >= params.max_tokens:
        raise RequestError(f"resumed_ids: {len(resumed_ids)} tokens leave nothing of max_tokens={params.max_tokens}")
    if bad := [t for t in resumed_ids if not 0 <= t < vocab_size]:
        raise RequestError(f"resumed_ids: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if params.prompt_logprobs is not None:
        raise RequestError("resumed_ids with prompt_logprobs: the first output carried them already; resume without")


class EngineClient(Protocol):
    """What the API needs from an engine. `generate` raises RequestError or EngineOverloadedError before
    its first output when it refuses a request; closing the iterator (`aclose()`) before the last output
    aborts the request."""

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]: ...


class ServedEngine(EngineClient, Protocol):
    """An engine a replica serves (deployments/engine_deployment.py): an EngineClient that also says its
    context limit, whether it still runs, and how to stop it. AsyncEngine and AsyncVLLMEngine are two.

    Its `generate` also takes `resumed_ids`: output tokens the request already produced on a replica that
    died (the Ingress migrates the stream). The engine continues after them, counts them in the usage and
    toward max_tokens, and does not output them again."""

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        resumed_ids: list[int] | tuple[int, ...] = (),
    ) -> AsyncIterator[RequestOutput]: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def alive(self) -> bool: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
