"""Split a document into overlapping chunks of at most `max_tokens` model tokens.

    >>> chunks = chunk_text(open("docs/architecture.md").read(), "docs/architecture.md", embedder.count_tokens)
    >>> chunks[0].source, chunks[0].index, chunks[0].text[:14]
    ('docs/architecture.md', 0, '# Architecture')
    >>> chunks[0].point_id          # uuid5 of (source, index): re-ingesting a file overwrites its points
    UUID('...')

How the text is cut (deterministic: the same text and settings give the same chunks):
1. Units: sentences, and single lines (headings, list items, table rows, code), never crossing a
   blank line. A unit longer than `max_tokens` is halved at the space nearest its middle (or at its
   middle character, for one very long word) until every piece fits.
2. Units are packed greedily into a chunk while it stays within `max_tokens`. A paragraph that
   would not fit whole starts a new chunk once the current one is at least half full, so chunks
   tend to end where paragraphs end.
3. Each next chunk starts again with the last whole units of the previous chunk that fit in
   `overlap_tokens` (never its first unit), so context that straddles a cut is in both chunks.
A chunk's text is the slice of the document from its first unit to its last, formatting kept.
Token counts are summed per unit, which is exact for WordPiece tokenizers (MiniLM's): they never
merge tokens across whitespace.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 200
DEFAULT_OVERLAP_TOKENS = 40

# A paragraph: a run of text without a blank line in it.
_PARAGRAPH = re.compile(r"(?:[^\n]|\n(?![ \t]*(?:\n|\Z)))+")
# A sentence inside one line: up to . ! or ? (plus closing quotes/brackets) before a space, or to the line end.
_SENTENCE = re.compile(r"\S(?:[^\n]*?[.!?][\"')\]]*(?=\s)|[^\n]*)")


def point_id(source: str, index: int) -> uuid.UUID:
    """The stable id of chunk `index` of `source`: the same on every machine and every ingest."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"moe-serve:chunk:{index}:{source}")


@dataclass(frozen=True)
class Chunk:
    """Chunk `index` (0-based, in document order) of the document `source`."""

    source: str
    index: int
    text: str

    @property
    def point_id(self) -> uuid.UUID:
        return point_id(self.source, self.index)


@dataclass(frozen=True)
class _Unit:
    start: int  # character span in the document
    end: int
    tokens: int
    paragraph: int


def chunk_text(
    text: str,
    source: str,
    count_tokens: Callable[[str], int],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> list[Chunk]:
    """The chunks of `text` (none for blank text); `count_tokens` counts model tokens without special tokens."""
    if max_tokens < 1:
        raise ValueError(f"chunk max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"chunk overlap_tokens must be in [0, max_tokens={max_tokens}), got {overlap_tokens}")
    units = _units(text, count_tokens, max_tokens)
    return [
        Chunk(source, index, text[units[first].start : units[last].end])
        for index, (first, last) in enumerate(_pack(units, max_tokens, overlap_tokens))
    ]


def _units(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[_Unit]:
    units = []
    for paragraph, para in enumerate(_PARAGRAPH.finditer(text)):
        for sentence in _SENTENCE.finditer(text, para.start(), para.end()):
            start, end = sentence.start(), sentence.start() + len(sentence.group().rstrip())
            units.extend(_fit(text, start, end, paragraph, count_tokens, max_tokens))
    return units


def _fit(text: str, start: int, end: int, paragraph: int, count_tokens, max_tokens: int) -> list[_Unit]:
    """The span as one unit, or halved (recursively) until each piece has <= max_tokens tokens."""
    tokens = count_tokens(text[start:end])
    if tokens <= max_tokens or end - start < 2:
        return [_Unit(start, end, tokens, paragraph)]
    middle = (start + end) // 2
    spaces = [m.start() for m in re.finditer(r"\s+", text[start:end])]
    if spaces:  # cut at the space nearest the middle; the pieces do not include it
        cut = start + min(spaces, key=lambda s: abs(start + s - middle))
        left_end, right_start = cut, cut + len(re.match(r"\s+", text[cut:end]).group())
    else:
        left_end = right_start = middle
    return _fit(text, start, left_end, paragraph, count_tokens, max_tokens) + _fit(
        text, right_start, end, paragraph, count_tokens, max_tokens
    )


def _pack(units: list[_Unit], max_tokens: int, overlap_tokens: int) -> list[tuple[int, int]]:
    """(first, last) unit index of each chunk."""
    paragraph_tokens: dict[int, int] = {}
    for u in units:
        paragraph_tokens[u.paragraph] = paragraph_tokens.get(u.paragraph, 0) + u.tokens

    chunks = []
    first = nxt = 0  # the chunk is units[first:nxt]; units before nxt are in some chunk already
    while nxt < len(units):
        used = sum(u.tokens for u in units[first:nxt])  # the overlap carried from the previous chunk
        while first < nxt and used + units[nxt].tokens > max_tokens:  # overlap gives way to new text
            used -= units[first].tokens
            first += 1
        used += units[nxt].tokens
        nxt += 1
        while nxt < len(units) and used + units[nxt].tokens <= max_tokens:
            u = units[nxt]
            new_paragraph = u.paragraph != units[nxt - 1].paragraph
            if new_paragraph and 2 * used >= max_tokens and used + paragraph_tokens[u.paragraph] > max_tokens:
                break  # end here rather than split a paragraph that could start the next chunk
            used += u.tokens
            nxt += 1
        chunks.append((first, nxt - 1))
        # Next chunk's overlap: the trailing units that fit in overlap_tokens, never this chunk's first.
        carried, start = 0, nxt
        while start - 1 > first and carried + units[start - 1].tokens <= overlap_tokens:
            start -= 1
            carried += units[start].tokens
        first = start
    return chunks
