"""Sampling parameters (validated once) and the sampler: logits -> next token, with logprobs.

Shape legend: V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from serving.errors import RequestError

MAX_LOGPROBS = 20  # as OpenAI: at most 20 alternatives per token


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 means greedy (argmax).

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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens={self.max_tokens}: must be at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature={self.temperature}: must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise RequestError(f"top_k={self.top_k}: must be a positive integer (or omitted)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs={self.logprobs}: must be in [0, {MAX_LOGPROBS}]")
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


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request random stream, so a seeded request is reproducible whatever else is batched with it."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one row of float32 logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits))
    scaled = logits / params.temperature  # [V]
    if params.top_k is not None and params.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True)  # [V], [V]
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = (probs.cumsum(-1) - probs) >= params.top_p  # [V]
        scaled = scaled.index_put((order[drop],), torch.tensor(float("-inf")))
    probs = torch.softmax(scaled, dim=-1)  # [V]
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: Tensor, token_id: int, top_n: int) -> TokenLogprobs:
    """Log-probabilities under the model's raw distribution (before temperature and cuts), as OpenAI reports."""
    logp = torch.log_softmax(logits, dim=-1)  # [V]
    top = ()
    if top_n:
        values, ids = torch.topk(logp, top_n)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(token_id=token_id, logprob=float(logp[token_id]), top=top)
