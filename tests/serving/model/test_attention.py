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
    assert meta.context_slots[0].tolist() == [20, 21, 22, 23, 8, 9]
    assert meta.context_slots[1, :3].tolist() == [28, 29, 30]
    assert meta.query_index.tolist() == [[0, 0, 0], [1, 2, 3]]
    assert meta.query_valid.tolist() == [[True, False, False], [True, True, True]]
    # the prefill's second query sees keys 0 and 1 only; the decode sees its whole context of 6
    assert meta.mask[1, 0, 1].tolist() == [True, True, False, False, False, False]
    assert meta.mask[0, 0, 0].tolist() == [True] * 6


def test_random_steps_match_the_definition():
    rng = random.Random(0)
    for _ in range(50):
        bs = rng.choice([1, 2, 4, 16])
        free = list(range(200))
        rng.shuffle(free)
        chunks = []
        for _ in range(rng.randint(1, 6)):
            cached, new = rng.randint(0, 40), rng.randint(1, 9)
            blocks = [free.pop() for _ in range(-(-(cached + new) // bs))]
            chunks.append(SequenceChunk(cached, new, blocks))
        meta, want = AttentionMetadata.build(chunks, bs), _reference(chunks, bs)
        assert meta.positions.tolist() == want["positions"]
        assert meta.slot_mapping.tolist() == want["slot_mapping"]
        for b, context in enumerate(want["contexts"]):
            assert meta.context_slots[b, : len(context)].tolist() == context
            assert int(meta.mask[b, 0, 0].sum()) == chunks[b].num_cached + 1  # first query: history + itself
        flat = torch.arange(meta.num_tokens)
        assert torch.equal(meta.unpad(meta.pad_queries(flat)), flat)  # padding round-trips the batch order
