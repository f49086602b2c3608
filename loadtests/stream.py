"""Timing one streamed OpenAI response, with the definitions of vLLM's serving benchmark (`vllm bench serve`).

All times are seconds, measured from `sent`, the moment just before the request is written:

- TTFT: until the first chunk that carries content (completions: `choices[0].text`; chat:
  `choices[0].delta.content`). Role-only chunks, empty chunks and the usage chunk do not count.
- ITL: the gaps between successive content chunks of one request; a run collects every gap of every
  request into one distribution. A chunk that carries several tokens is still one gap.
- E2E: until the stream ends (`data: [DONE]`).
- output tokens: `usage.completion_tokens` of the last chunk that has usage (the client asks for it
  with `stream_options.include_usage`), else the number of content chunks.
- prompt tokens: `usage.prompt_tokens` of that chunk (what the server's tokenizer made of the prompt),
  None without usage.
- TPOT: (last content chunk - first content chunk) / (output tokens - 1), i.e. the request's ITL gaps
  summed over its output tokens less one; defined only for requests with more than one output token.
  It ends at the last token, as vLLM's (whose latency ends at the last chunk with choices) and
  guidellm's per-request ITL do: the usage chunk and [DONE] after it are in E2E, not in TPOT.

A request fails on a stream error event (`data: {"error": ...}`), on a stream that ends without
[DONE], or when no chunk carried content (there is no TTFT; vLLM's benchmark fails these too). The
caller adds HTTP-level failures (status, connection errors).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

NO_CONTENT = "no chunk carried content (no TTFT)"  # the stream was whole, but its tokens decoded to no text


@dataclass
class Timing:
    """What one request measured. `error` is None for a request that succeeded."""

    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    content_chunks: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return sum(self.itl) / (self.output_tokens - 1)  # the gaps span first content chunk -> last

    def record(self, **extra: Any) -> dict[str, Any]:
        """The JSON line the runner reads (see summary.Record)."""
        return {
            **extra,
            "ok": self.error is None,
            "error": self.error,
            "ttft": self.ttft,
            "itl": self.itl,
            "e2e": self.e2e,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
        }


def chunk_content(event: dict[str, Any]) -> str:
    """The generated text a completions or chat chunk carries ('' for role-only, usage or empty chunks)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


def time_stream(lines: Iterable[bytes | str], sent: float, clock: Callable[[], float]) -> Timing:
    """Read server-sent-event lines as they arrive and time them; `clock()` is read once per line."""
    timing = Timing()
    last_content: float | None = None
    usage_tokens: int | None = None
    done = False
    for raw in lines:
        now = clock()
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            timing.error = f"stream error: {(event['error'] or {}).get('message', event['error'])}"
            break
        if event.get("usage"):
            usage_tokens = event["usage"].get("completion_tokens", usage_tokens)
            timing.prompt_tokens = event["usage"].get("prompt_tokens", timing.prompt_tokens)
        if chunk_content(event):
            timing.content_chunks += 1
            if last_content is None:
                timing.ttft = now - sent
            else:
                timing.itl.append(now - last_content)
            last_content = now
    timing.e2e = clock() - sent
    timing.output_tokens = usage_tokens if usage_tokens is not None else timing.content_chunks
    if timing.error is None and not done:
        timing.error = "stream ended without data: [DONE]"
    elif timing.error is None and timing.ttft is None:
        timing.error = NO_CONTENT
    return timing
