"""The RAG template: numbered sources in the system message for chat, as a prefix for raw prompts."""

from __future__ import annotations

from serving.retrieval.rag import INSTRUCTION, format_sources, fuse
from serving.retrieval.store import Passage

PASSAGES = [
    Passage(0.8, "docs/architecture.md", 2, "Each ExpertShard holds experts i..j of every layer.\n"),
    Passage(0.5, "README.md", 0, "Auth keys live in $MOE_SERVE_API_KEYS."),
]
SOURCES = (
    f"{INSTRUCTION}\n\n"
    "[1] (source: docs/architecture.md)\nEach ExpertShard holds experts i..j of every layer.\n\n"
    "[2] (source: README.md)\nAuth keys live in $MOE_SERVE_API_KEYS."
)


def test_sources_are_numbered_in_the_order_given():
    assert format_sources(PASSAGES) == SOURCES
    assert INSTRUCTION.startswith("Use the numbered sources below")


def test_chat_gets_a_system_message_with_the_sources():
    messages = [{"role": "user", "content": "Where do experts live?"}]
    assert fuse(messages, PASSAGES) == [
        {"role": "system", "content": SOURCES},
        {"role": "user", "content": "Where do experts live?"},
    ]
    assert messages == [{"role": "user", "content": "Where do experts live?"}]  # input untouched


def test_an_existing_system_message_is_extended_not_duplicated():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    fused = fuse(messages, PASSAGES)
    assert fused[0] == {"role": "system", "content": f"Be brief.\n\n{SOURCES}"}
    assert fused[1:] == messages[1:]
    assert messages[0]["content"] == "Be brief."


def test_a_raw_prompt_gets_the_sources_as_a_prefix():
    assert fuse("Experts live on", PASSAGES) == f"{SOURCES}\n\nExperts live on"


def test_no_passages_leaves_the_request_as_it_was():
    messages = [{"role": "user", "content": "Hi"}]
    assert fuse(messages, []) == messages
    assert fuse("Hi", []) == "Hi"
