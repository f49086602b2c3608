"""Engines under the same load: native with 2 expert shards (over the direct transport, and over Serve
handles), native with experts in process (each with the loop expert kernel and with vLLM's fused MoE op,
`expert_kernel: vllm`), and vLLM.

    python -m benchmarks.engines [--models demo,bench] [--concurrency 1,8,32] [--duration 30] [--out DIR]
    python -m benchmarks.engines --models bench --concurrency 32 --engines "native, in process, fused; vllm"

One local Ray cluster serves each engine in turn, on the same checkpoint and engine_config, in one run;
the load is the load-test runner's (`loadtests/`: locust in its own process, streaming requests, half
chat and half completions, prompts of 16-64 words, `max_tokens` tokens each with ignore_eos so every
engine generates the same number), at each concurrency for `--duration` seconds. The engines take
turns rather than being deployed together because three copies of the bench model do not fit in
24 GiB beside anything else.
Writes DIR/engines.json (every cell's summary), a markdown table on stdout, and DIR/engines.png.
Needs vLLM (`make install-vllm`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.engine import build_checkpoint
from benchmarks.report import machine_meta, write_report
from deployments.local_cluster import deploy_app, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARDED = {"shards": 2, "router_resources": {"num_cpus": 2}, "shard_resources": {"num_cpus": 1}}
IN_PROCESS = {"shards": 0, "router_resources": {"num_cpus": 2}}
ENGINES = {  # name -> (app args that differ, engine_config fields that differ); threads: 2 for dense
    # compute, 1 per shard (2 run at once); "fused" is engine_config.expert_kernel: vllm (vLLM's MoE op)
    "native, 2 shards": (SHARDED, {}),  # transport: direct, the default
    "native, 2 shards, handles": ({**SHARDED, "transport": "handles"}, {}),
    "native, 2 shards, overlap": (SHARDED, {"overlap_min_tokens": 4}),  # two micro-batches from 4 tokens a step
    "native, in process": (IN_PROCESS, {}),
    "native, 2 shards, fused": (SHARDED, {"expert_kernel": "vllm"}),
    "native, in process, fused": (IN_PROCESS, {"expert_kernel": "vllm"}),
    "vllm": ({"engine": "vllm", "router_resources": {"num_cpus": 2}}, {}),
}
DTYPES = {"demo": "float32", "bench": "bfloat16"}


def serving_checkpoint(name: str, root: Path) -> Path:
    """The benchmark checkpoint, made servable over HTTP by both engines. The bench model (random
    weights, no tokenizer of its own) gets the demo tokenizer, extended with one added token per id
    past the demo's 1024 so that every token the model samples decodes to text (TTFT and ITL are timed
    on text chunks), and its config.json states DeepSeek-V3's routing (sigmoid scores, noaux_tc) as
    real DeepSeek-V3 checkpoints do: vLLM reads those two fields (it would route with softmax without
    them); transformers' config class leaves them out."""
    path = build_checkpoint(name, root)
    if name == "demo":
        return path
    from transformers import AutoTokenizer

    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    if not (path / "tokenizer.json").exists() or len(AutoTokenizer.from_pretrained(path)) < config["vocab_size"]:
        tokenizer = AutoTokenizer.from_pretrained(build_checkpoint("demo", root))
        tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), config["vocab_size"])])
        tokenizer.save_pretrained(path)
    if "scoring_func" not in config:
        config.update(scoring_func="sigmoid", topk_method="noaux_tc")
        config_file.write_text(json.dumps(config, indent=2))
    return path


def deploy(serve_url: str, model: Path, name: str, engine: str, dtype: str, vllm_eager: bool) -> str:
    """One engine's app on `model`; returns its base URL."""
    app, engine_config = ENGINES[engine]
    args = {"model": str(model), "served_model_name": name, "ingress_resources": {"num_cpus": 0.25},
            "engine_config": {"dtype": dtype, "kv_cache_mb": 1024, "max_running": 64, **engine_config},
            **app}  # fmt: skip
    if engine == "vllm" and vllm_eager:
        args["vllm"] = {"enforce_eager": True}
    return deploy_app(serve_url, name, args, timeout_s=900)


