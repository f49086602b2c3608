"""The model runner owns the tensors of a step: it turns scheduled chunks into model inputs and
returns the logits of the sequences that sample a token in this step.

Shape legend: T = tokens in the step, N = sequences sampling, D = hidden, V = vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from serving.engine.kv_cache import BlockAllocator, KVCache
from serving.engine.scheduler import ScheduledChunk
from serving.engine.sequence import Sequence
from serving.experts.backend import ExpertBackend
from serving.model.attention import AttentionMetadata, SequenceChunk
from serving.model.decoder import MoEForCausalLM


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, experts: ExpertBackend, cache: KVCache, allocator: BlockAllocator):
        self.model, self.experts, self.cache, self.allocator = model, experts, cache, allocator

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> dict[Sequence, Tensor]:
        input_ids: list[int] = []
        seq_chunks, sample_rows, samplers = [], [], []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_cached
            end = start + chunk.num_new
            input_ids.extend(seq.token_ids[start:end])
            seq_chunks.append(SequenceChunk(start, chunk.num_new, seq.blocks))
            if end == len(seq.token_ids):  # prompt (or recompute) done: the last row picks the next token
                sample_rows.append(len(input_ids) - 1)
                samplers.append(seq)
        device = self.model.device
        # Host -> device: the step's token ids, the metadata (built on the host from block tables) and the
        # rows to sample; small, and copied once per step.
        meta = AttentionMetadata.build(seq_chunks, self.allocator.block_size, device)
        hidden = self.model(torch.tensor(input_ids, device=device), meta, self.cache.layers, self.experts)  # [T, D]
        if not samplers:
            return {}
        logits = self.model.logits(hidden[torch.tensor(sample_rows, device=device)])  # [N, V]
        # Device -> host, the step's one copy back: sampling runs on the host with each request's own CPU
        # generator, so a seeded request gives the same tokens on any device, and token ids are needed there.
        return dict(zip(samplers, logits.cpu(), strict=True))


@torch.inference_mode()
def score_prompts(model: MoEForCausalLM, experts: ExpertBackend, prompts: list[list[int]]) -> list[Tensor]:
    """Logits [len, V] at every position of each prompt, all prompts in one batched forward pass.

    Uses a scratch cache sized for exactly these prompts; for tests and scoring, not serving.
    """
    block_size = 16
    allocator = BlockAllocator(sum(math.ceil(len(p) / block_size) for p in prompts), block_size)
    cache = KVCache(model.cache_shapes(), allocator.num_blocks, block_size, model.lm_head.weight.dtype, model.device)
    chunks = []
    for p in prompts:
        blocks = allocator.allocate(allocator.blocks_for(len(p)))
        chunks.append(SequenceChunk(0, len(p), blocks))
    ids = torch.tensor([t for p in prompts for t in p], device=model.device)
    hidden = model(ids, AttentionMetadata.build(chunks, block_size, model.device), cache.layers, experts)  # [T, D]
    return list(model.logits(hidden).cpu().split([len(p) for p in prompts]))  # device -> host, once
