"""Decode throughput: our engine against transformers' generate, same checkpoint, same requests.

    python -m benchmarks.engine [--models demo,bench] [--concurrency 1,16] [--repeats 3] [--out DIR]

For each model and concurrency level, both engines get the same requests (mixed prompt and output
lengths, greedy). Ours runs them with continuous batching; transformers runs them as one padded
batch with generate() (its standard offline path), which must run until the longest request is
done. Throughput counts only the tokens each request asked for, over wall time. Runs alternate
between the engines; the table shows medians and the ratio ours/transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import machine_meta, write_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_config():
    """DeepSeek-V2-Lite-like expert sizes (hidden 2048, 64 routed experts of width 1408, top-6,
    2 shared experts), 4 layers (the first dense), random weights."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=32000, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=2, first_k_dense_replace=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip


def build_checkpoint(name: str, root: Path) -> Path:
    out = root / name
    if (out / "config.json").exists():
        return out
    if name == "demo":
        from serving.demo import make_demo

        return make_demo(out, arch="mixtral", progress=False)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(bench_config(), dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """n requests: prompt lengths 16..256 and output lengths 16..128, drawn once."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(n):
        prompt_len = int(torch.randint(16, 257, (1,), generator=gen))
        out_len = int(torch.randint(16, 129, (1,), generator=gen))
        requests.append((torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), out_len))
    return requests


def run_ours(engine, requests) -> float:
    from serving.engine_client import SamplingParams

    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in requests]
    start = time.perf_counter()
    engine.generate_batch([p for p, _ in requests], params)
    return time.perf_counter() - start


@torch.inference_mode()
def run_transformers(model, requests) -> float:
    longest_prompt = max(len(p) for p, _ in requests)
    ids = torch.zeros(len(requests), longest_prompt, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(requests):  # left padding, as generate() expects for decoder-only models
        ids[i, longest_prompt - len(p) :] = torch.tensor(p)
        mask[i, longest_prompt - len(p) :] = 1
    longest_out = max(m for _, m in requests)
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=longest_out, min_new_tokens=longest_out,
                   do_sample=False, pad_token_id=0)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,bench")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "moe-serve-bench"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from serving.engine.llm_engine import LLMEngine
    from serving.engine_client import EngineConfig
    from serving.model.decoder import load_local

    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models.split(","):
        path = build_checkpoint(name, Path(args.cache_dir))
        model, experts = load_local(path, dtype)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        for n in [int(c) for c in args.concurrency.split(",")]:
            requests = workload(n, model.config.vocab_size)
            useful = sum(m for _, m in requests)
            ours_s, theirs_s = [], []
            for _ in range(args.repeats):  # alternate, so both see the same machine noise
                engine = LLMEngine(model, experts, None, EngineConfig(dtype=args.dtype, kv_cache_mb=1024))
                ours_s.append(run_ours(engine, requests))
                theirs_s.append(run_transformers(reference, requests))
            ours, theirs = useful / statistics.median(ours_s), useful / statistics.median(theirs_s)
            rows.append(dict(model=name, concurrency=n, output_tokens=useful, ours_tok_s=round(ours, 1),
                             transformers_tok_s=round(theirs, 1), ratio=round(ours / theirs, 2),
                             ours_runs_s=ours_s, transformers_runs_s=theirs_s))  # fmt: skip
            print(f"{name:>6} c={n:<3} ours {ours:8.1f} tok/s  transformers {theirs:8.1f} tok/s  x{ours / theirs:.2f}")
        del model, experts, reference

    meta = machine_meta(dtype=args.dtype, repeats=args.repeats)
    columns = {"model": "model", "concurrency": "concurrency", "output tokens": "output_tokens",
               "ours tok/s": "ours_tok_s", "transformers tok/s": "transformers_tok_s",
               "ours / transformers": "ratio"}  # fmt: skip
    write_report(args.out, "engine", meta, rows, columns)


if __name__ == "__main__":
    main()
