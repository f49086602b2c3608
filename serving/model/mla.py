"""DeepSeek multi-head latent attention (MLA), over the same paged cache as GQAttention.

Shape legend: T, B, Q, L as in attention.py; H = heads, R = kv_lora_rank (latent width),
P = qk_rope_head_dim, N = qk_nope_head_dim, V = v_head_dim.

Why MLA caches so little: keys and values of all heads are decompressed from one latent of width
R plus one rotary key of width P shared by every head, so a token costs R + P numbers per layer
instead of 2 x H x head_dim. We cache exactly that (the normalised latent and the rotated shared
key) and attend in latent space (see `forward`), never decompressing the context.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from serving.model.attention import AttentionBatch, AttentionMetadata, write_cache
from serving.model.config import MLAConfig
from serving.model.layers import LinearWeight, RMSNorm
from serving.model.rope import RotaryEmbedding


class MLAttention(nn.Module):
    """Parameter names follow the Hugging Face DeepSeek-V3 checkpoints."""

    def __init__(self, hidden: int, heads: int, mla: MLAConfig, bias: bool, eps: float, softmax_scale: float):
        super().__init__()
        self.heads, self.mla, self.softmax_scale = heads, mla, softmax_scale
        qk = mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk, bias=False)
        else:  # queries through their own low-rank bottleneck
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, eps)
        # expands a latent to every head's key and value: loaded under the checkpoints' name, then split by
        # `absorb` into the two layouts `forward` multiplies with, and never run as a layer
        self.kv_b_proj = LinearWeight(mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim))
        self.o_proj = nn.Linear(heads * mla.v_head_dim, hidden, bias=bias)

    def absorb(self) -> None:
        """Once, after the weights are loaded: replace kv_b_proj [H*(N+V), R] by w_uk [H, N, R] and w_uv_t
        [H, R, V], each contiguous, the layouts `forward`'s batched matmuls read without a copy. (Read from the
        one weight, W_uv^T was copied on every call: 9% of a bench decode step at one sequence.) Memory stays
        one copy."""
        H, m = self.heads, self.mla
        w = self.kv_b_proj.weight.view(H, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)  # [H, N+V, R]
        self.w_uk = nn.Parameter(w[:, : m.qk_nope_head_dim].contiguous(), requires_grad=False)  # [H, N, R]
        self.w_uv_t = nn.Parameter(w[:, m.qk_nope_head_dim :].transpose(1, 2).contiguous(), requires_grad=False)
        del self.kv_b_proj

    def cache_shapes(self) -> list[tuple[int, ...]]:
        """Per-token row in the cache: the latent and the rotated shared key, side by side."""
        return [(self.mla.kv_lora_rank + self.mla.qk_rope_head_dim,)]

    def forward(self, x: Tensor, meta: AttentionMetadata, cache: list[Tensor], rope: RotaryEmbedding) -> Tensor:
        T, H, m = x.shape[0], self.heads, self.mla
        R, P, N, V = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
        if m.q_lora_rank is None:
            q = self.q_proj(x)  # [T, H*(N+P)]
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [T, H*(N+P)]
        q_nope, q_rot = q.view(T, H, N + P).split([N, P], dim=-1)  # [T, H, N], [T, H, P]
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([R, P], dim=-1)  # [T, R], [T, P]
        latent = self.kv_a_layernorm(latent)  # [T, R]
        q_rot = rope(q_rot, meta.positions)  # [T, H, P]
        k_rot = rope(k_rot[:, None, :], meta.positions)[:, 0]  # [T, P]

        write_cache(cache[0], torch.cat([latent, k_rot], dim=-1), meta)  # [T, R+P] into the cache
        # Attention in latent space ("weight absorption", DeepSeek-V2 section 2.1.2). A head's key is
        # k_nope = W_uk @ latent, so q_nope . k_nope = (W_uk^T @ q_nope) . latent: fold W_uk into the
        # query once per new token instead of decompressing every context token in every step. Likewise
        # the values: attend over latents, then apply W_uv once to the result. All heads then share
        # one key/value "head" (the latent), i.e. multi-query attention of width R+P.
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, R]
        queries = torch.cat([q_latent, q_rot], dim=-1)  # [T, H, R+P]
        out = meta.per_batch(queries, lambda rows, batch: self._attend(rows, batch, cache[0]))  # [T, H, R]
        out = torch.bmm(out.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # [T, H, V]
        return self.o_proj(out.reshape(T, H * V))  # [T, D]

    def _attend(self, q: Tensor, batch: AttentionBatch, cache: Tensor) -> Tensor:
        """One batch's latent queries [T_batch, H, R+P] over its sequences' cached latents -> [T_batch, H, R]."""
        H, R = q.shape[1], self.mla.kv_lora_rank
        context = cache[batch.context_slots].to(q.dtype)  # [B, L, R+P]
        queries = batch.pad_queries(q)  # [B, Q, H, R+P]
        B, Q = queries.shape[:2]
        # One shared key/value head: plain batched matmuls over (query, head) rows. (SDPA's grouped
        # path copies the latent once per head on CPU, which costs more than the attention itself.)
        scores = torch.bmm(queries.reshape(B, Q * H, -1), context.transpose(1, 2))  # [B, Q*H, L]
        scores = scores.float() * self.softmax_scale
        mask = batch.mask[:, 0, :, None, :].expand(B, Q, H, -1).reshape(B, Q * H, -1)  # [B, Q*H, L]
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)  # [B, Q*H, L]
        out = torch.bmm(probs, context[..., :R]).view(B, Q, H, R)  # [B, Q, H, R]
        return batch.unpad(out)  # [T_batch, H, R]
