"""Our load generator against the field's, on one server and one load: `moe-serve loadtest` (locust),
`vllm bench serve` and guidellm, back to back, each measured from its own result file.

    python -m benchmarks.loadgens --guidellm /tmp/lg-venv/bin/guidellm [--users 6] [--duration 40]
                                  [--prompt-tokens 96] [--max-tokens 32] [--url URL --tokenizer DIR]

Without --url it serves the demo app of configs/demo.yaml (2 expert shards, no RAG) on a local Ray
cluster. The load: streaming /v1/completions, greedy, `--max-tokens` tokens each with ignore_eos,
prompts of about `--prompt-tokens` tokens, `--users` requests in flight at all times (closed loop).
A short run of ours warms the server first. Then ours runs for `--duration` seconds; the number of
requests it finished is what vLLM (`--num-prompts`) and guidellm (`max_requests`) send, each after a
warm-up of one request per stream that it leaves out of its statistics; then ours again, so that the
two runs of ours show how much the machine alone moves the numbers.

Prompts: vLLM's random dataset and guidellm's synthetic data are made of exactly N tokens of the
checkpoint's tokenizer; ours draws words, so the word count is the one whose prompts (ours, with this
seed) the same tokenizer makes closest to N tokens on average. Every row reports the server's own
count (usage.prompt_tokens), as each tool recorded it.

What each column is, and which metric of each tool it is (milliseconds, p50 and p99):
    TTFT  request sent -> first chunk with text. guidellm starts the clock when the request's headers
          go out; ours and vLLM just before the request is handed to the HTTP client.
    ITL   every gap between two chunks with text, of every request (ours: itl_s; vLLM: itl). A chunk
          may carry more than one token (the server holds back an incomplete UTF-8 character).
          guidellm does not measure gaps.
    TPOT  per request, (last token's arrival - first token's) / (output tokens - 1) (ours: tpot_s;
          vLLM: tpot; guidellm calls it inter_token_latency_ms and weights each request by its tokens:
          the same percentiles when every request has the same output length). guidellm's own TPOT
          includes the TTFT: not used.
    output tok/s, req/s   each tool's own: over the first request sent to the last one done (ours,
          vLLM) or over its benchmark window (guidellm, the mean of its time-weighted rate).
    server TTFT / ITL mean   the server's own histograms (moe_time_to_first_token_seconds,
          moe_inter_token_latency_seconds) between a snapshot before the run and one after, warm-ups
          included: the same requests timed inside the server, without any client. Each tool's
          figure against these says whether a difference between rows is in the tools or in the server.
    load 1m   the machine's 1-minute load average at the end of the run (other jobs show up here).
Writes DIR/loadgens.json (every row, the commands run) beside each tool's own files and logs, and
prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo-mixtral"  # the served model name of configs/demo.yaml
TOOL_TIMEOUT_S = 900  # one tool's run, its start included (vLLM's imports take a minute on 2 busy cores)


@dataclass(frozen=True)
class Row:
    """One tool's run, in its own definitions (see the module docstring for which metric is which)."""

    tool: str
    requests: int
    failed: int
    prompt_tokens: float  # mean per request, the server's count
    output_tokens: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float | None  # None: the tool does not measure chunk gaps (guidellm)
    itl_p99_ms: float | None
    tpot_p50_ms: float
    tpot_p99_ms: float
    output_tok_s: float
    request_s: float
    ttft_mean_ms: float
    server_ttft_mean_ms: float | None = None  # the server's own mean over the run (see server_means)
    server_itl_mean_ms: float | None = None
    server_requests: int | None = None  # requests the server counted in the run (warm-ups included)
    load_1m: float | None = None  # the machine's load average at the end of the run (others' jobs show here)


def parse_ours(summary_file: Path, tool: str = "moe-serve loadtest") -> Row:
    """A `moe-serve loadtest` summary.json."""
    s = json.loads(summary_file.read_text())
    ms = lambda key, p: s[key][p] * 1000  # noqa: E731
    return Row(tool, s["completed"], s["failures"], s["prompt_tokens"]["mean"], s["output_tokens"]["mean"],
               ms("ttft_s", "p50"), ms("ttft_s", "p99"), ms("itl_s", "p50"), ms("itl_s", "p99"),
               ms("tpot_s", "p50"), ms("tpot_s", "p99"), s["output_throughput_tok_s"],
               s["request_throughput_rps"], ms("ttft_s", "mean"))  # fmt: skip


