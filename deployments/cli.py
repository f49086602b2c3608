"""`moe-serve`: the one command-line entry point.

    moe-serve make-demo [--arch mixtral] [--out DIR]     write a small checkpoint (--fp8: DeepSeek-V3's fp8 layout;
                                                         --router-skew zipf:S: expert load ~ rank^-S;
                                                         --size bench: DeepSeek-V2-Lite's or Qwen3-30B-A3B's
                                                         expert shapes)
    moe-serve generate --model DIR --prompt TEXT         complete a raw prompt in this process
    moe-serve run [--config FILE] [--model DIR] ...      serve the OpenAI API on a local Ray cluster
    moe-serve plan --model DIR --gpu-memory GiB ...      size a GPU deployment (shards, routers, KV room)
    moe-serve rebalance --load FILE --shards N ...      plan expert placement from measured load (docs/placement.md)
    moe-serve rebalance --url URL [--save FILE] [--shards N ...]   the same from a running server's load
    moe-serve rebalance --url URL --apply [--redundant R]          the server plans and deploys it online
    moe-serve ingest PATH... [--url URL] [--delete]     chunk, embed and store files for retrieval (RAG)
    moe-serve loadtest --url URL [--users N] ...         load-test an OpenAI-compatible server, write a report

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
    from serving.errors import ConfigError

    kind = f"{args.arch}{'-bench' if args.size == 'bench' else ''}{'-fp8' if args.fp8 else ''}"
    if args.router_skew:
        kind += f"-{args.router_skew.strip().replace(':', '')}"  # demo-mixtral-zipf1.0
    out = Path(args.out or f".data/demo-{kind}")
    try:
        make_demo(out, arch=args.arch, seed=args.seed, fused_experts=args.fused_experts, progress=True, fp8=args.fp8,
                  router_skew=args.router_skew, size=args.size)  # fmt: skip
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {kind} demo checkpoint to {out}")
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None


def _generate(args: argparse.Namespace) -> int:
    from serving.engine.llm_engine import LLMEngine
    from serving.engine_client import EngineConfig, SamplingParams
    from serving.errors import CheckpointError, ConfigError, RequestError

    try:
        engine = LLMEngine.from_pretrained(args.model, EngineConfig(dtype=args.dtype))
        prompt = _parse_ids(args.prompt_ids) if args.prompt_ids else engine.tokenizer.encode(args.prompt)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        [result] = engine.generate_batch([prompt], params)
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
    if isinstance(app_args.get("retrieval"), dict):  # the embedded store lives in the data dir too
        app_args["retrieval"] = {"store_path": str(data_dir / "qdrant"), **app_args["retrieval"]}
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
    from deployments.capacity import CapacityError, load_config, plan_capacity
    from serving.errors import ConfigError

    try:
        plan = plan_capacity(load_config(args.model), args.gpu_memory, args.dtype, args.routers)
    except (ConfigError, CapacityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.describe())
    return 0


def _rebalance(args: argparse.Namespace) -> int:
    """The load from its one source (--load FILE, or --url: a running server's, saved with --save), then, with
    --shards, the placement planned from it beside contiguous placement's."""
    from router.placement import PlacementError
    from router.rebalance import LoadFileError, parse_load, rebalance

    if args.apply:
        return _rebalance_apply(args)
    if args.dry_run:
        print("error: --dry-run goes with --apply (a plan without --apply deploys nothing anyway)", file=sys.stderr)
        return 2
    fetched = None
    if args.url is not None:
        if (fetched := _rebalance_fetch(args)) is None:
            return 2
        if args.shards is None:
            return 0
    elif args.shards is None:
        print("error: --shards is required with --load (the shards to plan for)", file=sys.stderr)
        return 2
    try:
        load = parse_load(fetched.to_json(), args.url) if fetched else _rebalance_load(args)
        redundant = args.redundant or 0
        report = rebalance(load, args.shards, redundant, num_groups=args.groups, num_nodes=args.nodes)
    except (LoadFileError, PlacementError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json()) if args.json else report.describe())
    return 0


