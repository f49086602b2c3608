"""The MoE layer's expert step: sharded (N ExpertShard replicas behind Serve handles) against fused
(every expert in this process), side by side in one run.

    python -m benchmarks.dispatch [--models bench,demo] [--tokens 16,64,256] [--shards 2] [--repeats 15]

For each token count the same gate output (random hidden states, the model's own gate rule) goes
through both backends, alternating; the table shows medians, the ratio sharded/fused, and the
overhead of one hop (a 1-row call through the handle minus the same call in process).
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
from router.gate import top_k_gate
from router.placement import Placement
from serving.experts.loading import load_experts
from serving.experts.local import LocalExpertBackend
from serving.experts.sharded import ShardCall, ShardedExpertBackend
from serving.model.checkpoint import Checkpoint
from serving.model.config import ModelConfig


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def deploy_shards(path: Path, placement: Placement, dtype: str):
    from ray import serve

    from deployments.shard_deployment import ExpertShard

    handles = []
    for i in range(placement.num_shards):
        app = ExpertShard.options(name=f"ExpertShard-{i}", ray_actor_options={"num_cpus": 0.5})
        bound = app.bind(str(path), i, list(placement.experts_of(i)), {"dtype": dtype}, "cpu")
        handles.append(serve.run(bound, name=f"shard{i}", route_prefix=None))
    return handles


def measure(path: Path, name: str, args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """Hop overhead and sharded/fused times of one model's first MoE layer at each token count."""
    from ray import serve

    from deployments.transport import HandleTransport

    cfg = ModelConfig.from_pretrained(path)
    layer = cfg.moe_layer_ids[0]
    fused = LocalExpertBackend(load_experts(Checkpoint(path, cfg.fp8_block), cfg, list(range(cfg.num_experts)), dtype))
    placement = Placement.contiguous(cfg.num_experts, args.shards)
    handles = deploy_shards(path, placement, args.dtype)
    sharded = ShardedExpertBackend(placement, HandleTransport(handles))

    # One hop: a 1-row call to shard 0 through its handle, minus the same call in process.
    one = ShardCall(torch.randn(1, cfg.hidden_size, dtype=dtype), torch.zeros(1, dtype=torch.long),
                    torch.tensor([placement.experts_of(0)[0]]), torch.ones(1, dtype=dtype))  # fmt: skip
    remote = timed(lambda: handles[0].run.remote(layer, one).result(), args.repeats)
    local = timed(lambda: fused.layers[layer].forward(one.hidden, one.local_rows, one.experts, one.weights),
                  args.repeats)  # fmt: skip
    hop_ms = (statistics.median(remote) - statistics.median(local)) * 1e3

    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        gen = torch.Generator().manual_seed(tokens)
        hidden = torch.randn(tokens, cfg.hidden_size, generator=gen).to(dtype)
        weights, ids = top_k_gate(torch.randn(tokens, cfg.num_experts, generator=gen), cfg.gate)
        step = (layer, hidden, weights.to(dtype), ids)
        torch.testing.assert_close(sharded(*step), fused(*step), rtol=2e-2, atol=2e-2)
        fused_s, sharded_s = [], []
        for _ in range(args.repeats):  # alternate: both see the same machine noise
            fused_s += timed(lambda: fused(*step), 1)  # noqa: B023 (called at once, inside the loop)
            sharded_s += timed(lambda: sharded(*step), 1)  # noqa: B023
        f_ms, s_ms = statistics.median(fused_s) * 1e3, statistics.median(sharded_s) * 1e3
        rows.append(dict(model=name, tokens=tokens, shards=args.shards, fused_ms=round(f_ms, 2),
                         sharded_ms=round(s_ms, 2), ratio=round(s_ms / f_ms, 2), hop_ms=round(hop_ms, 2)))  # fmt: skip
        print(f"{name:>6} T={tokens:<4} fused {f_ms:8.2f} ms  sharded {s_ms:8.2f} ms  "
              f"x{s_ms / f_ms:.2f}  hop {hop_ms:.2f} ms", flush=True)  # fmt: skip
    for i in range(placement.num_shards):
        serve.delete(f"shard{i}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bench,demo")
    parser.add_argument("--tokens", default="16,64,256")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "moe-serve-bench"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    dtype = getattr(torch, args.dtype)
    rows = []
    try:
        for name in args.models.split(","):
            rows += measure(build_checkpoint(name, Path(args.cache_dir)), name, args, dtype)
    finally:
        serve.shutdown()
        ray.shutdown()

    meta = machine_meta(dtype=args.dtype, repeats=args.repeats, transport="serve-handle")
    columns = {"model": "model", "tokens/step": "tokens", "shards": "shards", "fused ms": "fused_ms",
               "sharded ms": "sharded_ms", "sharded / fused": "ratio", "hop overhead ms": "hop_ms"}  # fmt: skip
    write_report(args.out, "dispatch", meta, rows, columns)


if __name__ == "__main__":
    main()