def parse_vllm(result_file: Path) -> Row:
    """A `vllm bench serve --save-result` JSON, run with --metric-percentiles 50,99."""
    r = json.loads(result_file.read_text())
    done = r["completed"]
    return Row("vllm bench serve", done, r["failed"], r["total_input_tokens"] / done, r["total_output_tokens"] / done,
               r["p50_ttft_ms"], r["p99_ttft_ms"], r["p50_itl_ms"], r["p99_itl_ms"], r["p50_tpot_ms"],
               r["p99_tpot_ms"], r["output_throughput"], r["request_throughput"], r["mean_ttft_ms"])  # fmt: skip


def parse_guidellm(result_file: Path) -> Row:
    """guidellm's `--output kind=json` file, one benchmark (a single concurrency)."""
    [benchmark] = json.loads(result_file.read_text())["benchmarks"]
    m = benchmark["metrics"]
    ok = lambda key: m[key]["successful"]  # noqa: E731
    pct = lambda key, p: ok(key)["percentiles"][p]  # noqa: E731
    totals = m["request_totals"]
    return Row("guidellm", totals["successful"], totals["errored"] + totals["incomplete"],
               ok("prompt_token_count")["mean"], ok("output_token_count")["mean"],
               pct("time_to_first_token_ms", "p50"), pct("time_to_first_token_ms", "p99"), None, None,
               pct("inter_token_latency_ms", "p50"), pct("inter_token_latency_ms", "p99"),
               ok("output_tokens_per_second")["mean"], ok("requests_per_second")["mean"],
               ok("time_to_first_token_ms")["mean"])  # fmt: skip


SERVER_METRICS = {"ttft": "ray_moe_time_to_first_token_seconds", "itl": "ray_moe_inter_token_latency_seconds"}
METRICS_FLUSH_S = 5.0  # Ray's metrics agent reports every second here (metrics_report_interval_ms below)


def server_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the server's TTFT and ITL histograms (serving/metrics.py), over every replica."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()

    def total(series: str) -> float:  # a series with labels, or without
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((series + "{", series + " ")))

    return {key: (total(f"{name}_sum"), total(f"{name}_count")) for key, name in SERVER_METRICS.items()}