def _rebalance_apply(args: argparse.Namespace) -> int:
    """--url URL --apply: the server plans from its routers' load with its own shards and deploys the plan
    (POST /v1/admin/rebalance); prints what it did."""
    from serving.errors import ConfigError
    from serving.rebalancing import RebalanceRequestError, post_rebalance

    clash = [flag for flag, on in (("--load", args.load), ("--save", args.save), ("--shards", args.shards),
                                   ("--groups", args.groups), ("--nodes", args.nodes != 1)) if on]  # fmt: skip
    if args.url is None or clash:
        said = "--apply needs --url" if args.url is None else f"{', '.join(clash)} cannot go with --apply"
        print(f"error: {said} (the server plans from its own load, for its own shards)", file=sys.stderr)
        return 2
    try:
        key = _secret(args.api_key_env, "--api-key-env", required=False)
        outcome = post_rebalance(args.url, key, args.redundant, dry_run=args.dry_run)
    except (ConfigError, RebalanceRequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(outcome))
        return 0
    print(f"{'applied' if outcome['applied'] else 'not applied'}: {outcome['reason']}")
    print(f"from {outcome['rows']} rows per MoE layer, {outcome['redundant']} redundant slots a layer")
    print("layer  served  planned")
    for i, (now, planned) in enumerate(
        zip(outcome["current_balancedness_per_layer"], outcome["balancedness_per_layer"], strict=True)
    ):
        print(f"{i:<5}  {now:<6.3f}  {planned:.3f}")
    return 0


def _rebalance_load(args: argparse.Namespace):
    """The [layers, experts] load in the --load FILE."""
    from router.rebalance import LoadFileError, read_load

    try:
        text = Path(args.load).read_text()
    except OSError as e:
        raise LoadFileError(f"--load {args.load}: {e.strerror or e}") from None
    return read_load(text, args.load)


