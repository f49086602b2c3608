"""`make-demo --router-skew zipf:S`: on corpus paragraphs the fit never saw, each MoE layer's load, as our
engine's window measures it, fits rank^-S; transformers routes the checkpoint the same; bad specs are refused."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.demo import make_demo
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import SamplingParams
from serving.errors import ConfigError
from serving.expert_load import ExpertLoad
from serving.model.config import ModelConfig
from serving.router_skew import ZipfSkew, fitted_exponent, held_out_prompts, max_exponent, parse_router_skew

# the direction-only archs at all three exponents, DeepSeek-V3 (a real selection bias) too, the others at 1.0
CASES = [("mixtral", 0.6), ("mixtral", 1.0), ("mixtral", 1.4), ("deepseek_v3", 0.6), ("deepseek_v3", 1.0),
         ("deepseek_v3", 1.4), ("qwen2_moe", 1.0), ("qwen3_moe", 1.0), ("olmoe", 1.0)]  # fmt: skip
EXPONENT_TOLERANCE = 0.25
TOP_SHARE_TOLERANCE = 0.03


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model: one intra-op thread is faster than two (make_demo's fit runs with one too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def engine_load(folder) -> tuple[ExpertLoad, int]:
    """Our engine's expert load window after prefilling the held-out paragraphs, and how many tokens they have."""
    engine = LLMEngine.from_pretrained(folder)
    prompts = held_out_prompts(engine.tokenizer)
    engine.generate_batch(prompts, SamplingParams(max_tokens=1, temperature=0.0))  # the sampled token never runs
    return engine.expert_load.snapshot(), sum(map(len, prompts))


def transformers_load(folder, prompts: list[list[int]]) -> list[list[int]]:
    """What transformers routes: the expert ids each MoE block hands its experts, padding left out."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = ModelConfig.from_pretrained(folder)
    longest = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])  # [B, longest] right-padded
    real = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts]).flatten().bool()
    chosen: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(_, args) -> None:  # experts(hidden, top_k_index, top_k_weights) in every arch
            chosen[layer] = args[1]

        return hook

    hooks = [model.model.layers[i].mlp.experts.register_forward_pre_hook(keep(i)) for i in config.moe_layer_ids]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=real.view(ids.shape).long(), use_cache=False)
    for hook in hooks:
        hook.remove()
    return [torch.bincount(chosen[layer][real].flatten(), minlength=config.num_experts).tolist()
            for layer in config.moe_layer_ids]  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(arch, exponent or None) -> (checkpoint folder, our engine's load, held-out tokens), built on first use."""
    built: dict[tuple[str, float | None], tuple] = {}

    def of(arch: str, exponent: float | None) -> tuple:
        if (arch, exponent) not in built:
            skew = None if exponent is None else f"zipf:{exponent}"
            folder = make_demo(tmp_path_factory.mktemp(arch) / "demo", arch, progress=False, router_skew=skew)
            built[arch, exponent] = (folder, *engine_load(folder))
        return built[arch, exponent]

    return of


@pytest.mark.parametrize("arch, exponent", CASES)
def test_load_on_unseen_paragraphs_follows_zipf(arch, exponent, demo):
    folder, load, tokens = demo(arch, exponent)
    plain = demo(arch, None)[1]
    top_k = ModelConfig.from_pretrained(folder).top_k
    top_share = float(ZipfSkew(exponent).shares(load.num_experts)[0])
    for layer, row, before in zip(load.layers, load.load, plain.load, strict=True):
        assert sum(row) == tokens * top_k  # every prompt token, top_k rows each
        fitted, share = fitted_exponent(row), max(row) / sum(row)
        assert abs(fitted - exponent) <= EXPONENT_TOLERANCE, f"layer {layer}: fitted {fitted:.2f}, want {exponent}"
        assert abs(share - top_share) <= TOP_SHARE_TOLERANCE, f"layer {layer}: top share {share:.3f} vs {top_share:.3f}"
        moved = sum(abs(a - b) for a, b in zip(row, before, strict=True)) / sum(row)
        assert moved >= 0.2, f"layer {layer}: the skewed load is within {moved:.2f} (L1 of shares) of the plain demo's"


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])  # a weight direction; a selection bias
def test_transformers_routes_the_skewed_checkpoint_as_our_engine(arch, demo):
    folder, load, _ = demo(arch, 1.0)
    prompts = held_out_prompts(LLMEngine.from_pretrained(folder).tokenizer)
    assert transformers_load(folder, prompts) == [list(row) for row in load.load]


def test_specs_parse_and_bad_ones_say_what_is_wrong():
    assert parse_router_skew("zipf:1") == ZipfSkew(1.0) and parse_router_skew(" zipf:0.6 ").exponent == 0.6
    bad = [("zipf:", "give the exponent"), ("zipf:-1", "> 0"), ("zipf:0", "> 0"), ("zipf:inf", "finite"),
           ("zipf:abc", "not a number"), ("uniform", "the only kind is zipf:S"), ("zipf", "only kind")]  # fmt: skip
    for spec, says in bad:
        with pytest.raises(ConfigError, match=says):
            parse_router_skew(spec)


def test_a_skew_steeper_than_top_k_allows_is_refused(tmp_path):
    # top-2 of 8 experts: an expert takes at most half the rows, so S is at most ~1.44
    assert 1.4 < max_exponent(8, 2) < 1.5 and max_exponent(8, 1) == math.inf
    with pytest.raises(ConfigError, match=r"top_k=2 one expert gets at most 50%.*S <= 1\.4"):
        make_demo(tmp_path / "steep", "mixtral", progress=False, router_skew="zipf:2")


def test_the_same_arguments_write_the_same_bytes(tmp_path):
    a = make_demo(tmp_path / "a", "qwen3_moe", progress=False, router_skew="zipf:0.8")
    b = make_demo(tmp_path / "b", "qwen3_moe", progress=False, router_skew="zipf:0.8")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
