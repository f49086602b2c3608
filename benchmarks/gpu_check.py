"""The GPU checks in one run: the tests marked `gpu`, then a decode table against transformers and the
memory-bandwidth floor, on one device. Made for a GPU machine with only torch, transformers and
safetensors (no Ray, no vLLM, no network); runs on the CPU too, as its own smoke test.

    python -m benchmarks.gpu_check                       # cuda: the bench model, batches 1, 16, 64
    python -m benchmarks.gpu_check --device cpu --model tiny --batches 1,4 --steps 4

Decode: B requests with 32-token prompts are prefilled, then `--steps` decode steps are timed one by one
after warm-up (CUDA events on a GPU) and the median step gives tokens/s = B / step. transformers'
`generate` runs the same prompts; its decode time is generate(1 + steps new tokens) - generate(1 new
token), median of 3. The floor is the bytes one step must read (every weight except the routed experts,
plus each routed expert the step's tokens were sent to, counted from the engine's own routing counts,
plus the KV cache rows read) over the bandwidth of a large device-to-device copy measured in the same run
((read + write bytes) / time). Goal: a batch-1 step within 2x of the floor.

Writes gpu_check.md (the table), gpu_check.json and tests.log under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN = 32
REPO = Path(__file__).resolve().parents[1]


def model_config(name: str):
    """bench: the engines benchmark's DeepSeek-V2-Lite-sized model (benchmarks/engine.py); tiny: a small one."""
    from transformers import DeepseekV3Config

    if name == "bench":
        from benchmarks.engine import bench_config

        return bench_config()
    return DeepseekV3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=1,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip


def build_checkpoint(name: str, root: Path, device: torch.device) -> Path:
    """Random bf16 weights, initialised on the device (fast on a GPU), saved in transformers' own format."""
    from transformers import AutoModelForCausalLM

    out = root / name
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(model_config(name), dtype=torch.bfloat16)
        model.save_pretrained(out)
        del model
    return out


class Timer:
    """Seconds between start() and stop(): CUDA events on a GPU (after the work is queued), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._start, self._stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._stop.record()
            self._stop.synchronize()
            return self._start.elapsed_time(self._stop) / 1e3
        return time.perf_counter() - self._t0


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of a large copy on the device: (read + write) / time, median of 5 after a warm-up."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer, times = Timer(device), []
    for i in range(6):
        timer.start()
        dst.copy_(src)
        seconds = timer.stop()
        if i:
            times.append(seconds)
    return 2 * src.numel() / statistics.median(times)


def ours(path: Path, device: torch.device, batch: int, steps: int, prompts: list[list[int]], kernel: str) -> dict:
    """Median decode step of our engine at `batch` (routed experts on `kernel`), and the bytes that step reads."""
    from serving.engine.kv_cache import KVCache
    from serving.engine.llm_engine import LLMEngine
    from serving.engine_client import EngineConfig, SamplingParams
    from serving.metrics import EXPERT_TOKENS, MemorySink
    from serving.model.decoder import load_local

    model, experts = load_local(path, torch.bfloat16, device, kernel)
    sink = MemorySink()
    config = EngineConfig(dtype="bfloat16", kv_cache_mb=1024, max_running=batch, max_batched_tokens=batch * PROMPT_LEN)
    engine = LLMEngine(model, experts, None, config, metrics=sink)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for prompt in prompts[:batch]:
        engine.add_request(prompt, params)
    engine.step()  # the prefill (every prompt fits the step's token budget)
    for _ in range(3):  # warm-up decodes
        engine.step()
    timer, times, hits = Timer(device), [], []
    for _ in range(steps):
        sink.records.clear()
        timer.start()
        engine.step()
        times.append(timer.stop())
        hits.append(sum(1 for name, _, _ in sink.records if name == EXPERT_TOKENS.name))  # (layer, expert) pairs
    cfg = model.config
    expert_bytes = 3 * cfg.moe_intermediate_size * cfg.hidden_size * 2  # gate, up, down in bf16
    dense_bytes = model.weight_bytes
    # each step reads every sequence's cache rows; the context grows from PROMPT_LEN + 4 over the timed steps
    kv_bytes = KVCache.bytes_per_token(model.cache_shapes(), torch.bfloat16) * batch * (PROMPT_LEN + 4 + steps // 2)
    step = statistics.median(times)
    return dict(step_s=step, tok_s=batch / step, bytes=dense_bytes + statistics.median(hits) * expert_bytes + kv_bytes)


@torch.inference_mode()
def theirs(path: Path, device: torch.device, batch: int, steps: int, prompts: list[list[int]]) -> float:
    """transformers' decode tokens/s at `batch`: generate(1 + steps) - generate(1), median of 3."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor(prompts[:batch], device=device)
    timer = Timer(device)

    def run(new: int) -> float:
        timer.start()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return timer.stop()

    run(2)  # warm-up
    decode = statistics.median(run(1 + steps) - run(1) for _ in range(3))
    return batch * steps / decode


