"""`moe-serve plan`: parameter counts, shards, router memory and KV room, checked against arithmetic
written out here for the public DeepSeek-V3 config, and against the tensors transformers builds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from deployments.capacity import (
    CapacityError,
    count_params,
    fp8_checkpoint_bytes,
    kv_bytes_per_token,
    load_config,
    plan_capacity,
)
from deployments.cli import main
from serving.demo import ARCHS, DEMO_VOCAB_SIZE, demo_config
from serving.errors import ConfigError

DEEPSEEK_V3 = Path(__file__).parent / "data" / "deepseek_v3_config.json"
GIB = 2**30

# DeepSeek-V3, from its config.json. Layers 0-2 have a dense MLP, layers 3-60 an MoE block.
H, V, LAYERS, DENSE_LAYERS, MOE_LAYERS = 7168, 129280, 61, 3, 58
EXPERTS, MOE_I, DENSE_I, HEADS = 256, 2048, 18432, 128
Q_RANK, KV_RANK, NOPE, ROPE, V_DIM = 1536, 512, 128, 64, 128

PER_EXPERT = MOE_LAYERS * 3 * H * MOE_I  # gate, up and down projections of one expert in every MoE layer
ROUTED = EXPERTS * PER_EXPERT
ATTENTION = (
    H * Q_RANK + Q_RANK + Q_RANK * HEADS * (NOPE + ROPE)  # q_a_proj, q_a_layernorm, q_b_proj
    + H * (KV_RANK + ROPE) + KV_RANK + KV_RANK * HEADS * (NOPE + V_DIM)  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
    + HEADS * V_DIM * H  # o_proj
)  # fmt: skip
DENSE = (
    2 * V * H  # embed_tokens and lm_head (not tied)
    + LAYERS * ATTENTION
    + (2 * LAYERS + 1) * H  # two norms per layer, final norm
    + DENSE_LAYERS * 3 * H * DENSE_I  # dense MLPs
    + MOE_LAYERS * (EXPERTS * H + EXPERTS + 3 * H * MOE_I)  # gate weight, its score-correction bias, shared expert
)  # fmt: skip
KV_PER_TOKEN = (KV_RANK + ROPE) * LAYERS * 2  # MLA caches the latent and the rotary key, bf16


def test_deepseek_v3_parameter_counts():
    params = count_params(load_config(DEEPSEEK_V3))
    assert params.per_expert == PER_EXPERT == 2_554_331_136
    assert params.routed == ROUTED == 653_908_770_816
    assert params.dense == DENSE
    # 671B is DeepSeek's published size without the 14B multi-token-prediction layer, which we do not count.
    assert round(params.total / 1e9) == 671
    assert kv_bytes_per_token(load_config(DEEPSEEK_V3)) == KV_PER_TOKEN == 70_272


def test_deepseek_v3_bf16_on_80_gib():
    plan = plan_capacity(load_config(DEEPSEEK_V3), gpu_memory_gib=80, dtype="bf16", routers=2)
    usable = int(80 * GIB * 0.9)  # 10% kept for CUDA context and activations
    expert = PER_EXPERT * 2  # bf16: 5.1 GB per expert
    fit = usable // expert
    assert fit == 15  # 15 x 5.11 GB = 76.6 GB <= 77.3 GB usable < 16 x 5.11 GB
    assert plan.num_shards == math.ceil(256 / 15) == 18  # 17 shards of 15 would hold only 255
    # 256 = 18 x 14 + 4: the first four shards hold 15 experts, the other fourteen 14.
    assert [len(ids) for ids in plan.placement.shards] == [15] * 4 + [14] * 14
    assert max(plan.shard_bytes) == 15 * expert
    assert plan.spare_expert_slots == (0,) * 4 + (1,) * 14  # a 15th expert still fits beside 14
    assert plan.router_bytes == DENSE * 2
    assert plan.kv_room_bytes == usable - DENSE * 2
    assert plan.kv_tokens == (usable - DENSE * 2) // KV_PER_TOKEN
    assert plan.worker_groups() == {"routers": 2, "shards": 18}


def test_deepseek_v3_fp8_on_80_gib_needs_half_the_shards():
    plan = plan_capacity(load_config(DEEPSEEK_V3), gpu_memory_gib=80, dtype="fp8", routers=1)
    usable = int(80 * GIB * 0.9)
    assert usable // PER_EXPERT == 30  # fp8: 1 byte per parameter
    assert plan.num_shards == math.ceil(256 / 30) == 9  # 256 = 9 x 28 + 4
    assert [len(ids) for ids in plan.placement.shards] == [29] * 4 + [28] * 5
    assert plan.spare_expert_slots == (1,) * 4 + (2,) * 5
    assert plan.router_bytes == DENSE
    assert plan.kv_bytes_per_token == KV_PER_TOKEN  # the cache stays bf16
    assert plan.worker_groups() == {"routers": 1, "shards": 9}


def test_plan_command_prints_the_placement(capsys):
    assert main(["plan", "--model", str(DEEPSEEK_V3), "--gpu-memory", "80", "--routers", "2"]) == 0
    out = capsys.readouterr().out
    kv_tokens = (int(80 * GIB * 0.9) - DENSE * 2) // KV_PER_TOKEN
    for expected in [
        "671.0B (653.9B in routed experts, 17.1B dense)",
        "shards: 18 (experts per shard: 4 x 15, 14 x 14)",
        "weights per shard GPU: 71.4 GiB",  # 15 x 5,108,662,272 bytes
        "redundant expert copies that fit: 14",
        f"weights per router GPU: {DENSE * 2 / GIB:.1f} GiB",
        f"{kv_tokens:,} tokens at 70,272 bytes/token",
        "routers replicas=2, shards replicas=18",
    ]:
        assert expected in out


PUBLISHED_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def fp8_config(tmp_path: Path, quant: dict = PUBLISHED_FP8) -> Path:
    """The public DeepSeek-V3 config as published: with its quantization_config."""
    raw = json.loads(DEEPSEEK_V3.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "quantization_config": quant}))
    return tmp_path


def blocks(rows: int, cols: int) -> int:
    return math.ceil(rows / 128) * math.ceil(cols / 128)


# DeepSeek-V3 on disk: quantized matrices 1 byte/param + a float32 scale per 128x128 block; the rest bf16.
EXPERT_SCALES = MOE_LAYERS * (2 * blocks(MOE_I, H) + blocks(H, MOE_I))  # 58 x 3 x 16 x 56
# Attention: q_a, q_b, kv_a_proj_with_mqa (576 rows: 4 full blocks and a partial one), kv_b, o.
ATTENTION_LINEAR = [
    (Q_RANK, H), (HEADS * (NOPE + ROPE), Q_RANK), (KV_RANK + ROPE, H), (HEADS * (NOPE + V_DIM), KV_RANK),
    (H, HEADS * V_DIM),
]  # fmt: skip
MLP = [(DENSE_I, H), (DENSE_I, H), (H, DENSE_I)]
SHARED = [(MOE_I, H), (MOE_I, H), (H, MOE_I)]
DENSE_LINEAR = LAYERS * ATTENTION_LINEAR + DENSE_LAYERS * MLP + MOE_LAYERS * SHARED
DENSE_QUANTIZED = sum(r * c for r, c in DENSE_LINEAR)
DENSE_DISK = DENSE_QUANTIZED + 4 * sum(blocks(r, c) for r, c in DENSE_LINEAR) + 2 * (DENSE - DENSE_QUANTIZED)


def test_plan_accepts_the_public_fp8_config_and_counts_its_bytes_on_disk(tmp_path):
    cfg = load_config(fp8_config(tmp_path))
    assert cfg.fp8_block == (128, 128) and count_params(cfg).routed == ROUTED
    disk = fp8_checkpoint_bytes(cfg)
    assert disk.per_expert == PER_EXPERT + 4 * EXPERT_SCALES
    assert disk.routed == EXPERTS * (PER_EXPERT + 4 * EXPERT_SCALES)
    assert disk.dense == DENSE_DISK
    # In memory the engine holds the served dtype: the bf16 plan of the fp8 checkpoint is the bf16 plan.
    plan = plan_capacity(cfg, gpu_memory_gib=80, dtype="bf16")
    bf16 = plan_capacity(load_config(DEEPSEEK_V3), gpu_memory_gib=80, dtype="bf16")
    assert plan.checkpoint_bytes == disk and bf16.checkpoint_bytes is None
    assert (plan.shard_bytes, plan.router_bytes, plan.kv_tokens) == (
        bf16.shard_bytes,
        bf16.router_bytes,
        bf16.kv_tokens,
    )


def test_plan_command_reports_fp8_bytes_on_disk_and_in_memory_separately(tmp_path, capsys):
    assert main(["plan", "--model", str(fp8_config(tmp_path)), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    disk = EXPERTS * (PER_EXPERT + 4 * EXPERT_SCALES) + DENSE_DISK
    assert f"checkpoint on disk: {disk / GIB:.1f} GiB in block-wise fp8" in out
    assert f"weights in memory: {(ROUTED + DENSE) * 2 / GIB:.1f} GiB in bf16" in out
    assert f"largest: {15 * (PER_EXPERT + 4 * EXPERT_SCALES) / GIB:.1f} GiB from disk" in out  # 15 experts
    assert "dequantized at load" in out
    assert main(["plan", "--model", str(fp8_config(tmp_path)), "--gpu-memory", "80", "--dtype", "fp8"]) == 0
    assert f"weights in memory: {(ROUTED + DENSE) / GIB:.1f} GiB in fp8" in capsys.readouterr().out
    assert main(["plan", "--model", str(DEEPSEEK_V3), "--gpu-memory", "80"]) == 0
    assert "on disk" not in capsys.readouterr().out  # bf16 checkpoints: disk = memory, one number


def test_plan_refuses_other_quantizations_by_name(tmp_path, capsys):
    gptq = fp8_config(tmp_path, {"quant_method": "gptq", "bits": 4})
    assert main(["plan", "--model", str(gptq), "--gpu-memory", "80"]) == 2
    assert "quantization_config.quant_method='gptq'" in capsys.readouterr().err


def test_fp8_bytes_on_disk_match_what_make_demo_writes(tmp_path):
    """The demo's fp8 checkpoint, every tensor's bytes from its safetensors header."""
    from safetensors import safe_open

    from serving.demo import make_demo

    folder = make_demo(tmp_path / "fp8", "deepseek_v3", fp8=True, progress=False)
    width = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    stored = {"routed": 0, "dense": 0}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            stored["routed" if ".mlp.experts." in name else "dense"] += (
                math.prod(sl.get_shape()) * width[sl.get_dtype()]
            )
    disk = fp8_checkpoint_bytes(load_config(folder))
    assert (disk.routed, disk.dense) == (stored["routed"], stored["dense"])


def test_too_small_gpus_are_refused_with_the_part_that_does_not_fit(capsys):
    with pytest.raises(CapacityError, match=r"one routed expert \(4\.8 GiB in bf16\) does not fit"):
        plan_capacity(load_config(DEEPSEEK_V3), gpu_memory_gib=4)
    with pytest.raises(CapacityError, match=r"the dense part \(31\.9 GiB in bf16\) leaves no KV cache room"):
        plan_capacity(load_config(DEEPSEEK_V3), gpu_memory_gib=34)
    assert main(["plan", "--model", str(DEEPSEEK_V3), "--gpu-memory", "4"]) == 2
    assert "does not fit" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no_such_dir"):
        load_config("no_such_dir")


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_match_the_tensors_transformers_builds(arch, tmp_path):
    """The tiny demo configs of every arch: routed = tensors under mlp.experts, dense = all the others."""
    from transformers import AutoModelForCausalLM

    overrides = {"q_lora_rank": 32} if arch == "deepseek_v3" else {}  # cover the low-rank query path too
    hf_config = demo_config(arch, DEMO_VOCAB_SIZE, **overrides)
    state = AutoModelForCausalLM.from_config(hf_config).state_dict()
    hf_config.save_pretrained(tmp_path)
    params = count_params(load_config(tmp_path))
    assert params.routed == sum(t.numel() for name, t in state.items() if ".mlp.experts." in name)
    assert params.dense == sum(t.numel() for name, t in state.items() if ".mlp.experts." not in name)
