"""Put retrieved passages in front of a request: the one RAG template, for chat and for raw prompts.

    >>> passages = [Passage(0.71, "docs/architecture.md", 3, "Each ExpertShard holds experts i..j.")]
    >>> fuse([{"role": "user", "content": "Where do experts live?"}], passages)
    [{'role': 'system', 'content': 'Use the numbered sources below ... [1] (source: docs/architecture.md)\\n...'},
     {'role': 'user', 'content': 'Where do experts live?'}]
    >>> fuse("Experts live on", passages)           # a completions prompt: the same block as a prefix
    'Use the numbered sources below ...\\n\\nExperts live on'

Chat: the sources go into the system message (appended to an existing first system message, so
templates that allow only one system message, first, still accept it). No passages: the input comes
back unchanged. Pure: the input is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

from serving.retrieval.store import Passage

INSTRUCTION = (
    "Use the numbered sources below to answer. Cite a source by its number, like [1]. "
    "If the sources do not contain the answer, say so instead of guessing."
)


def format_sources(passages: Sequence[Passage]) -> str:
    """The instruction and the numbered sources, one block per passage, in the order given (best first)."""
    blocks = [f"[{i}] (source: {p.source})\n{p.text.strip()}" for i, p in enumerate(passages, start=1)]
    return "\n\n".join([INSTRUCTION, *blocks])


def fuse(messages_or_prompt: list[dict[str, str]] | str, passages: Sequence[Passage]) -> list[dict[str, str]] | str:
    """Chat messages with the sources in the system message, or a prompt with the sources before it."""
    if not passages:
        return messages_or_prompt if isinstance(messages_or_prompt, str) else [dict(m) for m in messages_or_prompt]
    sources = format_sources(passages)
    if isinstance(messages_or_prompt, str):
        return f"{sources}\n\n{messages_or_prompt}"
    messages = [dict(m) for m in messages_or_prompt]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{sources}"
        return messages
    return [{"role": "system", "content": sources}, *messages]
