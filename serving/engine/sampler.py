"""The sampler: one row of logits -> the next token, and the logprobs OpenAI reports.
(The parameters, validated once, are serving/engine_client.py's SamplingParams.)

Shape legend: R = scored rows, V = vocabulary.
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
    [entry] = score_tokens(logits[None], torch.tensor([token_id], device=logits.device), top_n)
    return entry


def score_tokens(logits: Tensor, token_ids: Tensor, top_n: int) -> list[TokenLogprobs]:
    """Each row's token: its log-probability, its rank and the top_n best alternatives, from float32 logits
    [R, V] and the token at each row [R]. Sampled tokens and prompt tokens go through this one function, so
    a prompt token is given exactly what generating it would have given. Runs where the logits are; only
    [R] and [R, top_n] numbers come back to the host."""
    logp = torch.log_softmax(logits, dim=-1)  # [R, V]
    chosen = logp.gather(1, token_ids[:, None])  # [R, 1]
    ranks = (logp > chosen).sum(-1) + 1  # [R]: 1 for the most likely token
    values, ids = torch.topk(logp, top_n)  # [R, top_n]
    # Device -> host: the few numbers OpenAI reports, never the [R, V] rows.
    chosen, ranks, values, ids = chosen[:, 0].tolist(), ranks.tolist(), values.tolist(), ids.tolist()
    return [
        TokenLogprobs(token_id=t, logprob=lp, top=tuple(zip(i, v, strict=True)), rank=r)
        for t, lp, r, i, v in zip(token_ids.tolist(), chosen, ranks, ids, values, strict=True)
    ]