def _ingest(args: argparse.Namespace) -> int:
    from serving.errors import ConfigError, RetrievalUnavailableError, UnknownCollectionError
    from serving.retrieval.remote import RemoteIngestError

    try:
        if args.url:
            return _ingest_remote(args)
        return _ingest_local(args)
    except (ConfigError, FileNotFoundError, RetrievalUnavailableError, UnknownCollectionError, RemoteIngestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _secret(env_var: str | None, flag: str, required: bool) -> str | None:
    """A key from an environment variable (never from the command line, where `ps` would show it)."""
    from serving.errors import ConfigError

    value = os.environ.get(env_var) if env_var else None
    if required and not value:
        raise ConfigError(f"{flag}: ${env_var} is not set")
    return value or None


def _ingest_local(args: argparse.Namespace) -> int:
    """Write the embedded store (or a Qdrant server) directly, in this process."""
    from serving.retrieval.ingest import delete_paths, ingest_paths
    from serving.retrieval.store import VectorStore

    api_key = _secret(args.qdrant_api_key_env, "--qdrant-api-key-env", required=bool(args.qdrant_api_key_env))
    where = dict(path=Path(args.data_dir) / "qdrant", url=args.qdrant_url, api_key=api_key)
    if args.delete:
        with VectorStore(**where) as store:
            deleted = delete_paths(args.paths, store, args.collection)
        print(f"deleted {deleted} chunks from {args.collection!r} in {store.location}")
        return 0
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:  # before the model loads
        raise FileNotFoundError(f"ingest: {', '.join(missing)} does not exist")
    from serving.retrieval.embedder import Embedder

    embedder = Embedder()
    with VectorStore(embedder.dim, **where) as store:
        report = ingest_paths(args.paths, store, embedder, args.collection)
    print(f"{args.collection!r} in {store.location}: {report.summary()}")
    for skipped in report.skipped:
        print(f"  skipped {skipped}")
    return 0


def _ingest_remote(args: argparse.Namespace) -> int:
    """Send the files to a running server's /v1/documents (it chunks, embeds and writes them)."""
    from serving.retrieval.ingest import read_documents, sources_of
    from serving.retrieval.remote import delete_sources, send_documents

    api_key = _secret(args.api_key_env, "--api-key-env", required=False)
    if args.delete:
        deleted = delete_sources(args.url, sources_of(args.paths), args.collection, api_key=api_key)
        print(f"deleted {deleted} chunks from {args.collection!r} at {args.url}")
        return 0
    documents, skipped = read_documents(args.paths)
    report = send_documents(args.url, documents, args.collection, api_key=api_key)
    report.skipped = skipped
    print(f"{args.collection!r} at {args.url}: {report.summary()}")
    for line in skipped:
        print(f"  skipped {line}")
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from loadtests.runner import RUN_FAILED, LoadTest, run_loadtest
    from loadtests.summary import SloError, parse_slos
    from loadtests.workload import Workload, parse_word_range

    try:
        workload = Workload(
            prompt_words=parse_word_range(args.prompt_words), max_tokens=args.max_tokens,
            chat_fraction=args.chat_fraction, rag=args.rag, model=args.model, rate=args.rate,
            ignore_eos=args.ignore_eos, seed=args.seed,
        )  # fmt: skip
        test = LoadTest(url=args.url, out=Path(args.out), users=args.users, duration_s=args.duration,
                        spawn_rate=args.spawn_rate, grace_s=args.grace, workload=workload,
                        slos=parse_slos(args.slo))  # fmt: skip
    except (SloError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return RUN_FAILED
    return run_loadtest(test)


def _rebalance_fetch(args: argparse.Namespace):
    """--url: GET the server's /v1/admin/expert-load, write it as a load file (--save) or, with nothing to
    plan, print a summary. Returns the ExpertLoad, or None after saying why it could not."""
    from serving.errors import ConfigError
    from serving.expert_load import ExpertLoadFetchError, fetch_expert_load

    try:
        load = fetch_expert_load(args.url, _secret(args.api_key_env, "--api-key-env", required=False))
    except (ConfigError, ExpertLoadFetchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if args.save is None:
        if args.shards is None:
            print(load.summary())
        return load
    try:
        Path(args.save).write_text(json.dumps(load.to_json()) + "\n")
    except OSError as e:
        print(f"error: --save {args.save}: {e}", file=sys.stderr)
        return None
    layers, rows = len(load.layers), sum(map(sum, load.load))
    said = f"wrote the expert load of {layers} MoE layers ({rows} rows, {load.routers} router(s)) to {args.save}"
    print(said, file=sys.stderr if args.json else sys.stdout)  # --json: stdout is the report alone
    return load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description="Expert-parallel MoE serving on Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("make-demo", help="write a small deterministic checkpoint (Hugging Face format)")
    demo.add_argument("--arch", choices=ARCHS, default="mixtral", help="architecture (default: mixtral)")
    demo.add_argument("--out", help="output folder (default: .data/demo-ARCH)")
    demo.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    demo.add_argument("--fused-experts", action="store_true", help="save experts fused (gate_up_proj/down_proj)")
    demo.add_argument(
        "--fp8", action="store_true", help="deepseek_v3 only: DeepSeek-V3's block-wise fp8 layout (128x128 scales)"
    )
    demo.add_argument(
        "--router-skew", metavar="zipf:S",
        help="bias the gates so each MoE layer's expert load follows Zipf(S): the rank-r expert gets load ~ r^-S "
        "(e.g. zipf:1.0; ranks drawn per layer from --seed)",
    )  # fmt: skip
    demo.add_argument(
        "--size", choices=("tiny", "bench"), default="tiny",
        help="tiny (default): experts of 64, float32, ~2 MB; bench: a real model's expert shapes in bfloat16, where "
        "a shard's compute outweighs its hop on CPU: deepseek_v3 DeepSeek-V2-Lite's (64 experts of 2048 x 1408, "
        "top-6, 2 shared; ~3.7 GB), qwen3_moe Qwen3-30B-A3B's (128 experts of 2048 x 768, top-8; ~3.5 GB)",
    )  # fmt: skip
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
    run.add_argument(
        "--engine",
        choices=("native", "vllm"),
        help="inference engine (default: native; vllm needs `make install-vllm` or `pip install vllm`)",
    )
    run.add_argument("--data-dir", default=".data", help="demo checkpoint and Qdrant store (default: .data)")
    run.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    run.set_defaults(func=_run)

    plan = sub.add_parser("plan", help="size an expert-parallel GPU deployment from a checkpoint's config.json")
    plan.add_argument("--model", required=True, help="checkpoint folder or its config.json (no weights needed)")
    plan.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU, GiB (e.g. 80)")
    plan.add_argument(
        "--dtype", choices=("bf16", "fp8"), default="bf16",
        help="weights in GPU memory (default: bf16, what the engine serves; fp8 checkpoints are dequantized to it)",
    )  # fmt: skip
    plan.add_argument("--routers", type=int, default=1, help="router replicas, one GPU each (default: 1)")
    plan.set_defaults(func=_plan)

    reb = sub.add_parser("rebalance", help="expert load from a file or a running server; a placement planned from it")
    source = reb.add_mutually_exclusive_group(required=True)  # where the load comes from: one of these
    source.add_argument("--load", metavar="FILE", help='JSON {"load": [[rows of each expert] for each MoE layer]}')
    source.add_argument("--url", help="a running moe-serve server: read its GET /v1/admin/expert-load")
    reb.add_argument("--save", metavar="FILE",
                     help="with --url: write the load as a load file, JSON (default: print a summary)")  # fmt: skip
    reb.add_argument("--api-key-env", metavar="VAR", default="MOE_SERVE_ADMIN_KEY",
                     help="with --url: env var holding an admin key (default: MOE_SERVE_ADMIN_KEY)")  # fmt: skip
    reb.add_argument("--shards", type=int, help="plan a placement for this many expert shards (required with --load)")
    reb.add_argument("--redundant", type=int,
                     help="expert copies beyond one each, per layer (default: 0; with --apply the server's "
                     "rebalance.redundant)")  # fmt: skip
    reb.add_argument("--apply", action="store_true",
                     help="with --url: the server plans from its load for its shards and deploys the plan as a "
                     "rolling update (no request lost)")  # fmt: skip
    reb.add_argument("--dry-run", action="store_true", help="with --apply: plan on the server, deploy nothing")
    reb.add_argument("--groups", type=int, help="with --nodes: expert groups (consecutive ids) kept on one node")
    reb.add_argument("--nodes", type=int, default=1, help="shard nodes for hierarchical placement (default: 1)")
    reb.add_argument("--json", action="store_true", help="print the placement and balancedness as JSON")
    reb.set_defaults(func=_rebalance)

    ingest = sub.add_parser("ingest", help="chunk, embed and store .txt/.md files for retrieval (or --delete them)")
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (walked recursively)")
    ingest.add_argument("--collection", default="docs", help="Qdrant collection (default: docs)")
    ingest.add_argument("--url", help="a running moe-serve server: send the files to its /v1/documents")
    ingest.add_argument("--api-key-env", metavar="VAR", default="MOE_SERVE_ADMIN_KEY",
                        help="with --url: env var holding an admin key (default: MOE_SERVE_ADMIN_KEY)")  # fmt: skip
    ingest.add_argument("--data-dir", default=".data", help="the embedded store is DATA_DIR/qdrant (default: .data)")
    ingest.add_argument("--qdrant-url", help="a Qdrant server to write to instead of the embedded store")
    ingest.add_argument("--qdrant-api-key-env", metavar="VAR", help="environment variable holding the server's API key")
    ingest.add_argument("--delete", action="store_true", help="delete these files' chunks instead of ingesting")
    ingest.set_defaults(func=_ingest)

    load = sub.add_parser("loadtest", help="load-test any OpenAI-compatible server with locust; write a report")
    load.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    load.add_argument("--users", type=int, default=8, help="concurrent users (default: 8)")
    load.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    load.add_argument("--rate", type=float, help="total requests/s, paced (default: each user sends back to back)")
    load.add_argument("--duration", type=float, default=30.0, help="seconds of load (default: 30)")
    load.add_argument("--grace", type=float, default=10.0, help="seconds running requests may finish (default: 10)")
    load.add_argument("--out", default=".data/loadtest", help="report folder (default: .data/loadtest)")
    load.add_argument("--slo", default="errors=0", help="SLOs, e.g. ttft_p99=2.0,itl_p99=0.2,errors=0 (s)")
    load.add_argument("--prompt-words", default="16:64", help="prompt words, MIN:MAX uniform (default: 16:64)")
    load.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: 64)")
    load.add_argument("--chat-fraction", type=float, default=0.5, help="share of chat requests (default: 0.5)")
    load.add_argument("--rag", action="store_true", help='add "retrieval": {"top_k": 4, "collection": "docs"}')
    load.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    load.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens (vLLM extension)")
    load.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")
    load.set_defaults(func=_loadtest)

    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # checkpoints are local folders; never reach for a hub
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
