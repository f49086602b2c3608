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

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

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
