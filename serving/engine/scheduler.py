"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget. Running decodes go first (one token each), then unfinished prefills,
then waiting requests are admitted in arrival order, their prompts cut into chunks that fit the
budget. Prefill and decode share a step; requests join and leave between steps.

Memory: a sequence takes cache blocks as its tokens are scheduled. A new request is admitted only
when its whole prompt fits in the free blocks, so admitted prefills never stall. When a decode
needs a block and none is free, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed (prompt and output so far) when
memory frees up. Nothing crashes and nothing is lost; the cost is recompute.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from serving.engine.kv_cache import BlockAllocator
from serving.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_new: int  # tokens of this sequence run in this step, starting at seq.num_cached


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_batched_tokens: int, max_running: int):
        self.allocator = allocator
        self.max_batched_tokens, self.max_running = max_batched_tokens, max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_batched_tokens
        chunks: list[ScheduledChunk] = []
        # 1. Running sequences, oldest first: decodes take one token; prefills take a chunk.
        for seq in list(self.running):
            if seq not in self.running:  # preempted below, by an older sequence's decode
                continue
            if budget == 0:
                break
            n = min(seq.num_uncached, budget)
            if not self._grow(seq, seq.num_cached + n):
                continue  # seq itself was preempted
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        # 2. Admit waiting sequences while their whole prompt fits in memory.
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if self.allocator.blocks_for(len(seq.token_ids)) > self.allocator.num_free:
                break  # keep arrival order: no small request jumps a big one
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncached, budget)
            self._grow(seq, n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return chunks

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens, preempting newer sequences if needed.
        False when `seq` itself had to be preempted."""
        need = self.allocator.blocks_for(num_tokens) - len(seq.blocks)
        while need > self.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.blocks.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_cached = 0  # recompute prompt + output so far on readmission
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        self.allocator.release(seq.blocks)
        seq.blocks = []
