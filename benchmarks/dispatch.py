"""The MoE layer's expert step: sharded (N ExpertShard replicas, over each shard transport) against fused
(every expert in this process), side by side in one run.

    python -m benchmarks.dispatch [--models bench,demo] [--tokens 16,64,256] [--shards 2] [--repeats 15]

The shards are deployed once with `transport: direct` and `direct_rows: collective`, so they answer Serve
handle calls (`transport: handles`), direct TCP calls with the rows in the frames (`direct`, what CPU replicas
use) and direct calls with the rows on a gloo row channel (`channels`: the code path GPU replicas take with
NCCL, run here on the CPU). For each token count the same gate output
(random hidden states, the model's own gate rule) goes through the fused backend and the sharded backend on
each transport, alternating; the table shows medians, sharded/fused per transport, and each transport's
overhead of one hop (a 1-row call to one shard through the transport minus the same call in process).

A second table times whole decode steps of an LLMEngine over the same shards, with and without two
micro-batches in flight (`overlap_min_tokens`, serving/model/decoder.py forward_overlapped), on each transport,
beside the same step with every expert in this process: `--batches` requests decoding together, `--steps`
steps each, the engines taking turns step by step so that all see the same machine noise.

A third table is where a sharded decode step's time goes (direct transport, rows in frames, as CPU replicas
serve): `--profile-batches` requests, the step split into sending the layers' calls (split, serialise, send),
waiting for their answers, and the router's own compute (everything else: attention, dense layers, the gate,
the shared experts while the shards compute, combining, the LM head, sampling); and the slower shard of each
layer's call split, from its answer, into its own compute (`compute_s`) and the hop (round trip minus that).
Run it as a served router runs beside CPU shards, `OMP_WAIT_POLICY=PASSIVE` (deployments/app.py
engine_env); the table records the policy it ran under.
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
from serving.experts.sharded import Collect, ShardCall, ShardedExpertBackend, ShardTransport
from serving.metrics import DISPATCH, SHARD_COMPUTE, SHARD_HOP, MemorySink
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
        bound = app.bind(str(path), i, list(placement.experts_of(i)), {"dtype": dtype}, "cpu", transport="direct",
                         direct_rows="collective")  # fmt: skip
        handles.append(serve.run(bound, name=f"shard{i}", route_prefix=None))
    return handles


def measure(
    path: Path, name: str, args: argparse.Namespace, dtype: torch.dtype
) -> tuple[list[dict], list[dict], list[dict]]:
    """Rows of the three tables for one model: hop overhead and sharded/fused times of its first MoE layer at
    each token count, whole decode steps (measure_steps), and where a sharded step's time goes (profile_steps)."""
    from ray import serve

    from deployments.direct_transport import DirectTransport, serve_discovery
    from deployments.transport import HandleTransport

    cfg = ModelConfig.from_pretrained(path)
    layer = cfg.moe_layer_ids[0]
    fused = LocalExpertBackend(load_experts(Checkpoint(path, cfg.fp8_block), cfg, list(range(cfg.num_experts)), dtype))
    placement = Placement.contiguous(cfg.num_experts, args.shards)
    handles = deploy_shards(path, placement, args.dtype)
    transports = {"handles": HandleTransport(handles)}
    sink = MemorySink()  # the direct transport's metrics: the step profile reads each answer's compute and hop
    transports["direct"] = DirectTransport(transports["handles"], serve_discovery(handles), len(handles), metrics=sink)
    transports["channels"] = DirectTransport(transports["handles"], serve_discovery(handles), len(handles),
                                             row_device=torch.device("cpu"))  # fmt: skip
    while not all(transports[k].endpoints(s) for k in ("direct", "channels") for s in range(len(handles))):
        time.sleep(0.1)  # their first discovery round
    sharded = {name: ShardedExpertBackend(placement, t) for name, t in transports.items()}

    # One hop: a 1-row call to shard 0 through each transport, minus the same call in process.
    one = ShardCall(torch.randn(1, cfg.hidden_size, dtype=dtype), torch.zeros(1, dtype=torch.long),
                    torch.tensor([placement.experts_of(0)[0]]), torch.ones(1, dtype=dtype))  # fmt: skip
    local = statistics.median(timed(lambda: fused.layers[layer].forward(one.hidden, one.local_rows, one.experts,
                                                                        one.weights), args.repeats))  # fmt: skip
    hop_ms = {}
    for kind, t in transports.items():
        remote = timed(lambda t=t: t.run(layer, {0: one}), args.repeats)
        hop_ms[kind] = (statistics.median(remote) - local) * 1e3

    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        gen = torch.Generator().manual_seed(tokens)
        hidden = torch.randn(tokens, cfg.hidden_size, generator=gen).to(dtype)
        weights, ids = top_k_gate(torch.randn(tokens, cfg.num_experts, generator=gen), cfg.gate)
        step = (layer, hidden, weights.to(dtype), ids)
        for backend in sharded.values():
            torch.testing.assert_close(backend(*step), fused(*step), rtol=2e-2, atol=2e-2)
        times: dict[str, list[float]] = {"fused": [], **{kind: [] for kind in sharded}}
        for _ in range(args.repeats):  # alternate: all see the same machine noise
            times["fused"] += timed(lambda: fused(*step), 1)  # noqa: B023 (called at once, inside the loop)
            for kind, backend in sharded.items():
                times[kind] += timed(lambda b=backend: b(*step), 1)  # noqa: B023
        ms = {kind: statistics.median(v) * 1e3 for kind, v in times.items()}
        row = dict(model=name, tokens=tokens, shards=args.shards, fused_ms=round(ms["fused"], 2))
        for kind in transports:
            row |= {f"{kind}_ms": round(ms[kind], 2), f"{kind}_ratio": round(ms[kind] / ms["fused"], 2),
                    f"hop_{kind}_ms": round(hop_ms[kind], 2)}  # fmt: skip
        rows.append(row)
        each = "  ".join(f"{kind} {ms[kind]:8.2f} ms (hop {hop_ms[kind]:.2f})" for kind in transports)
        print(f"{name:>6} T={tokens:<4} fused {ms['fused']:8.2f} ms  {each}", flush=True)
    steps = measure_steps(path, name, args, dtype, fused, placement, transports)
    profile = profile_steps(path, name, args, dtype, fused, placement, TimedTransport(transports["direct"], sink))
    transports["direct"].close()
    transports["channels"].close()
    for i in range(placement.num_shards):
        serve.delete(f"shard{i}")
    return rows, steps, profile


