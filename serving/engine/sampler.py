"""The sampler: one row of logits -> the next token, and the logprobs OpenAI reports.
(The parameters, validated once, are serving/engine_client.py's SamplingParams.)

Shape legend: V = vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from serving.engine_client import SamplingParams, TokenLogprobs


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request random stream, so a seeded request is reproducible whatever else is batched with it."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def seed_for_position(generator: torch.Generator, seed: int, position: int) -> None:
    """Reseed a seeded request's stream for its `position`-th output token. The draw for a token then
    depends on (seed, position) only, not on the draws before it, so a request resumed on another
    replica with its first `position` tokens given (a migrated stream) samples what it would have."""
    generator.manual_seed((seed * 1_000_003 + position) % 2**63)


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
