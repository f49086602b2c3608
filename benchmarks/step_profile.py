"""Where a decode step's time goes, in process: the routed experts against everything else.

    python -m benchmarks.step_profile [--models bench] [--batch 1,32] [--steps 12] [--kernels loop,vllm]

An LLMEngine with every expert in this process (LocalExpertBackend on each `--kernels` entry) takes `batch`
requests of 16 prompt tokens (one prefill step), then runs `--steps` decode steps; a wrapper times each
routed-expert call (the step's MoE layers). The table splits a step into the routed experts and the rest
(attention, the dense layer, shared experts, norms, gate, LM head, sampling and scheduling). A sharded
router runs the same rest and replaces the experts by one call per MoE layer to the shards: a hop plus the
slower shard's part (benchmarks/dispatch.py measures both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.engine import build_checkpoint
from benchmarks.report import machine_meta, write_report


class TimedExperts:
    """An ExpertBackend that times the backend it wraps, per call (its in-process experts compute in `start`)."""

    def __init__(self, backend):
        self.backend, self.seconds = backend, 0.0

    def __call__(self, layer, hidden, weights, ids):
        return self.start(layer, hidden, weights, ids).result()

    def start(self, layer, hidden, weights, ids):
        start = time.perf_counter()
        routed = self.backend.start(layer, hidden, weights, ids)
        self.seconds += time.perf_counter() - start
        return routed


def profile(path: Path, name: str, kernel: str, batch: int, steps: int, dtype: torch.dtype) -> dict:
    from serving.engine.llm_engine import LLMEngine
    from serving.engine_client import EngineConfig, SamplingParams
    from serving.model.decoder import load_local

    model, experts = load_local(path, dtype, "cpu", kernel)
    timed = TimedExperts(experts)
    config = EngineConfig(dtype=str(dtype).removeprefix("torch."), kv_cache_mb=1024, max_running=64)
    engine = LLMEngine(model, timed, None, config)
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, 1000, (16,), generator=gen).tolist(), params)
    engine.step()  # the prefill of every request (16 x batch <= max_batched_tokens)
    engine.step()  # one decode step to warm up
    step_s, expert_s = [], []
    for _ in range(steps):
        timed.seconds = 0.0
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
        expert_s.append(timed.seconds)
    step, routed = statistics.median(step_s) * 1e3, statistics.median(expert_s) * 1e3
    layers = len(model.config.moe_layer_ids)
    return dict(model=name, kernel=kernel, batch=batch, step_ms=round(step, 1), experts_ms=round(routed, 1),
                per_layer_ms=round(routed / layers, 1), rest_ms=round(step - routed, 1),
                experts_share=f"{routed / step:.0%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bench")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kernels", default="loop,vllm")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "moe-serve-bench"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models.split(","):
        path = build_checkpoint(name, Path(args.cache_dir))
        for kernel in args.kernels.split(","):
            for batch in (int(b) for b in args.batch.split(",")):
                rows.append(profile(path, name, kernel, batch, args.steps, dtype))
                print(rows[-1], flush=True)
    meta = machine_meta(dtype=args.dtype, steps=args.steps, threads=torch.get_num_threads())
    columns = {"model": "model", "expert kernel": "kernel", "batch": "batch", "step ms": "step_ms",
               "routed experts ms": "experts_ms", "per MoE layer ms": "per_layer_ms", "rest ms": "rest_ms",
               "experts share": "experts_share"}  # fmt: skip
    write_report(args.out, "step_profile", meta, rows, columns)


if __name__ == "__main__":
    main()
