"""Block-wise fp8 checkpoints (DeepSeek-V3's layout): dequantization against implementations nobody here
wrote, logits against the same model stored dequantized, a shard's share of the bytes, and refusals.

References:
- transformers' `Fp8Dequantize` (transformers/integrations/finegrained_fp8.py), the CPU path
  transformers itself takes for pre-quantized fp8 checkpoints without a GPU. It derives the block from
  the scale grid (rows // scale rows), so it is only right when dimensions are whole blocks: for edge
  shapes it is given the weight zero-padded to whole blocks, which is what DeepSeek's masked kernel reads.
- DeepSeek's published formula: `weight_dequant` / `weight_dequant_kernel` in inference/kernel.py of
  github.com/deepseek-ai/DeepSeek-V3 (a Triton kernel, one program per 128 x 128 tile, loads masked
  at the edges, y = x * s[tile]); and its quantization s = max|x| / 448, y = x / s (`act_quant_kernel`,
  the same file). `deepseek_weight_dequant` below is that formula, tile by tile, in plain torch.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from serving.demo import make_demo
from serving.engine.model_runner import score_prompts
from serving.errors import CheckpointError, ConfigError
from serving.experts.loading import load_experts
from serving.model.checkpoint import Checkpoint
from serving.model.config import ModelConfig
from serving.model.decoder import load_local, load_model
from serving.model.fp8 import dequantize, quantize

FP8 = torch.float8_e4m3fn
BLOCK = (128, 128)
BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}


def deepseek_weight_dequant(x: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek's weight_dequant on CPU: tile (i, j) of x [M, N], cut at the edges, times s[i, j], in float32."""
    if x.ndim == 3:  # fused experts: one [M, N] matrix per expert
        return torch.stack([deepseek_weight_dequant(xe, se, block) for xe, se in zip(x, s, strict=True)])
    rows, cols = x.shape
    y = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(math.ceil(rows / block)):
        for j in range(math.ceil(cols / block)):
            tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            y[tile] = x[tile].to(torch.float32) * s[i, j]
    return y


def transformers_dequant(x: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """transformers' Fp8Dequantize on x zero-padded to whole blocks, cut back to x's shape."""
    rows, cols = x.shape[-2:]
    padded = torch.zeros(*x.shape[:-2], s.shape[-2] * block[0], s.shape[-1] * block[1])
    padded[..., :rows, :cols] = x.float()  # fp8 -> fp32 -> fp8 is exact
    out = Fp8Dequantize(hf_quantizer=None).convert({"weight$": padded.to(FP8), "weight_scale_inv": s})["weight"]
    return out[..., :rows, :cols]


def random_fp8(shape: tuple[int, ...], block: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 values over e4m3's whole range (subnormals to 448) and a distinct positive scale per block."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen) * 10 ** torch.empty(shape).uniform_(-3, 2.6, generator=gen)
    grid = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    scale = torch.rand(grid, generator=gen) * 1e-2 + 1e-4
    return weight.clamp(-448, 448).to(FP8), scale


# (shape, block): whole blocks; partial last blocks in rows and columns, after full ones and alone;
# fused experts [E, R, C]; a rectangular block.
SHAPES = [
    ((256, 384), BLOCK),
    ((160, 192), BLOCK),
    ((320, 200), BLOCK),
    ((96, 64), BLOCK),
    ((3, 200, 130), BLOCK),
    ((100, 70), (64, 32)),
]


@pytest.mark.parametrize("shape, block", SHAPES)
def test_dequantize_matches_transformers_and_deepseeks_formula(shape, block):
    weight, scale = random_fp8(shape, block, seed=len(shape) + shape[-1])
    ours = dequantize(weight, scale, block)
    assert ours.dtype == torch.float32 and ours.shape == weight.shape
    assert torch.equal(ours, transformers_dequant(weight, scale, block))
    if block[0] == block[1]:  # DeepSeek's kernel takes one (square) block size
        assert torch.equal(ours, deepseek_weight_dequant(weight, scale, block[0]))
    if scale.shape[-2:] != (1, 1):  # not trivially equal: a scale applied to the wrong block changes the result
        assert not torch.equal(ours, dequantize(weight, scale.flip(-1).flip(-2), block))


@pytest.mark.parametrize("shape, block", SHAPES)
def test_quantize_is_deepseeks_per_block_amax_over_448(shape, block):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen)  # columns of different sizes
    w[..., : block[0], : block[1]] = 0  # an all-zero block (DeepSeek's formula would divide by zero)
    q, scale_inv = quantize(w, block)
    assert q.dtype == FP8 and scale_inv.dtype == torch.float32
    flat_w = w.reshape(-1, *w.shape[-2:])
    flat_q, flat_s = q.reshape(-1, *q.shape[-2:]), scale_inv.reshape(-1, *scale_inv.shape[-2:])
    for we, qe, se in zip(flat_w, flat_q, flat_s, strict=True):
        for i in range(se.shape[0]):
            for j in range(se.shape[1]):
                tile = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
                amax = we[tile].abs().max()
                if amax == 0:
                    assert se[i, j] == 1 and (qe[tile].float() == 0).all()
                    continue
                assert se[i, j] == amax / 448  # s = max|x| / 448
                assert torch.equal(qe[tile].float(), (we[tile] / se[i, j]).to(FP8).float())  # y = x / s
    # Round trip: within e4m3's rounding (half a step of 3 mantissa bits: 2^-4 relative; below its
    # smallest normal, half of the subnormal step 2^-9, times the block's scale).
    back = dequantize(q, scale_inv, block)
    scale_per_element = dequantize(torch.ones_like(w).to(FP8), scale_inv, block)
    assert ((back - w).abs() <= w.abs() * (2**-4 + 1e-6) + scale_per_element * 2**-10).all()


@pytest.fixture(scope="module")
def fp8_demos(tmp_path_factory) -> dict[str, Path]:
    """`make-demo --arch deepseek_v3 --fp8`, per expert and fused."""
    root = tmp_path_factory.mktemp("fp8")
    return {
        "per_expert": make_demo(root / "per_expert", "deepseek_v3", fp8=True, progress=False),
        "fused": make_demo(root / "fused", "deepseek_v3", fused_experts=True, fp8=True, progress=False),
    }


def dequantized_copy(fp8_dir: Path, out: Path) -> Path:
    """The same model as a plain float32 checkpoint: each fp8 tensor replaced by DeepSeek's weight_dequant
    of it, scales dropped, quantization_config removed."""
    shutil.copytree(fp8_dir, out)
    tensors = load_file(out / "model.safetensors")
    plain = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == FP8:
            plain[name] = deepseek_weight_dequant(tensor, tensors[f"{name}_scale_inv"])
        else:
            plain[name] = tensor.float()
    save_file(plain, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    return out


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (1, 7, 30)]


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_fp8_logits_equal_the_dequantized_models(fp8_demos, layout, tmp_path):
    """Our engine on the fp8 checkpoint = our engine and transformers on the same values stored in float32."""
    fp8_dir = fp8_demos[layout]
    plain_dir = dequantized_copy(fp8_dir, tmp_path / "plain")
    model, experts = load_local(fp8_dir)
    plain_model, plain_experts = load_local(plain_dir)
    hf = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    batch = prompts(model.config.vocab_size)
    got = score_prompts(model, experts, batch)
    for prompt, ours, plain in zip(batch, got, score_prompts(plain_model, plain_experts, batch), strict=True):
        with torch.inference_mode():
            want = hf(torch.tensor([prompt])).logits[0].float()
        assert (ours - plain).abs().max().item() <= 1e-4, f"{layout}: prompt of {len(prompt)}"
        assert (ours - want).abs().max().item() <= 1e-4, f"{layout}: prompt of {len(prompt)} vs transformers"
    assert got[-1].std() > 0.1  # logits that say something


def test_bf16_engine_rounds_the_dequantized_values_once(fp8_demos):
    fp8_dir = fp8_demos["per_expert"]
    model, _ = load_model(fp8_dir, torch.bfloat16, prepack=False)  # the weights as loaded, as parameters
    tensors = load_file(fp8_dir / "model.safetensors")
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"):
        want = deepseek_weight_dequant(tensors[name], tensors[f"{name}_scale_inv"]).to(torch.bfloat16)
        assert torch.equal(model.get_parameter(name), want), name
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def stored_bytes(folder: Path, name: str, rows: list[int] | None = None) -> int:
    """Bytes of tensor `name` in the file; `rows`: only those rows of dim 0 (fused experts)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        sl = f.get_slice(name)
        shape, width = sl.get_shape(), BYTES[sl.get_dtype()]
    total = math.prod(shape) * width
    return total if rows is None else total // shape[0] * len(rows)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_a_shard_reads_only_its_experts_weights_and_scales(fp8_demos, layout):
    folder = fp8_demos[layout]
    cfg = ModelConfig.from_pretrained(folder)
    held = [2, 5, 11]
    ckpt = Checkpoint(folder, cfg.fp8_block)
    part = load_experts(ckpt, cfg, held, torch.float32)
    expected = 0
    for layer in cfg.moe_layer_ids:
        prefix = f"model.layers.{layer}.mlp.experts"
        if layout == "fused":
            names = [f"{prefix}.{p}{s}" for p in ("gate_up_proj", "down_proj") for s in ("", "_scale_inv")]
            expected += sum(stored_bytes(folder, n, rows=held) for n in names)
        else:
            names = [f"{prefix}.{e}.{p}.weight{s}" for e in held for p in ("gate_proj", "up_proj", "down_proj")
                     for s in ("", "_scale_inv")]  # fmt: skip
            expected += sum(stored_bytes(folder, n) for n in names)
    assert ckpt.bytes_read == expected
    every = load_experts(Checkpoint(folder, cfg.fp8_block), cfg, list(range(cfg.num_experts)), torch.float32)
    for layer, experts in part.items():
        assert torch.equal(experts.gate_up, every[layer].gate_up[held])
        assert torch.equal(experts.down, every[layer].down[held])
    # ... dequantized with their own scales
    tensors = load_file(folder / "model.safetensors")
    layer = cfg.moe_layer_ids[-1]
    if layout == "fused":
        name = f"model.layers.{layer}.mlp.experts.down_proj"
        want = deepseek_weight_dequant(tensors[name][held], tensors[f"{name}_scale_inv"][held])
    else:
        names = [f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight" for e in held]
        want = torch.stack([deepseek_weight_dequant(tensors[n], tensors[f"{n}_scale_inv"]) for n in names])
    assert torch.equal(part[layer].down, want)


def demo_config_dict(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(
    "quant, message",
    [
        ({"quant_method": "gptq", "bits": 4}, "quantization_config.quant_method='gptq'"),
        ({"quant_method": "awq"}, "quantization_config.quant_method='awq'"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_block_size is missing"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size=\[128\]"),
        ({"quant_method": "fp8", "weight_block_size": [0, 128]}, r"weight_block_size=\[0, 128\]"),
        ({"quant_method": "fp8", "weight_block_size": [128, "128"]}, "weight_block_size="),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "fmt='e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "'static'"),
        ("fp8", "quantization_config='fp8'"),
    ],
)
def test_other_quantizations_are_refused_by_name(fp8_demos, mixtral_dir, quant, message):
    for folder in (fp8_demos["per_expert"], mixtral_dir):  # every arch, not only DeepSeek
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_dict({**demo_config_dict(folder), "quantization_config": quant})


def test_deepseeks_published_quantization_config_is_accepted(fp8_demos):
    raw = demo_config_dict(fp8_demos["per_expert"])
    published = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    assert ModelConfig.from_dict({**raw, "quantization_config": published}).fp8_block == (128, 128)
    other_block = {**published, "weight_block_size": [64, 32]}
    assert ModelConfig.from_dict({**raw, "quantization_config": other_block}).fp8_block == (64, 32)
    del raw["quantization_config"]
    assert ModelConfig.from_dict(raw).fp8_block is None


@pytest.fixture
def fp8_copy(fp8_demos, tmp_path) -> Path:
    return Path(shutil.copytree(fp8_demos["per_expert"], tmp_path / "ckpt"))


def rewrite(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name",
    ["model.layers.0.self_attn.kv_b_proj.weight", "model.layers.2.mlp.experts.7.up_proj.weight"],  # dense, expert
)
def test_a_missing_scale_names_file_and_tensor(fp8_copy, name):
    rewrite(fp8_copy, lambda t: t.pop(f"{name}_scale_inv"))
    with pytest.raises(
        CheckpointError, match=rf"model.safetensors: tensor '{name}' .*scale '{name}_scale_inv' is missing"
    ):
        load_local(fp8_copy)


def test_a_mis_shaped_scale_names_the_scale_and_the_blocks(fp8_copy):
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"  # [192, 160]: scales [2, 2]
    rewrite(fp8_copy, lambda t: t.update({f"{name}_scale_inv": torch.ones(2, 1)}))
    with pytest.raises(
        CheckpointError,
        match=rf"tensor '{name}_scale_inv' has shape \(2, 1\), expected \(2, 2\): one scale per 128x128",
    ):
        load_local(fp8_copy)


def test_a_non_finite_scale_is_refused(fp8_copy):
    name = "model.layers.2.mlp.experts.0.gate_proj.weight"
    rewrite(fp8_copy, lambda t: t[f"{name}_scale_inv"].__setitem__((0, 0), float("inf")))
    with pytest.raises(CheckpointError, match=rf"'{name}_scale_inv'.*not a finite"):
        load_local(fp8_copy)


def test_fp8_tensors_without_quantization_config_are_refused(fp8_copy):
    """Without the config's block size the scales would be ignored: raw fp8 values, silently wrong."""
    raw = demo_config_dict(fp8_copy)
    del raw["quantization_config"]
    (fp8_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="is torch.float8_e4m3fn but config.json has no block-wise fp8"):
        load_local(fp8_copy)


def test_other_fp8_formats_are_refused(fp8_copy):
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite(fp8_copy, lambda t: t.update({name: t[name].float().to(torch.float8_e5m2)}))
    with pytest.raises(CheckpointError, match=rf"'{name}' is torch.float8_e5m2"):
        load_local(fp8_copy)


def test_power_of_two_scales_stored_as_e8m0_are_applied_as_stored(fp8_copy):
    """scale_fmt 'ue8m0' (power-of-two scales) is accepted; scales stored as float8_e8m0fnu read exactly."""
    name = "model.layers.1.mlp.experts.4.gate_proj.weight"
    tensors = load_file(fp8_copy / "model.safetensors")
    pow2 = torch.exp2(torch.log2(tensors[f"{name}_scale_inv"]).round())
    rewrite(fp8_copy, lambda t: t.update({f"{name}_scale_inv": pow2.to(torch.float8_e8m0fnu)}))
    raw = demo_config_dict(fp8_copy)
    raw["quantization_config"]["scale_fmt"] = "ue8m0"
    (fp8_copy / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_pretrained(fp8_copy)
    [gate_up], _ = Checkpoint(fp8_copy, cfg.fp8_block).read_experts(1, [4], torch.float32)
    assert torch.equal(gate_up[: cfg.moe_intermediate_size], deepseek_weight_dequant(tensors[name], pow2))
    with pytest.raises(ConfigError, match="quantization_config.scale_fmt='mx'"):
        ModelConfig.from_dict({**raw, "quantization_config": {**raw["quantization_config"], "scale_fmt": "mx"}})
