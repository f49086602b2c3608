"""Attention over a paged KV cache, for a batch that mixes prefill chunks and decode steps.

Shape legend:
    T = new tokens in this step, all sequences flattened in batch order
    B = sequences in one attention batch, Q = most new tokens of one of them, L = longest context
    S = cache slots (blocks x block_size), H = query heads, Hkv = key/value heads, Dh = head width

Every layer writes the rows of its new tokens into its cache at `slot_mapping`, then, per attention
batch, gathers each sequence's whole context through `context_slots` and runs one padded call. The
metadata is built once per step (by the model runner) and shared by every layer.

Why batches: one padded call pads every sequence to the step's longest chunk. A step that runs 32
decodes beside one 100-token prefill chunk would compute 32 x 100 query rows for 32 real ones, so
attention would cost ~Q times what it needs (measured on the bench model under load: 28% of the
router's time). Consecutive decodes (Q = 1, no padding at all) and consecutive prefill chunks are
batched apart instead; the model runner puts decodes first, so a step has at most two batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serving.model.layers import RMSNorm
from serving.model.rope import RotaryEmbedding


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: `num_new` tokens after `num_cached` already in the cache."""

    num_cached: int
    num_new: int
    blocks: list[
        int
    ]  # the sequence's block table: token i lives in slot blocks[i // block_size] * block_size + i % block_size

    @property
    def is_decode(self) -> bool:
        return self.num_new == 1


@dataclass(frozen=True)
class AttentionBatch:
    """Consecutive sequences of a step attended in one padded call: their new tokens are the step's
    flat rows `tokens` (a range), padded to [B, Q] queries against [B, L] context rows."""

    tokens: slice  # this batch's rows of the step's [T] flat tokens
    query_index: Tensor  # [B, Q] index of each sequence's new tokens within `tokens` (padding: 0)
    query_valid: Tensor  # [B, Q] bool, False on padding
    context_slots: Tensor  # [B, L] cache slots of each sequence's context (padding: a slot of block 0, masked)
    mask: Tensor  # [B, 1, Q, L] bool, True where a query may attend to a key
    padded: bool  # False when every sequence has Q new tokens: padding is a view, no gather

    def pad_queries(self, x: Tensor) -> Tensor:
        """[T_batch, ...] this batch's flat rows -> [B, Q, ...] padded per sequence."""
        if not self.padded:
            return x.view(*self.query_index.shape, *x.shape[1:])
        return x[self.query_index]

    def unpad(self, x: Tensor) -> Tensor:
        """[B, Q, ...] padded rows -> [T_batch, ...] flat, in batch order."""
        if not self.padded:
            return x.reshape(-1, *x.shape[2:])
        return x[self.query_valid]


@dataclass(frozen=True)
class AttentionMetadata:
    positions: Tensor  # [T] absolute position of each new token
    slot_mapping: Tensor  # [T] cache slot each new token is written to
    batches: tuple[AttentionBatch, ...]  # in token order: batch i's rows follow batch i-1's

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def per_batch(self, rows: Tensor, attend: Callable[[Tensor, AttentionBatch], Tensor]) -> Tensor:
        """`attend(a batch's rows [T_batch, ...], batch) -> [T_batch, ...]` over every batch: [T, ...]."""
        outs = [attend(rows[batch.tokens], batch) for batch in self.batches]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @classmethod
    def build(
        cls, chunks: list[SequenceChunk], block_size: int, device: torch.device | str = "cpu"
    ) -> AttentionMetadata:
        """The step's metadata from its chunks: one attention batch per run of consecutive decodes or
        consecutive prefill chunks. Python touches only per-sequence numbers and block tables (NB ints
        per sequence, copied once into one tensor); every per-token index, the context slots and the mask
        are computed by torch ops, so host work per step does not grow with context length token by token."""
        batches, positions, slots = [], [], []
        first_token = 0
        for run in _runs(chunks):
            batch, batch_positions, batch_slots = _batch(run, first_token, block_size, device)
            batches.append(batch)
            positions.append(batch_positions)
            slots.append(batch_slots)
            first_token = batch.tokens.stop
        return cls(positions=torch.cat(positions).to(device), slot_mapping=torch.cat(slots).to(device),
                   batches=tuple(batches))  # fmt: skip


def _runs(chunks: list[SequenceChunk]) -> list[list[SequenceChunk]]:
    """`chunks` cut where decodes meet prefill chunks, order kept."""
    runs: list[list[SequenceChunk]] = []
    for chunk in chunks:
        if runs and runs[-1][-1].is_decode == chunk.is_decode:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


