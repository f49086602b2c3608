"""One request's state inside the engine: its tokens, its cache blocks, its detokenised text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from serving.engine_client import SamplingParams, TokenLogprobs


class Status(enum.Enum):
    WAITING = "waiting"  # queued, holds no cache
    RUNNING = "running"  # admitted: holds cache blocks, prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    arrival_time: float  # time.perf_counter() when the request was added
    token_ids: list[int] = field(default_factory=list)  # prompt + generated, grows by one per decode
    num_cached: int = 0  # leading tokens whose K/V are in the cache
    scheduled: bool = False  # has run in at least one step (queue time is recorded then)
    blocks: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # With params.prompt_logprobs: one entry per prompt token scored so far; the first token has none (None).
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    def positions_to_score(self, start: int, end: int) -> range:
        """Positions in [start, end) (a chunk about to run) whose logits score the prompt token after them and
        that are not scored yet: a preempted sequence recomputes positions it has scored before."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(max(start, len(self.prompt_logprobs) - 1), min(end, self.num_prompt - 1))

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_uncached(self) -> int:
        """Tokens still to run through the model: prompt chunks, or the one token just sampled."""
        return len(self.token_ids) - self.num_cached