class TimedTransport:
    """A ShardTransport that times the one it wraps, summed over a step's MoE layers: sending the calls and
    waiting for the answers, and from the wrapped transport's metrics (a MemorySink) the own compute and the
    hop of each layer's slower shard."""

    def __init__(self, transport: ShardTransport, sink: MemorySink):
        self.transport, self.sink = transport, sink
        self.reset()

    def reset(self) -> None:
        self.send_s = self.wait_s = self.compute_s = self.hop_s = 0.0

    def start(self, layer: int, calls: dict[int, ShardCall]) -> Collect:
        began = time.perf_counter()
        collect = self.transport.start(layer, calls)
        self.send_s += time.perf_counter() - began

        def timed_collect():
            mark, began = len(self.sink.records), time.perf_counter()
            out = collect()
            self.wait_s += time.perf_counter() - began
            # Each answer recorded its round trip, then its compute and hop: the slower shard's is the longest trip
            # (not the last read: answers that arrived during the shared experts are read in any order).
            answers: list[dict[str, float]] = []
            for name, value, _ in self.sink.records[mark:]:
                if name == DISPATCH.name:
                    answers.append({})
                if answers and name in (DISPATCH.name, SHARD_COMPUTE.name, SHARD_HOP.name):
                    answers[-1][name] = value
            if answers:
                slower = max(answers, key=lambda a: a[DISPATCH.name])
                self.compute_s += slower.get(SHARD_COMPUTE.name, 0.0)
                self.hop_s += slower.get(SHARD_HOP.name, 0.0)
            return out

        return timed_collect

    def run(self, layer: int, calls: dict[int, ShardCall]):
        return self.start(layer, calls)()

    def probe(self, shard: int, timeout_s: float) -> bool:
        return self.transport.probe(shard, timeout_s)


