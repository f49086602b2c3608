"""Turning a request's output tokens into text deltas, and ending it at a stop string.

Text is streamed as it becomes final: a delta is held back while it ends in an incomplete UTF-8
character (byte-level BPE splits characters across tokens; the IncrementalDetokenizer holds those)
or while its tail could still be the start of a stop string. On a stop string, the text is cut
before it, as OpenAI does.

Cost per token is O(window + longest stop string), not O(output so far): the detokenizer decodes a
short window of ids, and only the text not yet emitted (at most `hold` characters plus the newest
delta) is searched, since any stop string that ends in new text starts within it.
"""

from __future__ import annotations

from serving.tokenizer import IncrementalDetokenizer, Tokenizer

_INCOMPLETE = "\ufffd"  # what decoding half a UTF-8 character gives


class StopChecker:
    """>>> stops = StopChecker(tokenizer, stop=("\\n\\n",))
    >>> delta, stopped = stops.append(token_id)     # once per generated token
    >>> tail = stops.flush()                         # once, when the request finishes
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]):
        self.stop = stop
        # The output is decoded without the prompt as context, so its text equals decode(output ids).
        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that could begin a stop string
        self.pending = ""  # final text not yet returned: always short (see the module docstring)
        self.stopped = False

    def append(self, token_id: int) -> tuple[str, bool]:
        """After a new output token: (text delta safe to emit, whether a stop string was hit)."""
        if self.detokenizer is None or self.stopped:
            return "", self.stopped
        delta = self.detokenizer.push([token_id])
        if not delta:
            return "", False  # an incomplete character, or nothing new to show
        searched_from = max(0, len(self.pending) - self.hold)
        self.pending += delta
        hits = [at for s in self.stop if (at := self.pending.find(s, searched_from)) != -1]
        if hits:  # cut before the earliest stop string
            self.pending, self.stopped = self.pending[: min(hits)], True
            return self.flush(), True
        ready = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:ready], self.pending[ready:]
        return out, False

    def flush(self) -> str:
        """The held-back text, once the request has finished. A character still incomplete at the end
        (the output stopped mid-character) is dropped rather than shown as U+FFFD."""
        if self.detokenizer is not None and not self.stopped:
            self.pending += self.detokenizer.flush().rstrip(_INCOMPLETE)
        out, self.pending = self.pending, ""
        return out