def run_cell(url: str, users: int, args: argparse.Namespace, out: Path) -> dict:
    from loadtests.runner import LoadTest, run_loadtest
    from loadtests.workload import Workload

    workload = Workload(prompt_words=(16, 64), max_tokens=args.max_tokens, ignore_eos=True, seed=users)
    test = LoadTest(url=url, out=out, users=users, duration_s=args.duration, grace_s=args.grace, workload=workload)
    run_loadtest(test)
    summary = json.loads((out / "summary.json").read_text())
    ms = lambda key, p: round(summary[key][p] * 1000, 1) if summary[key] else None  # noqa: E731
    return dict(output_tok_s=round(summary["output_throughput_tok_s"], 1), requests=summary["completed"],
                failures=summary["failures"], ttft_p50_ms=ms("ttft_s", "p50"), ttft_p99_ms=ms("ttft_s", "p99"),
                itl_p50_ms=ms("itl_s", "p50"), itl_p99_ms=ms("itl_s", "p99"))  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    """Output tok/s, TTFT and ITL (p50 solid, p99 dashed) against concurrency, one row of panels per model."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(14, 3.8 * len(models)))
    axes = fig.subplots(len(models), 3, squeeze=False)
    for m, model in enumerate(models):
        for engine in dict.fromkeys(r["engine"] for r in rows):
            cells = sorted((r for r in rows if r["model"] == model and r["engine"] == engine), key=lambda r: r["users"])
            xs = [r["users"] for r in cells]
            [line] = axes[m][0].plot(xs, [r["output_tok_s"] for r in cells], marker="o", label=engine)
            for ax, key in ((axes[m][1], "ttft"), (axes[m][2], "itl")):
                ax.plot(xs, [r[f"{key}_p50_ms"] for r in cells], marker="o", color=line.get_color(), label=engine)
                ax.plot(xs, [r[f"{key}_p99_ms"] for r in cells], ls="--", color=line.get_color())
        for ax, title in zip(axes[m], ("output tokens/s", "TTFT ms (p50, p99 dashed)", "ITL ms (p50, p99 dashed)"),
                             strict=True):  # fmt: skip
            ax.set_title(f"{model}: {title}")
            ax.set_xlabel("concurrent users")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(alpha=0.3)
        axes[m][1].set_yscale("log")
        axes[m][2].set_yscale("log")
        axes[m][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,bench")
    parser.add_argument(
        "--engines", default="; ".join(ENGINES), help=f"a subset of: {'; '.join(ENGINES)} (separated by ;)"
    )
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per cell")
    parser.add_argument("--grace", type=float, default=90.0, help="seconds running requests may finish")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (starts faster)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "moe-serve-bench"))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--plot", default="benchmarks/engines.png")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(";")]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or "vllm" not in engines:
        parser.error(f"--engines: unknown {unknown}" if unknown else "--engines must include vllm (the reference)")

    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    ray.init(address="local", num_cpus=16, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for name in args.models.split(","):
            model = serving_checkpoint(name, Path(args.cache_dir))
            for engine in engines:  # one at a time: three copies of the bench model would not fit in 24 GiB
                url = deploy(f"http://127.0.0.1:{port}", model, name, engine, DTYPES[name], args.vllm_eager)
                for users in (int(c) for c in args.concurrency.split(",")):
                    cell_dir = Path(args.out) / "engines" / name / engine.replace(", ", "-").replace(" ", "-")
                    cell = run_cell(url, users, args, cell_dir / f"c{users}")
                    rows.append(dict(model=name, users=users, engine=engine, **cell))
                    print(f"{name:>6} c={users:<3} {engine:<20} {cell}", flush=True)
                serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    for row in rows:  # each engine's throughput against vLLM's in the same cell
        vllm = next(r for r in rows if (r["model"], r["users"], r["engine"]) == (row["model"], row["users"], "vllm"))
        row["vs_vllm"] = round(row["output_tok_s"] / vllm["output_tok_s"], 2) if vllm["output_tok_s"] else None
    rows.sort(key=lambda r: (r["model"], r["users"], list(ENGINES).index(r["engine"])))
    meta = machine_meta(duration_s=args.duration, max_tokens=args.max_tokens, dtypes=DTYPES, vllm_eager=args.vllm_eager)
    columns = {"model": "model", "users": "users", "engine": "engine", "output tok/s": "output_tok_s",
               "x vLLM": "vs_vllm", "TTFT p50 ms": "ttft_p50_ms", "TTFT p99 ms": "ttft_p99_ms",
               "ITL p50 ms": "itl_p50_ms", "ITL p99 ms": "itl_p99_ms", "requests": "requests",
               "failed": "failures"}  # fmt: skip
    write_report(args.out, "engines", meta, rows, columns)
    plot(rows, Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
