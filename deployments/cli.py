"""`moe-serve`: the one command-line entry point.

    moe-serve make-demo [--arch mixtral] [--out DIR]     write a small checkpoint
    moe-serve generate --model DIR --prompt TEXT         complete a raw prompt in this process
    moe-serve run [--config FILE] [--model DIR] ...      serve the OpenAI API on a local Ray cluster
    moe-serve plan --model DIR --gpu-memory GiB ...      size a GPU deployment (shards, routers, KV room)

Heavy imports (torch, transformers, Ray) happen inside each subcommand, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def _make_demo(args: argparse.Namespace) -> int:
    from serving.demo import make_demo

    out = Path(args.out or f".data/demo-{args.arch}")
    make_demo(out, arch=args.arch, seed=args.seed, fused_experts=args.fused_experts, progress=True)
    print(f"wrote {args.arch} demo checkpoint to {out}")
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None


def _generate(args: argparse.Namespace) -> int:
    from serving.engine import EngineConfig, LLMEngine
    from serving.errors import CheckpointError, ConfigError, RequestError
    from serving.sampling import SamplingParams

    try:
        engine = LLMEngine.from_pretrained(args.model, EngineConfig(dtype=args.dtype))
        prompt = _parse_ids(args.prompt_ids) if args.prompt_ids else engine.tokenizer.encode(args.prompt)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        [result] = engine.generate([prompt], params)
    except (ConfigError, CheckpointError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text, "finish_reason": result.finish_reason}))
    else:
        print(result.text)
    return 0


def _run(args: argparse.Namespace) -> int:
    from deployments.local_cluster import load_args, serve_forever
    from serving.errors import ConfigError

    app_args = load_args(args.config)
    for key in ("model", "shards", "routers", "engine"):
        if getattr(args, key) is not None:
            app_args[key] = getattr(args, key)
    data_dir = Path(args.data_dir)
    demo = data_dir / "demo-mixtral"
    app_args.setdefault("model", str(demo))
    if Path(app_args["model"]).resolve() == demo.resolve() and not (demo / "config.json").exists():
        from serving.demo import make_demo

        print(f"building the demo checkpoint in {demo} ...", flush=True)
        make_demo(demo, arch="mixtral", progress=True)
    try:
        serve_forever(app_args, args.host, args.port)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from serving.capacity import CapacityError, load_config, plan_capacity
    from serving.errors import ConfigError

    try:
        plan = plan_capacity(load_config(args.model), args.gpu_memory, args.dtype, args.routers)
    except (ConfigError, CapacityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description="Expert-parallel MoE serving on Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("make-demo", help="write a small deterministic checkpoint (Hugging Face format)")
    demo.add_argument("--arch", choices=ARCHS, default="mixtral", help="architecture (default: mixtral)")
    demo.add_argument("--out", help="output folder (default: .data/demo-ARCH)")
    demo.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    demo.add_argument("--fused-experts", action="store_true", help="save experts fused (gate_up_proj/down_proj)")
    demo.set_defaults(func=_make_demo)

    gen = sub.add_parser("generate", help="complete a raw prompt (no chat template) in this process")
    gen.add_argument("--model", required=True, help="checkpoint folder")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text")
    what.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    gen.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ...}')
    gen.set_defaults(func=_generate)

    run = sub.add_parser("run", help="start a local Ray cluster and serve the OpenAI API until Ctrl-C")
    run.add_argument("--config", help="Serve config file; its first application's args are used")
    run.add_argument("--model", help="checkpoint folder (default: the demo checkpoint, built if missing)")
    run.add_argument("--shards", type=int, help="expert shards (default: 2; 0 keeps experts in the router)")
    run.add_argument("--routers", type=int, help="router replicas (default: 1)")
    run.add_argument("--engine", choices=("native",), help="inference engine (default: native)")
    run.add_argument("--data-dir", default=".data", help="where the demo checkpoint lives (default: .data)")
    run.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    run.set_defaults(func=_run)

    plan = sub.add_parser("plan", help="size an expert-parallel GPU deployment from a checkpoint's config.json")
    plan.add_argument("--model", required=True, help="checkpoint folder or its config.json (no weights needed)")
    plan.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU, GiB (e.g. 80)")
    plan.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16", help="weight format (default: bf16)")
    plan.add_argument("--routers", type=int, default=1, help="router replicas, one GPU each (default: 1)")
    plan.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # checkpoints are local folders; never reach for a hub
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
