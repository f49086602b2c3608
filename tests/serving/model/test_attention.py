"""AttentionMetadata from block tables: every index it computes with torch ops, checked against the
definition token by token (slot of token i = blocks[i // block_size] * block_size + i % block_size)."""

from __future__ import annotations

import random

import torch

from serving.model.attention import AttentionMetadata, SequenceChunk


def _reference(chunks: list[SequenceChunk], bs: int) -> dict[str, list]:
    """Per-token lists, built the slow, obvious way."""
    slot = lambda c, i: c.blocks[i // bs] * bs + i % bs  # noqa: E731
    return {
        "positions": [i for c in chunks for i in range(c.num_cached, c.num_cached + c.num_new)],
        "slot_mapping": [slot(c, i) for c in chunks for i in range(c.num_cached, c.num_cached + c.num_new)],
        "contexts": [[slot(c, i) for i in range(c.num_cached + c.num_new)] for c in chunks],
    }


def test_a_small_mixed_step_by_hand():
    # a decode of token 5 over blocks [5, 2] (slots 20..23, 8..11) and a 3-token prefill in block [7]
    meta = AttentionMetadata.build([SequenceChunk(5, 1, [5, 2]), SequenceChunk(0, 3, [7])], block_size=4)
    assert meta.positions.tolist() == [5, 0, 1, 2]
    assert meta.slot_mapping.tolist() == [9, 28, 29, 30]
    decode, prefill = meta.batches  # each in its own batch: the decode is not padded to the prefill's 3 queries
    assert (decode.tokens, prefill.tokens) == (slice(0, 1), slice(1, 4))
    assert decode.context_slots[0].tolist() == [20, 21, 22, 23, 8, 9]
    assert decode.query_index.tolist() == [[0]] and not decode.padded
    assert decode.mask[0, 0, 0].tolist() == [True] * 6
    assert prefill.context_slots[0].tolist() == [28, 29, 30]
    assert prefill.query_index.tolist() == [[0, 1, 2]]
    # the prefill's second query sees keys 0 and 1 only
    assert prefill.mask[0, 0, 1].tolist() == [True, True, False]


def test_batches_are_runs_of_decodes_and_of_prefill_chunks():
    chunks = [SequenceChunk(4, 1, [0, 1]), SequenceChunk(2, 1, [2]), SequenceChunk(0, 5, [3, 4]),
              SequenceChunk(0, 2, [5]), SequenceChunk(7, 1, [6, 7])]  # fmt: skip
    meta = AttentionMetadata.build(chunks, block_size=4)
    assert [b.tokens for b in meta.batches] == [slice(0, 2), slice(2, 9), slice(9, 10)]
    assert [tuple(b.query_index.shape) for b in meta.batches] == [(2, 1), (2, 5), (1, 1)]
    assert [b.padded for b in meta.batches] == [False, True, False]
    rows = torch.arange(meta.num_tokens)
    assert torch.equal(meta.per_batch(rows, lambda x, batch: batch.unpad(batch.pad_queries(x))), rows)


def test_random_steps_match_the_definition():
    rng = random.Random(0)
    for _ in range(50):
        bs = rng.choice([1, 2, 4, 16])
        free = list(range(200))
        rng.shuffle(free)
        chunks = []
        for _ in range(rng.randint(1, 6)):
            cached, new = rng.randint(0, 40), rng.choice([1, 1, rng.randint(1, 9)])
            blocks = [free.pop() for _ in range(-(-(cached + new) // bs))]
            chunks.append(SequenceChunk(cached, new, blocks))
        meta, want = AttentionMetadata.build(chunks, bs), _reference(chunks, bs)
        assert meta.positions.tolist() == want["positions"]
        assert meta.slot_mapping.tolist() == want["slot_mapping"]
        sequences = [(batch, b) for batch in meta.batches for b in range(batch.query_index.shape[0])]
        assert len(sequences) == len(chunks)
        for (batch, b), chunk, context in zip(sequences, chunks, want["contexts"], strict=True):
            assert batch.context_slots[b, : len(context)].tolist() == context
            assert int(batch.mask[b, 0, 0].sum()) == chunk.num_cached + 1  # first query: history + itself
        flat = torch.arange(meta.num_tokens)
        # padding round-trips the batch order
        assert torch.equal(meta.per_batch(flat, lambda x, batch: batch.unpad(batch.pad_queries(x))), flat)