def profile_steps(path: Path, name: str, args: argparse.Namespace, dtype: torch.dtype, fused: LocalExpertBackend,
                  placement: Placement, timed_transport: TimedTransport) -> list[dict]:  # fmt: skip
    """Median ms of a decode step's parts at each of --profile-batches, sharded over `timed_transport`, beside
    the same step in process (the two engines take turns step by step)."""
    from serving.engine.llm_engine import LLMEngine
    from serving.engine_client import EngineConfig, SamplingParams
    from serving.model.decoder import load_model

    model, _ = load_model(path, dtype)
    rows = []
    for batch in [int(b) for b in args.profile_batches.split(",") if b]:
        params = SamplingParams(max_tokens=args.steps + 2, temperature=0.0, ignore_eos=True)
        engines = {}
        for label, backend in (("in process", fused), ("sharded", ShardedExpertBackend(placement, timed_transport))):
            config = EngineConfig(dtype=str(dtype).removeprefix("torch."), kv_cache_mb=256, max_running=batch)
            engine = LLMEngine(model, backend, None, config)
            gen = torch.Generator().manual_seed(batch)
            for _ in range(batch):
                engine.add_request(torch.randint(0, 1000, (16,), generator=gen).tolist(), params)
            engine.step()  # the prefill
            engine.step()  # a decode step to warm up
            engines[label] = engine
        parts: dict[str, list[float]] = {k: [] for k in ("in_process", "step", "router", "send", "wait", "compute",
                                                          "hop")}  # fmt: skip
        for _ in range(args.steps):
            parts["in_process"] += timed(engines["in process"].step, 1)
            timed_transport.reset()
            step_s = timed(engines["sharded"].step, 1)[0]
            t = timed_transport
            for key, value in (("step", step_s), ("router", step_s - t.send_s - t.wait_s), ("send", t.send_s),
                               ("wait", t.wait_s), ("compute", t.compute_s), ("hop", t.hop_s)):  # fmt: skip
                parts[key].append(value)
        for engine in engines.values():
            engine.runner.close()
        ms = {key: round(statistics.median(v) * 1e3, 2) for key, v in parts.items()}
        rows.append(dict(model=name, batch=batch, **{f"{k}_ms": v for k, v in ms.items()}))
        print(f"{name:>6} batch={batch:<3} profile " + "  ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)
    return rows


def measure_steps(path: Path, name: str, args: argparse.Namespace, dtype: torch.dtype, fused: LocalExpertBackend,
                  placement: Placement, transports: dict) -> list[dict]:  # fmt: skip
    """Median decode step ms at each batch: experts in process, and sharded over each transport with and
    without two micro-batches in flight (overlap_min_tokens=2: every step of two or more sequences splits)."""
    from serving.engine.llm_engine import LLMEngine
    from serving.engine_client import EngineConfig, SamplingParams
    from serving.model.decoder import load_model

    model, _ = load_model(path, dtype)
    backends = {"fused": (fused, None)}
    for kind, transport in transports.items():
        backends[kind] = (ShardedExpertBackend(placement, transport), None)
        backends[f"{kind}, overlap"] = (ShardedExpertBackend(placement, transport), 2)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        params = SamplingParams(max_tokens=args.steps + 2, temperature=0.0, ignore_eos=True)
        engines = {}
        for label, (backend, overlap) in backends.items():
            config = EngineConfig(dtype=str(dtype).removeprefix("torch."), kv_cache_mb=256, max_running=batch,
                                  overlap_min_tokens=overlap)  # fmt: skip
            engine = LLMEngine(model, backend, None, config)
            gen = torch.Generator().manual_seed(batch)  # the same prompts for every engine
            for _ in range(batch):
                engine.add_request(torch.randint(0, 1000, (16,), generator=gen).tolist(), params)
            engine.step()  # the prefill of every request (16 x batch <= max_batched_tokens)
            engine.step()  # one decode step to warm up
            engines[label] = engine
        times: dict[str, list[float]] = {label: [] for label in engines}
        for _ in range(args.steps):
            for label, engine in engines.items():
                times[label] += timed(engine.step, 1)
        ms = {label: statistics.median(v) * 1e3 for label, v in times.items()}
        for engine in engines.values():
            engine.runner.close()
        for kind in transports:
            rows.append(dict(model=name, batch=batch, transport=kind, fused_ms=round(ms["fused"], 1),
                             sharded_ms=round(ms[kind], 1), overlap_ms=round(ms[f"{kind}, overlap"], 1),
                             sharded_ratio=round(ms[kind] / ms["fused"], 2),
                             overlap_ratio=round(ms[f"{kind}, overlap"] / ms[kind], 2)))  # fmt: skip
            print(f"{name:>6} batch={batch:<3} {kind:<8} fused {ms['fused']:7.1f} ms  sharded {ms[kind]:7.1f} ms  "
                  f"overlap {ms[f'{kind}, overlap']:7.1f} ms", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bench,demo")
    parser.add_argument("--tokens", default="16,64,256")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", default="8,32", help="decoding sequences of the step table (at most 32)")
    parser.add_argument("--steps", type=int, default=12, help="decode steps timed per engine in the step tables")
    parser.add_argument("--profile-batches", default="1,32", help="decoding sequences of the profile table ('': none)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "moe-serve-bench"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    dtype = getattr(torch, args.dtype)
    rows, step_rows, profile_rows = [], [], []
    try:
        for name in args.models.split(","):
            layer_rows, steps, profile = measure(build_checkpoint(name, Path(args.cache_dir)), name, args, dtype)
            rows, step_rows, profile_rows = rows + layer_rows, step_rows + steps, profile_rows + profile
    finally:
        serve.shutdown()
        ray.shutdown()

    kinds = ("handles", "direct", "channels")
    meta = machine_meta(dtype=args.dtype, repeats=args.repeats, transports=",".join(kinds))
    columns = {"model": "model", "tokens/step": "tokens", "shards": "shards", "fused ms": "fused_ms"}
    columns |= {f"{kind} ms": f"{kind}_ms" for kind in kinds}
    columns |= {f"{kind} / fused": f"{kind}_ratio" for kind in kinds}
    columns |= {f"hop {kind} ms": f"hop_{kind}_ms" for kind in kinds}
    write_report(args.out, "dispatch", meta, rows, columns)
    columns = {"model": "model", "batch": "batch", "transport": "transport", "fused step ms": "fused_ms",
               "sharded step ms": "sharded_ms", "overlap step ms": "overlap_ms", "sharded / fused": "sharded_ratio",
               "overlap / sharded": "overlap_ratio"}  # fmt: skip
    write_report(args.out, "dispatch_steps", meta | {"batches": args.batches, "steps": args.steps}, step_rows, columns)
    columns = {"model": "model", "batch": "batch", "in process step ms": "in_process_ms",
               "sharded step ms": "step_ms", "router compute ms": "router_ms", "send ms": "send_ms",
               "wait ms": "wait_ms", "slower shard: compute ms": "compute_ms",
               "slower shard: hop ms": "hop_ms"}  # fmt: skip
    policy = os.environ.get("OMP_WAIT_POLICY", "libgomp default (spin)")
    meta |= {"steps": args.steps, "router_omp_wait_policy": policy}
    write_report(args.out, "dispatch_profile", meta, profile_rows, columns)


if __name__ == "__main__":
    main()
