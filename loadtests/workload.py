"""What a load test sends: prompt lengths, output length, chat/completions mix, RAG, model and request rate.

One frozen `Workload` describes it and is validated once, on construction. The runner hands it to the
locust process as command-line flags (`to_args()`); the locustfile registers the same flags as locust
custom arguments (`add_locust_arguments`), each also settable from an environment variable, and reads
them back with `Workload.from_options(environment.parsed_options)`:

    MOE_LOADTEST_MAX_TOKENS=16 python -m locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

Prompts are `n` words, `n` drawn uniformly from `prompt_words` (inclusive), each word drawn from a fixed
list by a generator seeded with (seed, user index): the same seed sends the same prompts. Word counts
are not token counts: with the demo tokenizer one word of this list is 2.3 tokens on average (1 to 4;
the summary's `prompt_tokens` is the server's count of each prompt).

This module imports neither locust nor Ray: the `moe-serve` process uses it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

WORDS = (
    "expert router shard token layer model gate weight cache batch request stream latency memory tensor "
    "attention vector query answer context document cluster replica serve scale load queue shard signal "
    "river mountain garden window silver orange market letter winter summer music planet forest bridge "
    "engine harbor island lantern meadow pocket rocket school season shadow station story valley yellow"
).split()

RAG_RETRIEVAL = {"top_k": 4, "collection": "docs"}  # the body field a RAG request adds
KINDS = ("completions", "chat")


def parse_word_range(text: str) -> tuple[int, int]:
    """'16:64' -> (16, 64); '32' -> (32, 32). Raises ValueError naming --prompt-words."""
    lo, _, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"--prompt-words: expected MIN:MAX or N words, got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"--prompt-words: need 1 <= MIN <= MAX, got {text!r}")
    return low, high


@dataclass(frozen=True)
class Workload:
    """The requests of a load test. Each field is one flag of `moe-serve loadtest` and of the locustfile."""

    prompt_words: tuple[int, int] = (16, 64)  # uniform word count, inclusive
    max_tokens: int = 64  # output length asked for (with ignore_eos: exactly this many tokens)
    chat_fraction: float = 0.5  # share of requests sent to /v1/chat/completions; the rest to /v1/completions
    rag: bool = False  # add "retrieval": RAG_RETRIEVAL to every body
    model: str | None = None  # None: the first id from GET /v1/models
    rate: float | None = None  # total requests/s over all users (constant throughput); None: closed loop
    ignore_eos: bool = False  # ask the server to generate max_tokens whatever it samples (vLLM's extension)
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.prompt_words
        if not 1 <= low <= high:
            raise ValueError(f"--prompt-words: need 1 <= MIN <= MAX, got {low}:{high}")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens: must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ValueError(f"--chat-fraction: must be in [0, 1], got {self.chat_fraction}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"--rate: must be > 0 requests/s, got {self.rate}")

    @classmethod
    def from_options(cls, options: Any) -> Workload:
        """From the argparse namespace that `add_locust_arguments` filled (locust's parsed_options)."""
        return cls(
            prompt_words=parse_word_range(options.prompt_words),
            max_tokens=options.max_tokens,
            chat_fraction=options.chat_fraction,
            rag=options.rag,
            model=options.model or None,
            rate=options.rate or None,
            ignore_eos=options.ignore_eos,
            seed=options.seed,
        )

    def to_args(self) -> list[str]:
        """The locustfile flags that reproduce this workload."""
        low, high = self.prompt_words
        args = ["--prompt-words", f"{low}:{high}", "--max-tokens", str(self.max_tokens)]
        args += ["--chat-fraction", str(self.chat_fraction), "--seed", str(self.seed)]
        args += ["--model", self.model] if self.model else []
        args += ["--rate", str(self.rate)] if self.rate else []
        args += ["--rag"] if self.rag else []
        args += ["--ignore-eos"] if self.ignore_eos else []
        return args

    def describe(self) -> dict[str, Any]:
        """JSON-ready fields, for the summary."""
        return {**asdict(self), "prompt_words": list(self.prompt_words)}

    def sampler(self, user_index: int) -> PromptSampler:
        return PromptSampler(self, random.Random(self.seed * 1_000_003 + user_index))

    def body(self, kind: str, model: str, prompt: str) -> dict[str, Any]:
        """The streaming request body for `kind` ('completions' or 'chat')."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},  # the last chunk carries usage.completion_tokens
        }
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.rag:
            body["retrieval"] = dict(RAG_RETRIEVAL)
        return body


@dataclass
class PromptSampler:
    """One user's stream of (kind, prompt) pairs, reproducible from the workload's seed and the user index."""

    workload: Workload
    rng: random.Random

    def next(self) -> tuple[str, str]:
        kind = "chat" if self.rng.random() < self.workload.chat_fraction else "completions"
        n = self.rng.randint(*self.workload.prompt_words)
        return kind, " ".join(self.rng.choice(WORDS) for _ in range(n))


def add_locust_arguments(parser: Any) -> None:
    """Register the workload flags on locust's parser; each also reads $MOE_LOADTEST_<FLAG> (configargparse)."""
    d = Workload()
    flags: dict[str, tuple[dict[str, Any], str]] = {  # flag: (argparse keywords, help)
        "--prompt-words": ({"default": "{}:{}".format(*d.prompt_words)}, "prompt length in words, MIN:MAX (uniform)"),
        "--max-tokens": ({"type": int, "default": d.max_tokens}, "max_tokens of every request"),
        "--chat-fraction": ({"type": float, "default": d.chat_fraction}, "share of chat requests, 0..1"),
        "--rag": ({"action": "store_true"}, f"add retrieval {RAG_RETRIEVAL} to each body"),
        "--model": ({"default": ""}, "model (default: the first of GET /v1/models)"),
        "--rate": ({"type": float, "default": 0.0}, "total requests/s over all users (0: each user back to back)"),
        "--ignore-eos": ({"action": "store_true"}, "ask for exactly max_tokens tokens (ignore_eos extension)"),
        "--seed": ({"type": int, "default": d.seed}, "prompt seed"),
        "--records-file": ({"default": "", "include_in_web_ui": False}, "append one JSON line per request here"),
    }
    for flag, (keywords, help_text) in flags.items():
        env_var = "MOE_LOADTEST_" + flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, env_var=env_var, help=help_text, **keywords)  # not a group: web-UI keywords