def run_tests(device: torch.device, out: Path) -> str:
    """The tests marked gpu, on `device`; their log goes to out/tests.log. Returns pytest's summary line."""
    env = {**os.environ, "MOE_TEST_DEVICE": str(device), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/serving", "-p", "no:cacheprovider"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (out / "tests.log").write_text(result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else f"pytest exited {result.returncode} with no output"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="bench", choices=("bench", "tiny"))
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per batch")
    parser.add_argument("--skip-tests", action="store_true", help="only the decode table")
    parser.add_argument(
        "--expert-kernel",
        default="loop",
        choices=("loop", "vllm", "auto"),
        help="engine_config.expert_kernel (vllm needs vLLM: not on the GPU machine)",
    )
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "moe-serve-gpu-check"))
    parser.add_argument("--out", default="benchmarks/results/gpu_check")
    args = parser.parse_args()

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tests = "skipped" if args.skip_tests else run_tests(device, out)
    print(f"tests marked gpu on {device}: {tests}", flush=True)
    path = build_checkpoint(args.model, Path(args.cache_dir), device)
    bandwidth = copy_bandwidth(device, 1024 if device.type == "cuda" else 256)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    vocab = model_config(args.model).vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = torch.randint(0, vocab, (max(batches), PROMPT_LEN), generator=gen).tolist()
    rows = []
    for batch in batches:
        mine = ours(path, device, batch, args.steps, prompts, args.expert_kernel)
        hf = theirs(path, device, batch, args.steps, prompts)
        floor = mine["bytes"] / bandwidth
        rows.append(dict(batch=batch, ours_tok_s=round(mine["tok_s"], 1), transformers_tok_s=round(hf, 1),
                         ours_over_transformers=round(mine["tok_s"] / hf, 2), step_ms=round(mine["step_s"] * 1e3, 2),
                         floor_ms=round(floor * 1e3, 2), step_over_floor=round(mine["step_s"] / floor, 2)))  # fmt: skip
        print(rows[-1], flush=True)
    meta = dict(
        date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, model=args.model, expert_kernel=args.expert_kernel, steps=args.steps,
        threads=torch.get_num_threads(), copy_gb_s=round(bandwidth / 1e9, 1),
        tests=tests, seconds=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    header = "| batch | ours tok/s | transformers tok/s | ours / transformers | step ms | floor ms | step / floor |"
    table = [header, "|---|---|---|---|---|---|---|"] + [
        "| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows
    ]
    (out / "gpu_check.md").write_text(f"{json.dumps(meta)}\n\n" + "\n".join(table) + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n".join(table))
    print(f"batch-1 step / floor: {rows[0]['step_over_floor']} (goal <= 2); {meta['seconds']} s in all")


if __name__ == "__main__":
    main()
