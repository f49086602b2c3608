"""The demo checkpoint builder: every arch loads back in transformers, both layouts, byte-identical reruns."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from serving.demo import (
    ARCHS,
    BENCH_OVERRIDES,
    DEMO_VOCAB_SIZE,
    demo_config,
    init_weights,
    make_demo,
    save_hf_checkpoint,
)
from serving.errors import ConfigError
from serving.model.config import ModelConfig
from serving.tokenizer import Tokenizer

PROMPT = torch.tensor([[1, 17, 300, 42, 999, 5, 64]])


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.fixture(scope="module", params=ARCHS)
def demo_pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(arch, per-expert folder, fused folder), built once per arch."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    per_expert = make_demo(root / "per-expert", arch, progress=False)
    fused = make_demo(root / "fused", arch, fused_experts=True, progress=False)
    return arch, per_expert, fused


def test_demo_loads_in_transformers_with_finite_logits_in_both_layouts(demo_pair):
    arch, per_expert, fused = demo_pair
    config = json.loads((per_expert / "config.json").read_text())
    assert config["model_type"] == arch and config["vocab_size"] == DEMO_VOCAB_SIZE
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is False
    a, b = logits(per_expert), logits(fused)
    assert a.shape == (1, PROMPT.shape[1], DEMO_VOCAB_SIZE)
    assert torch.isfinite(a).all() and a.std() > 0.1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layouts_differ_only_in_how_experts_are_stored(demo_pair):
    arch, per_expert, fused = demo_pair
    config = json.loads((fused / "config.json").read_text())
    n_experts = 16 if arch == "deepseek_v3" else 8
    moe_layer = 1 if arch == "deepseek_v3" else 0
    fused_shapes, split_shapes = tensor_shapes(fused), tensor_shapes(per_expert)
    prefix = f"model.layers.{moe_layer}.mlp.experts."
    hidden, inter = config["hidden_size"], 64
    assert fused_shapes[prefix + "gate_up_proj"] == (n_experts, 2 * inter, hidden)
    assert fused_shapes[prefix + "down_proj"] == (n_experts, hidden, inter)
    assert not any(".experts.0." in name for name in fused_shapes)
    layer = f"model.layers.{moe_layer}."
    layer_experts = [name for name in split_shapes if name.startswith(layer) and ".experts." in name]
    assert len(layer_experts) == 3 * n_experts  # gate/up/down (Mixtral: w1/w3/w2) of every expert
    assert {name.split(".experts.")[1].split(".")[0] for name in layer_experts} == {str(e) for e in range(n_experts)}
    assert not any(name.endswith("gate_up_proj") for name in split_shapes)


def test_demo_tokenizer_and_generation_config(demo_pair):
    _, per_expert, _ = demo_pair
    tok = Tokenizer(per_expert)
    assert tok.eos_token_ids == frozenset({0, 2})  # <|endoftext|> and <|im_end|>
    assert tok.decode(tok.encode("make-demo ✓")) == "make-demo ✓"


def test_make_demo_is_byte_identical_across_runs(tmp_path):
    first = make_demo(tmp_path / "a", "deepseek_v3", seed=3, progress=False)
    second = make_demo(tmp_path / "b", "deepseek_v3", seed=3, progress=False)
    other_seed = make_demo(tmp_path / "c", "deepseek_v3", seed=4, progress=False)
    names = sorted(p.name for p in first.iterdir())
    assert "model.safetensors" in names and names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()


def test_deepseek_with_q_lora_saves_and_loads_in_both_layouts(tokenizer_dir, tmp_path):
    config = demo_config("deepseek_v3", DEMO_VOCAB_SIZE, q_lora_rank=48, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(config)
    init_weights(model, seed=1)
    outs = []
    for fused in (False, True):
        folder = tmp_path / ("fused" if fused else "per-expert")
        save_hf_checkpoint(model, folder, fused_experts=fused, tokenizer_dir=tokenizer_dir)
        shapes = tensor_shapes(folder)
        assert shapes["model.layers.1.self_attn.q_a_proj.weight"] == (48, 128)
        assert shapes["model.layers.1.self_attn.q_a_layernorm.weight"] == (48,)
        assert shapes["model.layers.1.self_attn.q_b_proj.weight"] == (4 * 64, 48)
        outs.append(logits(folder))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_deepseek_score_correction_bias_changes_routing(tmp_path):
    folder = make_demo(tmp_path, "deepseek_v3", progress=False)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        weight = f.get_tensor("model.layers.1.mlp.gate.weight")  # [E, D]
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")  # [E]
    hidden = torch.randn(256, weight.shape[1], generator=torch.Generator().manual_seed(0))  # [T, D]
    scores = torch.sigmoid(hidden @ weight.T)  # [T, E]
    plain = scores.topk(2, dim=-1).indices.sort(dim=-1).values
    biased = (scores + bias).topk(2, dim=-1).indices.sort(dim=-1).values
    assert bias.abs().max() > 0
    assert (plain != biased).any(dim=-1).float().mean() > 0.05


def test_init_weights_sets_norms_to_one_and_nothing_to_zero():
    model = AutoModelForCausalLM.from_config(demo_config("qwen2_moe", DEMO_VOCAB_SIZE, num_hidden_layers=1))
    init_weights(model, seed=0)
    for name, tensor in model.state_dict().items():
        if "norm" in name:
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            assert tensor.abs().max() > 0, name


def test_config_errors_name_the_arch_or_field(tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown demo arch 'llama'"):
        demo_config("llama", DEMO_VOCAB_SIZE)
    with pytest.raises(ConfigError, match="MixtralConfig has no field.*n_experts"):
        demo_config("mixtral", DEMO_VOCAB_SIZE, n_experts=4)
    small = AutoModelForCausalLM.from_config(demo_config("olmoe", 512, num_hidden_layers=1))
    with pytest.raises(ConfigError, match="vocab_size=512"):
        save_hf_checkpoint(small, tmp_path, fused_experts=False, tokenizer_dir=tokenizer_dir)


def test_make_demo_reports_progress(tmp_path, capsys):
    make_demo(tmp_path, "olmoe", progress=True)
    assert "make-demo olmoe" in capsys.readouterr().err


def test_fp8_demo_is_byte_identical_across_runs_and_only_for_deepseek(tmp_path):
    first = make_demo(tmp_path / "a", "deepseek_v3", fp8=True, progress=False)
    second = make_demo(tmp_path / "b", "deepseek_v3", fp8=True, progress=False)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    with pytest.raises(ConfigError, match="fp8 demo: only arch 'deepseek_v3'"):
        make_demo(tmp_path / "c", "qwen3_moe", fp8=True, progress=False)


@pytest.mark.parametrize(
    "arch, shapes, moe_layers",
    [
        ("deepseek_v3", (2048, 1408, 64, 6, 2 * 1408), (1, 2, 3)),  # DeepSeek-V2-Lite: 2 shared experts
        ("qwen3_moe", (2048, 768, 128, 8, 0), (0, 1, 2)),  # Qwen3-30B-A3B: no shared expert
    ],
)
def test_the_bench_size_has_a_real_models_expert_shapes(tmp_path, arch, shapes, moe_layers):
    # The config only: the checkpoint itself is ~3.7 GB (benchmarks/rebalance.py --model bench builds it).
    demo_config(arch, DEMO_VOCAB_SIZE, **BENCH_OVERRIDES[arch]).save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(tmp_path)
    got = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k, cfg.shared_intermediate_size or 0)
    assert got == shapes
    assert cfg.moe_layer_ids == moe_layers
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_bench_size_is_refused_where_it_has_no_shapes(tmp_path):
    with pytest.raises(ConfigError, match="only archs deepseek_v3, qwen3_moe without fp8, not 'mixtral'"):
        make_demo(tmp_path / "a", "mixtral", size="bench", progress=False)
    with pytest.raises(ConfigError, match="without fp8, not 'deepseek_v3' fp8"):
        make_demo(tmp_path / "b", "deepseek_v3", fp8=True, size="bench", progress=False)
    with pytest.raises(ConfigError, match="unknown demo size 'huge'; choose one of tiny, bench"):
        make_demo(tmp_path / "c", "deepseek_v3", size="huge", progress=False)