def _batch(
    chunks: list[SequenceChunk], first_token: int, block_size: int, device: torch.device | str
) -> tuple[AttentionBatch, Tensor, Tensor]:
    """One attention batch over `chunks`, whose tokens start at flat row `first_token`; with the
    positions [T_batch] and cache slots [T_batch] of its new tokens (on the host)."""
    max_q = max(c.num_new for c in chunks)
    max_l = max(c.num_cached + c.num_new for c in chunks)
    max_blocks = -(-max_l // block_size)  # NB
    table = torch.tensor([c.blocks[:max_blocks] + [0] * (max_blocks - len(c.blocks)) for c in chunks])  # [B, NB]
    cached = torch.tensor([c.num_cached for c in chunks])  # [B]
    new = torch.tensor([c.num_new for c in chunks])  # [B]
    lengths = cached + new  # [B]
    q = torch.arange(max_q)  # [Q]
    k = torch.arange(max_l)  # [L]
    context_slots = table[:, k // block_size] * block_size + k % block_size  # [B, L]
    query_valid = q[None, :] < new[:, None]  # [B, Q]
    query_pos = cached[:, None] + q[None, :]  # [B, Q] absolute position of each query
    first = torch.cumsum(new, 0) - new  # [B] index of each sequence's first new token in this batch
    query_index = torch.where(query_valid, first[:, None] + q[None, :], 0)  # [B, Q]
    # Row-major over (sequence, query): the batch order of the flat tokens.
    positions = query_pos[query_valid]  # [T_batch]
    slot_mapping = context_slots.gather(1, query_pos.clamp(max=max_l - 1))[query_valid]  # [T_batch]
    # causal within the context; padding keys (k >= length) are never attended to
    mask = (k[None, None, :] <= query_pos[:, :, None]) & (k[None, None, :] < lengths[:, None, None])
    # Padding queries attend to key 0 only, so that no SDPA row is fully masked (NaN); their
    # outputs are dropped by `query_valid`.
    mask = mask | (~query_valid[:, :, None] & (k == 0)[None, None, :])  # [B, Q, L]
    num_tokens = sum(c.num_new for c in chunks)
    batch = AttentionBatch(
        tokens=slice(first_token, first_token + num_tokens),
        query_index=query_index.to(device),
        query_valid=query_valid.to(device),
        context_slots=context_slots.to(device),
        mask=mask[:, None].to(device),
        padded=any(c.num_new != max_q for c in chunks),
    )
    return batch, positions, slot_mapping


def write_cache(cache: Tensor, rows: Tensor, meta: AttentionMetadata) -> None:
    """Store this step's rows [T, *R] at their slots of `cache` [S, *R]."""
    cache[meta.slot_mapping] = rows.to(cache.dtype)


class GQAttention(nn.Module):
    """Grouped-query attention with the variants of Mixtral, Qwen2/3-MoE and OLMoE.

    Parameter names follow the Hugging Face checkpoints (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm).
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: str,
        clip_qkv: float | None,
        eps: float,
    ):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.clip_qkv = clip_qkv
        self.qk_norm = qk_norm
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        if qk_norm == "per_head":  # Qwen3: one RMSNorm over each head's Dh
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        elif qk_norm == "full":  # OLMoE: one RMSNorm over all heads together
            self.q_norm, self.k_norm = RMSNorm(heads * head_dim, eps), RMSNorm(kv_heads * head_dim, eps)

    def cache_shapes(self) -> list[tuple[int, ...]]:
        """Per-token rows this layer keeps in its cache: keys and values."""
        return [(self.kv_heads, self.head_dim), (self.kv_heads, self.head_dim)]

    def forward(self, x: Tensor, meta: AttentionMetadata, cache: list[Tensor], rope: RotaryEmbedding) -> Tensor:
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, H*Dh], [T, Hkv*Dh] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.heads, self.head_dim)  # [T, H, Dh]
        k = k.view(T, self.kv_heads, self.head_dim)  # [T, Hkv, Dh]
        v = v.view(T, self.kv_heads, self.head_dim)  # [T, Hkv, Dh]
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, meta.positions), rope(k, meta.positions)
        write_cache(cache[0], k, meta)
        write_cache(cache[1], v, meta)
        out = meta.per_batch(q, lambda rows, batch: self._attend(rows, batch, cache))  # [T, H, Dh]
        return self.o_proj(out.reshape(T, self.heads * self.head_dim))  # [T, D]

    def _attend(self, q: Tensor, batch: AttentionBatch, cache: list[Tensor]) -> Tensor:
        """One batch's queries [T_batch, H, Dh] over its sequences' cached keys and values -> [T_batch, H, Dh]."""
        keys = cache[0][batch.context_slots]  # [B, L, Hkv, Dh]
        values = cache[1][batch.context_slots]  # [B, L, Hkv, Dh]
        queries = batch.pad_queries(q)  # [B, Q, H, Dh]
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),  # [B, H, Q, Dh]
            keys.transpose(1, 2).to(q.dtype),  # [B, Hkv, L, Dh]
            values.transpose(1, 2).to(q.dtype),  # [B, Hkv, L, Dh]
            attn_mask=batch.mask,  # [B, 1, Q, L]
            enable_gqa=self.heads != self.kv_heads,
        )  # [B, H, Q, Dh]
        return batch.unpad(out.transpose(1, 2))  # [T_batch, H, Dh]
