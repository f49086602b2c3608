"""Chunking: token limits, sentence and paragraph boundaries, overlap, determinism, stable ids.

Most tests count one token per whitespace-separated word (additive over whitespace, like WordPiece);
one test checks the real MiniLM tokenizer.
"""

from __future__ import annotations

import uuid

import pytest

from serving.retrieval.chunking import Chunk, chunk_text, point_id


def words(text: str) -> int:
    return len(text.split())


def sentence(i: int, n: int = 10) -> str:
    """A sentence of n words that names its number, e.g. 's3w0 s3w1 ... s3w9.'"""
    return " ".join(f"s{i}w{j}" for j in range(n)) + "."


def paragraph(first: int, count: int) -> str:
    return " ".join(sentence(i) for i in range(first, first + count))


def test_chunks_stay_within_max_tokens_and_cover_every_sentence():
    text = "\n\n".join(paragraph(p * 7, 7) for p in range(5))  # 5 paragraphs x 7 sentences x 10 words
    chunks = chunk_text(text, "doc.md", words, max_tokens=50, overlap_tokens=10)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(words(c.text) <= 50 for c in chunks)
    for i in range(35):
        assert any(sentence(i) in c.text for c in chunks), f"sentence {i} is in no chunk"


def test_chunks_cut_between_sentences_and_overlap_by_whole_sentences():
    text = paragraph(0, 20)  # one paragraph of 20 ten-word sentences
    chunks = chunk_text(text, "doc.md", words, max_tokens=45, overlap_tokens=20)
    for c in chunks:
        assert c.text.startswith("s") and c.text.endswith("."), c.text  # whole sentences only
    for prev, nxt in zip(chunks, chunks[1:], strict=False):
        shared = [s for s in prev.text.split(". ") if s.rstrip(".") + "." in nxt.text]
        assert 1 <= len(shared) <= 2  # 10-word sentences in a 20-token overlap
        assert nxt.text.startswith(shared[0])


def test_zero_overlap_partitions_the_text():
    text = paragraph(0, 12)
    chunks = chunk_text(text, "doc.md", words, max_tokens=30, overlap_tokens=0)
    assert " ".join(c.text for c in chunks) == text


def test_a_paragraph_that_does_not_fit_starts_a_new_chunk():
    first, second = paragraph(0, 6), paragraph(6, 6)  # 60 tokens each
    chunks = chunk_text(f"{first}\n\n{second}", "doc.md", words, max_tokens=100, overlap_tokens=0)
    assert [c.text for c in chunks] == [first, second]


def test_small_paragraphs_share_a_chunk_and_keep_their_formatting():
    text = "# Title\n\nFirst short paragraph.\n\n- item one\n- item two\n"
    [chunk] = chunk_text(text, "doc.md", words, max_tokens=100, overlap_tokens=10)
    assert chunk.text == text.rstrip()


def test_a_sentence_longer_than_max_tokens_is_split_at_spaces():
    text = " ".join(f"w{i}" for i in range(250))  # no punctuation at all
    chunks = chunk_text(text, "doc.md", words, max_tokens=100, overlap_tokens=0)
    assert all(words(c.text) <= 100 for c in chunks)
    assert " ".join(c.text for c in chunks) == text


def test_a_word_longer_than_max_tokens_is_split_by_characters():
    text = "x" * 500
    chunks = chunk_text(text, "doc.md", len, max_tokens=100, overlap_tokens=0)  # one token per character
    assert all(len(c.text) <= 100 for c in chunks)
    assert "".join(c.text for c in chunks) == text


def test_chunking_is_deterministic_and_blank_text_has_no_chunks():
    text = "\n\n".join(paragraph(p * 5, 5) for p in range(4))
    assert chunk_text(text, "a.md", words, max_tokens=40, overlap_tokens=10) == chunk_text(
        text, "a.md", words, max_tokens=40, overlap_tokens=10
    )
    assert chunk_text(" \n\n\t\n", "a.md", words) == []


@pytest.mark.parametrize("max_tokens, overlap", [(0, 0), (50, 50), (50, -1)])
def test_bad_limits_are_refused(max_tokens, overlap):
    with pytest.raises(ValueError, match="max_tokens|overlap_tokens"):
        chunk_text("some text.", "a.md", words, max_tokens=max_tokens, overlap_tokens=overlap)


def test_point_ids_are_stable_and_distinct():
    # Changing this scheme would duplicate every stored chunk at the next ingest: keep the value.
    assert point_id("docs/x.md", 0) == uuid.UUID("0b416b48-7d53-51d3-9152-33278c4178b1")
    assert Chunk("docs/x.md", 0, "any text").point_id == point_id("docs/x.md", 0)
    ids = {point_id(s, i) for s in ("a.md", "b.md", "a.md#1") for i in range(3)}
    assert len(ids) == 9


def test_real_tokenizer_counts_add_up_over_units():
    """MiniLM's WordPiece never merges across whitespace, so no chunk exceeds the limit once re-tokenised."""
    from transformers import AutoTokenizer

    from serving.retrieval.embedder import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    from importlib.resources import files

    text = files("serving").joinpath("demo_data/corpus.txt").read_text(encoding="utf-8")[:12000]
    chunks = chunk_text(text, "corpus.txt", count)  # defaults: 200 tokens, 40 overlap
    assert len(chunks) > 5
    sizes = [count(c.text) for c in chunks]
    assert max(sizes) <= 200
    assert min(sizes[:-1]) >= 100  # packed, not one sentence per chunk