def with_server_means(row: Row, before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> Row:
    """`row` with the server's mean TTFT and ITL between two snapshots: the same requests timed where
    they were received (the Ingress) and where each token left the engine, without any client."""

    def mean_ms(key: str) -> float | None:
        count = after[key][1] - before[key][1]
        return (after[key][0] - before[key][0]) / count * 1000 if count else None

    requests = round(after["ttft"][1] - before["ttft"][1])
    return replace(
        row, server_ttft_mean_ms=mean_ms("ttft"), server_itl_mean_ms=mean_ms("itl"), server_requests=requests
    )


def vllm_command(vllm: list[str], url: str, tokenizer: Path, args: argparse.Namespace, requests: int,
                 out: Path) -> list[str]:  # fmt: skip
    return [*vllm, "bench", "serve", "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", MODEL, "--tokenizer", str(tokenizer), "--dataset-name", "random",
            "--random-input-len", str(args.prompt_tokens), "--random-output-len", str(args.max_tokens),
            "--ignore-eos", "--temperature", "0", "--max-concurrency", str(args.users),
            "--num-prompts", str(requests), "--num-warmups", str(args.users),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(out), "--result-filename", "vllm.json"]  # fmt: skip


def guidellm_command(guidellm: list[str], url: str, tokenizer: Path, args: argparse.Namespace, requests: int,
                     out: Path) -> list[str]:  # fmt: skip
    backend = f"kind=openai_http,target={url},model={MODEL},request_format=/v1/completions,extras.body.temperature=0"
    profile = f"kind=concurrent,streams={args.users},warmup.value={args.users},warmup.mode=requests"
    return [*guidellm, "run", "--backend", backend, "--profile", profile,
            "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.max_tokens}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}", "--constraint",
            f"kind=max_requests,count={requests + args.users}", "--output", f"kind=json,path={out / 'guidellm.json'}",
            "--disable-console-interactive"]  # fmt: skip


def prompt_words_for(tokens: int, tokenizer: Path, users: int, seed: int) -> tuple[int, float]:
    """The word count whose prompts (users' streams, this seed) average closest to `tokens` tokens, and
    that average."""
    from loadtests.workload import Workload
    from serving.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)

    def mean_tokens(words: int) -> float:
        workload = Workload(prompt_words=(words, words), seed=seed)
        samplers = [workload.sampler(u) for u in range(users)]
        lengths = [len(tok.encode(s.next()[1])) for s in samplers for _ in range(32)]
        return sum(lengths) / len(lengths)

    candidates = {w: mean_tokens(w) for w in range(max(1, tokens // 4), tokens + 1)}
    best = min(candidates, key=lambda w: abs(candidates[w] - tokens))
    return best, candidates[best]


def run_ours(url: str, args: argparse.Namespace, words: int, out: Path, duration_s: float) -> Path:
    from loadtests.runner import LoadTest, run_loadtest
    from loadtests.workload import Workload

    workload = Workload(prompt_words=(words, words), max_tokens=args.max_tokens, chat_fraction=0.0,
                        ignore_eos=True, seed=args.seed)  # fmt: skip
    run_loadtest(LoadTest(url=url, out=out, users=args.users, duration_s=duration_s, workload=workload))
    return out / "summary.json"


def run_tool(command: list[str], log: Path) -> None:
    """Run one tool to the end, its output into `log`; a failure names the tool, its log and its exit code."""
    print("$ " + shlex.join(command), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                              timeout=TOOL_TIMEOUT_S, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} exited with code {done.returncode}; its output is in {log}")


@contextmanager
def demo_server(cache_dir: Path) -> Iterator[tuple[str, Path, str]]:
    """The demo app of configs/demo.yaml without RAG on a local Ray cluster: (its URL, its checkpoint,
    its Prometheus endpoint)."""
    import ray
    from ray import serve

    from deployments.local_cluster import deploy_app, free_port, load_args
    from serving.demo import make_demo

    checkpoint = cache_dir / "demo-mixtral"
    if not (checkpoint / "config.json").exists():
        make_demo(checkpoint, "mixtral", progress=False)
    app = {**load_args(str(REPO_ROOT / "configs" / "demo.yaml")), "model": str(checkpoint.resolve())}
    app.pop("retrieval", None)  # the load sends no RAG requests; ingesting the docs would only slow the start
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    port, metrics_port = free_port(), free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = deploy_app(f"http://127.0.0.1:{port}", "loadgens", app)
        yield url, checkpoint, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def compare(url: str, tokenizer: Path, metrics_url: str | None, args: argparse.Namespace,
            out: Path) -> tuple[list[Row], dict[str, Any]]:  # fmt: skip
    """Warm-up, ours, vLLM, guidellm, ours again, one after the other on the same server."""
    words, expected = prompt_words_for(args.prompt_tokens, tokenizer, args.users, args.seed)
    print(f"ours: prompts of {words} words, {expected:.1f} tokens on average", flush=True)
    run_ours(url, args, words, out / "warmup", args.warmup)

    def measured(run: Callable[[], Row]) -> Row:
        if metrics_url is None:
            return replace(run(), load_1m=os.getloadavg()[0])
        time.sleep(METRICS_FLUSH_S)  # the previous run's last requests reach the endpoint first
        before = server_totals(metrics_url)
        row = replace(run(), load_1m=os.getloadavg()[0])
        time.sleep(METRICS_FLUSH_S)
        return with_server_means(row, before, server_totals(metrics_url))

    def ours(name: str, tool: str = "moe-serve loadtest") -> Row:
        return parse_ours(run_ours(url, args, words, out / name, args.duration), tool)

    def vllm() -> Row:
        run_tool(commands["vllm"], out / "vllm.log")
        return parse_vllm(out / "vllm.json")

    def guidellm() -> Row:
        run_tool(commands["guidellm"], out / "guidellm.log")
        return parse_guidellm(out / "guidellm.json")

    rows = [measured(lambda: ours("ours"))]
    requests = rows[0].requests  # what the others send
    commands = {}
    for tool in args.tools:  # in the order given
        if tool == "vllm":
            commands[tool] = vllm_command(shlex.split(args.vllm), url, tokenizer, args, requests, out)
            rows.append(measured(vllm))
        else:
            commands[tool] = guidellm_command(shlex.split(args.guidellm), url, tokenizer, args, requests, out)
            rows.append(measured(guidellm))
    rows.append(measured(lambda: ours("ours-again", "moe-serve loadtest, again")))
    return rows, {"prompt_words": words, "commands": commands}


COLUMNS = (  # header, Row field, digits
    ("requests", "requests", 0), ("failed", "failed", 0), ("prompt tok", "prompt_tokens", 1),
    ("output tok", "output_tokens", 1), ("TTFT p50", "ttft_p50_ms", 0), ("TTFT p99", "ttft_p99_ms", 0),
    ("ITL p50", "itl_p50_ms", 1), ("ITL p99", "itl_p99_ms", 0), ("TPOT p50", "tpot_p50_ms", 1),
    ("TPOT p99", "tpot_p99_ms", 1), ("output tok/s", "output_tok_s", 1), ("req/s", "request_s", 2),
    ("TTFT mean", "ttft_mean_ms", 0), ("server TTFT mean", "server_ttft_mean_ms", 0),
    ("server ITL mean", "server_itl_mean_ms", 1), ("server requests", "server_requests", 0),
    ("load 1m", "load_1m", 1),
)  # fmt: skip
RATIOS = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tok_s",
          "request_s", "server_ttft_mean_ms", "server_itl_mean_ms")  # fmt: skip


def tables(rows: list[Row]) -> str:
    """The values (ms for latencies), then each tool's ratio to the first run of ours."""
    cell = lambda v, digits: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    lines = ["| tool | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r.tool} | " + " | ".join(cell(getattr(r, k), d) for _, k, d in COLUMNS) + " |" for r in rows]
    ours = rows[0]
    headers = [h for h, k, _ in COLUMNS if k in RATIOS]
    lines += ["", "| x moe-serve loadtest | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for r in rows[1:]:
        pairs = [(getattr(r, k), getattr(ours, k)) for k in RATIOS]
        ratios = [None if mine is None or base is None else mine / base for mine, base in pairs]
        lines.append(f"| {r.tool} | " + " | ".join(cell(x, 2) for x in ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running moe-serve server serving demo-mixtral (default: start the demo)")
    parser.add_argument("--tokenizer", help="with --url: the checkpoint folder with its tokenizer")
    parser.add_argument("--metrics-url", help="with --url: its Prometheus endpoint, for the server's own means")
    parser.add_argument("--users", type=int, default=6, help="requests in flight (default: 6)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of each run of ours (default: 40)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the first run")
    parser.add_argument("--prompt-tokens", type=int, default=96, help="prompt length in tokens (default: 96)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="our runner's prompt seed")
    parser.add_argument("--tools", default="vllm,guidellm", help="which of vllm,guidellm to run after ours, in order")
    parser.add_argument(
        "--vllm",
        default=f"{sys.executable} -m benchmarks.vllm_cli",
        help="the command that is `vllm` (default: vLLM of this venv, see benchmarks/vllm_cli.py)",
    )
    parser.add_argument("--guidellm", default="guidellm", help="the guidellm executable, e.g. a venv's bin/guidellm")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "moe-serve-bench"))
    parser.add_argument("--out", default="benchmarks/results/loadgens")
    args = parser.parse_args(argv)  # fmt: skip
    args.tools = list(dict.fromkeys(t.strip() for t in args.tools.split(",") if t.strip()))
    if unknown := [t for t in args.tools if t not in ("vllm", "guidellm")]:
        parser.error(f"--tools: unknown {unknown}; choose from vllm, guidellm")
    if args.url and not args.tokenizer:
        parser.error("--url needs --tokenizer: the served checkpoint's folder (vLLM and guidellm make prompts with it)")
    if "guidellm" in args.tools and shutil.which(shlex.split(args.guidellm)[0]) is None:
        parser.error(f"--guidellm: {args.guidellm!r} is not an executable; install guidellm (docs/loadtests.md)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.url:
        rows, extra = compare(args.url.rstrip("/"), Path(args.tokenizer), args.metrics_url, args, out)
    else:
        with demo_server(Path(args.cache_dir)) as (url, checkpoint, metrics_url):
            rows, extra = compare(url, checkpoint, metrics_url, args, out)

    from benchmarks.report import machine_meta

    meta = machine_meta(users=args.users, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                        duration_s=args.duration, **extra)  # fmt: skip
    (out / "loadgens.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\n{meta}\n\n{tables(rows)}\n\n-> {out / 'loadgens.json'}")


if __name__ == "__main__":
    main()
