"""The model runner owns the tensors of a step: it turns scheduled chunks into model inputs and
returns the logits of the sequences that sample a token in this step, and the logprobs of the prompt
tokens that this step's prefill chunks score (SamplingParams.prompt_logprobs).

Shape legend: T = tokens in the step, N = sequences sampling, R = prompt positions scored, D = hidden,
V = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from serving.engine.kv_cache import BlockAllocator, KVCache
from serving.engine.sampler import score_tokens
from serving.engine.scheduler import ScheduledChunk
from serving.engine.sequence import Sequence
from serving.engine_client import TokenLogprobs
from serving.experts.backend import ExpertBackend
from serving.experts.pipeline import ExpertPipeline
from serving.model.attention import AttentionMetadata, SequenceChunk
from serving.model.decoder import MoEForCausalLM


@dataclass
class StepLogits:
    """What a step's forward pass gives the engine."""

    sample: dict[Sequence, Tensor] = field(default_factory=dict)  # [V] float32 on the host, per sequence sampling
    prompt_logprobs: dict[Sequence, list[TokenLogprobs]] = field(default_factory=dict)  # next prompt tokens scored


class ModelRunner:
    def __init__(
        self,
        model: MoEForCausalLM,
        experts: ExpertBackend,
        cache: KVCache,
        allocator: BlockAllocator,
        overlap_min_tokens: int | None = None,
    ):
        """overlap_min_tokens: a step of at least this many tokens and two or more sequences runs as two
        micro-batches in flight together (MoEForCausalLM.forward_overlapped); None: never."""
        self.model, self.experts, self.cache, self.allocator = model, experts, cache, allocator
        self.overlap_min_tokens = overlap_min_tokens
        self.pipeline = ExpertPipeline(experts) if overlap_min_tokens is not None else None

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> StepLogits:
        input_ids: list[int] = []
        seq_chunks, sample_rows, samplers = [], [], []
        score_rows, scored_ids, scorers = [], [], []  # prompt positions whose logits score the next prompt token
        # Decodes first, prefill chunks after: attention then runs as two batches, neither padded to the
        # other's query length (serving/model/attention.py says why). The order of rows is the runner's own.
        for chunk in sorted(chunks, key=lambda c: c.num_new > 1):
            seq, start = chunk.seq, chunk.seq.num_cached
            end = start + chunk.num_new
            first_row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            seq_chunks.append(SequenceChunk(start, chunk.num_new, seq.blocks))
            if positions := seq.positions_to_score(start, end):  # the prefill itself scores: no second pass
                score_rows.extend(first_row + p - start for p in positions)
                scored_ids.extend(seq.prompt_ids[p + 1] for p in positions)
                scorers.append((seq, len(positions)))
            if end == len(seq.token_ids):  # prompt (or recompute) done: the last row picks the next token
                sample_rows.append(len(input_ids) - 1)
                samplers.append(seq)
        device = self.model.device
        # Host -> device: the step's token ids, the metadata (built on the host from block tables) and the
        # rows to sample and score; small, and copied once per step.
        ids = torch.tensor(input_ids, device=device)  # [T]
        split = self._split(seq_chunks)
        if split is None:
            meta = AttentionMetadata.build(seq_chunks, self.allocator.block_size, device)
            hidden = self.model(ids, meta, self.cache.layers, self.experts)  # [T, D]
        else:  # two micro-batches: sequences [0, split) and [split, B), their tokens contiguous in `ids`
            rows = sum(c.num_new for c in seq_chunks[:split])
            parts = [
                (ids[:rows], AttentionMetadata.build(seq_chunks[:split], self.allocator.block_size, device)),
                (ids[rows:], AttentionMetadata.build(seq_chunks[split:], self.allocator.block_size, device)),
            ]
            hidden = torch.cat(self.model.forward_overlapped(parts, self.cache.layers, self.pipeline))  # [T, D]
        out = StepLogits()
        if samplers:
            logits = self.model.logits(hidden[torch.tensor(sample_rows, device=device)])  # [N, V]
            # Device -> host: sampling runs on the host with each request's own CPU generator, so a seeded
            # request gives the same tokens on any device, and token ids are needed there.
            out.sample = dict(zip(samplers, logits.cpu(), strict=True))
        if scorers:
            # Scored where they are computed, at most max_batched_tokens rows a step ([R, V] float32 is the
            # peak); only logprobs, ranks and the top-N come back (score_tokens).
            logits = self.model.logits(hidden[torch.tensor(score_rows, device=device)])  # [R, V]
            top_n = max(seq.params.prompt_logprobs for seq, _ in scorers)
            entries = iter(score_tokens(logits, torch.tensor(scored_ids, device=device), top_n))
            for seq, n in scorers:
                want = seq.params.prompt_logprobs
                out.prompt_logprobs[seq] = [_keep_top(next(entries), want) for _ in range(n)]
        return out

    def _split(self, chunks: list[SequenceChunk]) -> int | None:
        """Where to cut the step's sequences into two micro-batches of about equal tokens; None: do not."""
        total = sum(c.num_new for c in chunks)
        if self.pipeline is None or len(chunks) < 2 or total < self.overlap_min_tokens:
            return None
        seen = 0
        for i, c in enumerate(chunks[:-1]):
            seen += c.num_new
            if 2 * seen >= total:
                return i + 1
        return len(chunks) - 1


def _keep_top(entry: TokenLogprobs, top_n: int) -> TokenLogprobs:
    return (
        entry
        if len(entry.top) <= top_n
        else TokenLogprobs(entry.token_id, entry.logprob, entry.top[:top_n], entry.rank)
    )


@torch.inference_mode()
def score_prompts(model: MoEForCausalLM, experts: ExpertBackend, prompts: list[list[int]]) -> list[Tensor]:
    """Logits [len, V] at every position of each prompt, all prompts in one batched forward pass.

    Uses a scratch cache sized for exactly these prompts; for tests and scoring, not serving.
    """
    block_size = 16
    allocator = BlockAllocator(sum(math.ceil(len(p) / block_size) for p in prompts), block_size)
    cache = KVCache(model.cache_shapes(), allocator.num_blocks, block_size, model.dtype, model.device)
    chunks = []
    for p in prompts:
        blocks = allocator.allocate(allocator.blocks_for(len(p)))
        chunks.append(SequenceChunk(0, len(p), blocks))
    ids = torch.tensor([t for p in prompts for t in p], device=model.device)
    hidden = model(ids, AttentionMetadata.build(chunks, block_size, model.device), cache.layers, experts)  # [T, D]
    return list(model.logits(hidden).cpu().split([len(p) for p in prompts]))  # device -> host, once
