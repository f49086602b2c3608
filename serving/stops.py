"""Turning a request's output tokens into text deltas, and ending it at a stop string.

Text is streamed as it becomes final: a delta is held back while it ends in an incomplete UTF-8
character (byte-level BPE splits characters across tokens) or while its tail could still be the
start of a stop string. On a stop string, the text is cut before it, as OpenAI does.
"""

from __future__ import annotations

from serving.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what decoding half a UTF-8 character gives


class StopChecker:
    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...], num_prompt: int):
        self.tokenizer, self.stop, self.num_prompt = tokenizer, stop, num_prompt
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that could begin a stop string
        self.text = ""  # decoded output so far (final part)
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False

    def append(self, token_ids: list[int]) -> tuple[str, bool]:
        """Given the sequence's tokens after a new one, return (text delta safe to emit, stop string hit)."""
        if self.tokenizer is None or self.stopped:
            return "", self.stopped
        text = self.tokenizer.decode(token_ids[self.num_prompt :])
        if text.endswith(_INCOMPLETE):
            return "", False  # wait for the rest of the character
        searched_from = max(0, len(self.text) - self.hold)
        self.text = text
        hits = [at for s in self.stop if (at := text.find(s, searched_from)) != -1]
        if hits:  # cut before the earliest stop string
            self.text, self.stopped = text[: min(hits)], True
        if self.stopped:
            return self.flush(), True
        end = max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta, False

    def flush(self) -> str:
        """The held-back text, once the request has finished."""
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta
