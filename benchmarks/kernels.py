"""One MoE layer's experts on each expert kernel: loop (StackedExperts) against vllm (VLLMFusedExperts,
vLLM's fused MoE op), side by side in one run.

    python -m benchmarks.kernels [--tokens 1,8,32,64,512] [--threads 2] [--repeats 21] [--dtype bfloat16]

Sizes are the bench model's MoE layer (benchmarks/README.md): hidden 2048, 64 experts of width 1408,
top-6, random weights (no checkpoint needed). For each token count the same gate output goes through
both kernels behind LocalExpertBackend (the router with shards: 0), alternating, and the table shows
medians, the ratio loop/vllm (of the medians, and of each kernel's fastest run, which other load on a
shared machine disturbs least), and the two kernels' largest difference relative to the output's scale.
"vllm, shard path" is the same assignments in another order, which takes the path a shard's calls take
(one op row per assignment, then a gather and an index_add), to show what that layout costs.
In bfloat16 on CPU the loop kernel as served packs each expert's weights for oneDNN (StackedExperts'
`prepack`, what load_experts does there); "loop, unpacked" is the same kernel on the plain stacks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.report import machine_meta, write_report
from router.dispatch import flatten
from router.gate import GateSpec, top_k_gate
from serving.experts.fused import VLLMFusedExperts
from serving.experts.kernels import build_layer_experts
from serving.experts.local import LocalExpertBackend, StackedExperts
from serving.model.prepack import can_prepack

HIDDEN, EXPERTS, WIDTH, TOP_K = 2048, 64, 1408, 6


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_layer(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [E, 2I, D] and down [E, D, I], scaled so activations stay O(1) (as trained weights are)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, generator=gen) * HIDDEN**-0.5).to(dtype)  # [E, 2I, D]
    down = (torch.randn(EXPERTS, HIDDEN, WIDTH, generator=gen) * WIDTH**-0.5).to(dtype)  # [E, D, I]
    return gate_up, down


def measure(
    tokens: int,
    loop: LocalExpertBackend,
    unpacked: LocalExpertBackend,
    fused: VLLMFusedExperts,
    dtype: torch.dtype,
    repeats: int,
) -> dict:
    """One row of the table: medians over `repeats` alternating runs at `tokens` tokens."""
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)  # [T, D]
    spec = GateSpec(num_experts=EXPERTS, top_k=TOP_K, renormalize=True)
    weights, ids = top_k_gate(torch.randn(tokens, EXPERTS, generator=gen), spec)  # [T, K] float32, [T, K]
    weights = weights.to(dtype)  # as MoEBlock hands them to a backend
    step = (0, hidden, weights, ids)
    a = flatten(weights, ids)  # [K * T] slot-major, as LocalExpertBackend sends them
    shuffled = torch.randperm(a.rows.numel(), generator=gen)  # [K * T]: not slot-major, so the shard path
    shard_path = (hidden, a.rows[shuffled], a.experts[shuffled], a.weights[shuffled])
    backend = LocalExpertBackend({0: fused})
    want, got = loop(*step).double(), backend(*step).double()  # [T, D]
    rel = float((got - want).abs().max() / want.abs().max())
    calls = {"loop": lambda: loop(*step), "unpacked": lambda: unpacked(*step), "vllm": lambda: backend(*step),
             "shard": lambda: fused.forward(*shard_path)}  # fmt: skip
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(2):  # warm-up: first touches of the weights, OpenMP pool start
        for call in calls.values():
            call()
    for _ in range(repeats):  # alternate: all see the same machine noise
        for name, call in calls.items():
            runs[name].append(timed(call))
    ms = {name: statistics.median(times) * 1e3 for name, times in runs.items()}
    best = min(runs["loop"]) / min(runs["vllm"])  # the two fastest runs: the least disturbed by other load
    print(f"T={tokens:<3} loop {ms['loop']:8.2f} ms (unpacked {ms['unpacked']:8.2f})  vllm {ms['vllm']:8.2f} ms  "
          f"x{ms['loop'] / ms['vllm']:.2f} (fastest x{best:.2f})  shard path {ms['shard']:8.2f} ms  "
          f"max rel diff {rel:.1e}", flush=True)  # fmt: skip
    return dict(tokens=tokens, loop_ms=round(ms["loop"], 2), unpacked_ms=round(ms["unpacked"], 2),
                vllm_ms=round(ms["vllm"], 2), speedup=f"{ms['loop'] / ms['vllm']:.2f}x", best=f"{best:.2f}x",
                shard_ms=round(ms["shard"], 2), max_rel_diff=f"{rel:.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,8,32,64,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # vLLM's op runs on torch's OpenMP pool, so this sets both
    dtype = getattr(torch, args.dtype)

    gate_up, down = random_layer(dtype)
    unpacked = LocalExpertBackend({0: StackedExperts(gate_up, down, range(EXPERTS))})
    loop = LocalExpertBackend({0: build_layer_experts("loop", gate_up, down, list(range(EXPERTS)))})  # as served
    prepack = can_prepack(dtype, torch.device("cpu"))  # for the record: whether `loop` packed its weights
    fused = VLLMFusedExperts(StackedExperts(gate_up, down, range(EXPERTS)))  # packs a copy
    with torch.inference_mode():
        rows = [measure(t, loop, unpacked, fused, dtype, args.repeats) for t in map(int, args.tokens.split(","))]

    import vllm  # already imported by the fused kernel: only its version, for the record

    meta = machine_meta(dtype=args.dtype, threads=args.threads, repeats=args.repeats, vllm=vllm.__version__,
                        prepack=prepack, isa=torch.backends.cpu.get_cpu_capability())  # fmt: skip
    columns = {"tokens": "tokens", "loop ms": "loop_ms", "loop, unpacked ms": "unpacked_ms", "vllm ms": "vllm_ms",
               "loop / vllm": "speedup",
               "loop / vllm, fastest runs": "best", "vllm, shard path ms": "shard_ms",
               "max rel diff": "max_rel_diff"}  # fmt: skip
    write_report(args.out, "kernels", meta, rows, columns)


if __name__ == "__main__":
    main()
