"""Engine logprobs (TokenLogprobs) in OpenAI's two formats, with each token's text and bytes.

>>> texts = TokenTexts(tokenizer)
>>> completion_logprobs(out.new_logprobs, texts, offset=0)   # {"tokens", "token_logprobs", "top_logprobs", ...}
>>> echo_logprobs(prompt_ids, first.prompt_logprobs, texts, top_n=1)   # the same for the prompt (echo)
>>> chat_logprobs(out.new_logprobs, texts)                     # {"content": [{"token", "logprob", "bytes", ...}]}
>>> prompt_logprobs(first.prompt_logprobs, texts, top_n=1)    # vLLM's prompt_logprobs extension

A token's text is the text of its own bytes: with byte-level BPE one token may hold part of a UTF-8
character, so its text then shows U+FFFD while `bytes` (chat format) keeps the exact bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from serving.api.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprobs,
    PromptTokenLogprob,
    TopLogprob,
)
from serving.engine_client import TokenLogprobs
from serving.tokenizer import Tokenizer

# OpenAI reports this for tokens whose probability underflows; JSON has no -inf.
MIN_LOGPROB = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback tokens
_SPIECE_SPACE = "\u2581"  # SentencePiece's word-start marker


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character: printable Latin-1 bytes as themselves,
    the rest (controls, space, ...) as code points from 256 up, in byte order. Returns char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class TokenTexts:
    """Token id -> (text, bytes), computed once per id."""

    def __init__(self, tokenizer: Tokenizer):
        # The wrapper has no public id -> token-string call; the HF tokenizer it wraps does.
        self._hf = tokenizer._hf
        decoder = self._hf.backend_tokenizer.decoder
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._alphabet = _byte_level_alphabet()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def text(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._lookup(token_id)[1]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            raw = self._raw_bytes(token_id)
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token_id]

    def _raw_bytes(self, token_id: int) -> bytes:
        token = self._hf.convert_ids_to_tokens(token_id)
        if token is None:  # an id past the tokenizer's vocabulary (the embedding may be larger)
            return b""
        if self._byte_level and all(ch in self._alphabet for ch in token):
            return bytes(self._alphabet[ch] for ch in token)
        if match := _BYTE_TOKEN.fullmatch(token):
            return bytes([int(match.group(1), 16)])
        return token.replace(_SPIECE_SPACE, " ").encode("utf-8")  # special tokens, SentencePiece pieces


def _clamp(logprob: float) -> float:
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN (comparison is False)


def completion_logprobs(entries: Sequence[TokenLogprobs], texts: TokenTexts, offset: int) -> CompletionLogprobs:
    """/v1/completions format; `offset` is where the first token's text starts in the returned text.
    Each `top_logprobs` dict holds the N best tokens and the chosen one (as OpenAI: up to N + 1 entries)."""
    out = CompletionLogprobs()
    for entry in entries:
        offset = _add(out, entry.token_id, entry, texts, offset, len(entry.top))
    return out


def echo_logprobs(
    prompt_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], texts: TokenTexts, top_n: int
) -> CompletionLogprobs:
    """The prompt's tokens in /v1/completions format (echo with logprobs), from the text's start: the first has
    no logprob (null), as OpenAI. The engine may have scored more alternatives than `top_n`; these keep `top_n`."""
    out, offset = CompletionLogprobs(), 0
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        offset = _add(out, token_id, entry, texts, offset, top_n)
    return out


def _add(
    out: CompletionLogprobs, token_id: int, entry: TokenLogprobs | None, texts: TokenTexts, offset: int, top_n: int
) -> int:
    """Append one token; returns where the next one starts."""
    text = texts.text(token_id)
    out.tokens.append(text)
    out.text_offset.append(offset)
    if entry is None:
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
    else:
        top = {texts.text(t): _clamp(lp) for t, lp in entry.top[:top_n]}
        top.setdefault(text, _clamp(entry.logprob))
        out.token_logprobs.append(_clamp(entry.logprob))
        out.top_logprobs.append(top)
    return offset + len(text)


def prompt_logprobs(entries: Sequence[TokenLogprobs | None], texts: TokenTexts, top_n: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` format: per prompt token null (the first) or {token id: logprob, rank, text}
    for the prompt's token (first) and its `top_n` best rivals (ranks 1..top_n)."""
    out: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        position = {entry.token_id: PromptTokenLogprob(logprob=_clamp(entry.logprob), rank=entry.rank,
                                                       decoded_token=texts.text(entry.token_id))}  # fmt: skip
        for rank, (token_id, logprob) in enumerate(entry.top[:top_n], start=1):
            position.setdefault(
                token_id, PromptTokenLogprob(logprob=_clamp(logprob), rank=rank, decoded_token=texts.text(token_id))
            )
        out.append(position)
    return out


def chat_logprobs(entries: Sequence[TokenLogprobs], texts: TokenTexts) -> ChatLogprobs:
    """/v1/chat/completions format: per token its text, logprob, bytes and the N best alternatives."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=texts.text(e.token_id),
                logprob=_clamp(e.logprob),
                bytes=texts.bytes(e.token_id),
                top_logprobs=[
                    TopLogprob(token=texts.text(t), logprob=_clamp(lp), bytes=texts.bytes(t)) for t, lp in e.top
                ],
            )
            for e in entries
        ]
    )
