"""RoPE against transformers 5.19's own rotary classes and apply functions (float32, max abs diff <= 1e-6)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

from serving.errors import ConfigError
from serving.model.rope import RopeSpec, RotaryEmbedding, rope_spec_from_config, softmax_scale

TOL = 1e-6
# DeepSeek-V3's public config.json (old format); its real context is 163840 positions.
DSV3_ROPE_SCALING = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
DSV3_OLD = {"rope_theta": 10000, "rope_scaling": DSV3_ROPE_SCALING, "max_position_embeddings": 163840}
TINY_DSV3 = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                 kv_lora_rank=16, qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=16)  # fmt: skip


def _positions() -> torch.Tensor:
    random = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.tensor([0, 1, 299]), random])  # [T]


def _compare(hf_rotary, hf_apply, cfg: dict, rotary_dim: int, interleaved: bool = False) -> None:
    """Our cos/sin tables and rotated q/k [T, H, D] against transformers' for the same config."""
    positions = _positions()  # [T]
    ours = RotaryEmbedding(rope_spec_from_config(cfg), rotary_dim, max_positions=320, interleaved=interleaved)
    x = torch.randn(len(positions), 3, rotary_dim, generator=torch.Generator().manual_seed(1))  # [T, H, D]
    cos, sin = hf_rotary(x, positions[None])  # [1, T, D]: cat(freqs, freqs) layout
    half = rotary_dim // 2
    assert (ours.cos[positions] - cos[0, :, :half]).abs().max() <= TOL
    assert (ours.sin[positions] - sin[0, :, :half]).abs().max() <= TOL
    # transformers' apply functions take [B, H, T, D] tensors and [B, T, D] cos/sin
    hf_q, hf_k = hf_apply(x.transpose(0, 1)[None], x.flip(1).transpose(0, 1)[None], cos, sin)
    assert (ours(x, positions) - hf_q[0].transpose(0, 1)).abs().max() <= TOL
    assert (ours(x.flip(1), positions) - hf_k[0].transpose(0, 1)).abs().max() <= TOL


def test_default_matches_mixtral():
    hf = MixtralConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_theta": 1e6})
    _compare(MixtralRotaryEmbedding(hf), apply_rotary_pos_emb, hf.to_dict(), rotary_dim=16)


def test_linear_matches_transformers():
    params = {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}
    hf = MixtralConfig(hidden_size=128, num_attention_heads=4, rope_parameters=dict(params))
    _compare(MixtralRotaryEmbedding(hf), apply_rotary_pos_emb, {"rope_parameters": params}, rotary_dim=32)


def test_llama3_matches_transformers():
    # wavelengths 2*pi*1e4^(i/16) span all three llama3 regions for original 512 (kept < 128 < blended < 512)
    params = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 512}  # fmt: skip
    hf = MixtralConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=4096,
                       rope_parameters=dict(params))  # fmt: skip
    _compare(MixtralRotaryEmbedding(hf), apply_rotary_pos_emb, {"rope_parameters": params}, rotary_dim=32)


@pytest.mark.parametrize("interleaved", [False, True])
def test_deepseek_v3_yarn_matches_transformers(interleaved):
    hf = DeepseekV3Config(**TINY_DSV3, max_position_embeddings=163840, rope_scaling=dict(DSV3_ROPE_SCALING),
                          rope_theta=10000, rope_interleave=interleaved)  # fmt: skip
    apply = hf_ds.apply_rotary_pos_emb_interleave if interleaved else hf_ds.apply_rotary_pos_emb
    _compare(hf_ds.DeepseekV3RotaryEmbedding(hf), apply, DSV3_OLD, rotary_dim=64, interleaved=interleaved)


@pytest.mark.parametrize("extra", [{}, {"truncate": False}, {"attention_factor": 0.8}])
def test_yarn_attention_factor_scales_cos_sin(extra):
    # Qwen-style YaRN: no mscale keys, so cos/sin carry 0.1 ln(4) + 1 unless attention_factor says otherwise
    params = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64}
    params.update(extra)
    hf = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=24, max_position_embeddings=256,
                        rope_parameters=dict(params))  # fmt: skip
    _compare(Qwen3MoeRotaryEmbedding(hf), apply_rotary_pos_emb, {"rope_parameters": params}, rotary_dim=24)


def test_interleaved_output_is_deinterleaved():
    # at position 0 nothing turns: the output is the input's even dims, then its odd dims
    x = torch.arange(8.0).view(1, 1, 8)  # [T=1, H=1, D=8]
    rope = RotaryEmbedding(RopeSpec(theta=1e4), 8, max_positions=4, interleaved=True)
    assert rope(x, torch.tensor([0])).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_bfloat16_in_bfloat16_out():
    rope = RotaryEmbedding(rope_spec_from_config(DSV3_OLD), 64, max_positions=8)
    assert rope(torch.randn(2, 3, 64, dtype=torch.bfloat16), torch.tensor([0, 7])).dtype == torch.bfloat16


def test_old_and_v5_formats_parse_to_the_same_spec():
    v5_by_hand = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, **DSV3_ROPE_SCALING}}
    del v5_by_hand["rope_parameters"]["type"]
    v5_by_hf = DeepseekV3Config(**TINY_DSV3, rope_scaling=dict(DSV3_ROPE_SCALING), rope_theta=10000).to_dict()
    spec = rope_spec_from_config(DSV3_OLD)
    assert spec == rope_spec_from_config(v5_by_hand) == rope_spec_from_config(v5_by_hf)
    assert (spec.kind, spec.factor, spec.original_max_position_embeddings) == ("yarn", 40, 4096)
    assert (spec.beta_fast, spec.beta_slow, spec.mscale, spec.mscale_all_dim) == (32, 1, 1, 1)
    assert spec.attention_factor is None and spec.truncate is None
    plain = rope_spec_from_config({"rope_theta": 1e6, "rope_scaling": None})
    assert plain == rope_spec_from_config(MixtralConfig().to_dict()) == RopeSpec(theta=1e6)


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["rope_scaling", "'dynamic'", "yarn, llama3"]),
        ({"rope_parameters": {"rope_type": "longrope"}}, ["rope_parameters", "'longrope'", "yarn, llama3"]),
        ({"rope_scaling": {"rope_type": "su"}}, ["rope_scaling", "'su'"]),
        ({"rope_scaling": {"type": "ntk", "factor": 2.0}}, ["rope_scaling", "'ntk'"]),
        ({"rope_scaling": {"type": "linear", "factor": 2, "low_freq_factor": 1}}, ["low_freq_factor"]),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, ["original_max_position_embeddings"]),
        ({"rope_parameters": {"rope_type": "linear"}}, ["'factor'"]),
        ({"rope_scaling": {"type": "yarn", "rope_type": "linear"}}, ["type='yarn'"]),
        ({"rope_scaling": {"type": "linear", "factor": "2"}}, ["rope_scaling.factor"]),
        ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor=0.5"]),
    ],
)
def test_bad_configs_name_the_field(cfg, words):
    cfg = {"rope_theta": 1e4, **cfg}
    with pytest.raises(ConfigError) as err:
        rope_spec_from_config(cfg)
    for word in words:
        assert word in str(err.value)


def test_missing_rope_theta_is_named():
    with pytest.raises(ConfigError, match="rope_theta"):
        rope_spec_from_config({"rope_scaling": None})


def test_yarn_falls_back_to_max_position_embeddings_like_transformers():
    params = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    spec = rope_spec_from_config({"rope_parameters": params, "max_position_embeddings": 64})
    assert spec.original_max_position_embeddings == 64


@pytest.mark.parametrize("rope_scaling", [None, DSV3_ROPE_SCALING])
def test_softmax_scale_matches_deepseek_attention(rope_scaling):
    hf = DeepseekV3Config(**TINY_DSV3, rope_scaling=dict(rope_scaling or {}) or None, rope_theta=10000)
    hf_scale = hf_ds.DeepseekV3Attention(hf, layer_idx=0).scaling
    qk_head_dim = TINY_DSV3["qk_nope_head_dim"] + TINY_DSV3["qk_rope_head_dim"]
    assert softmax_scale(rope_spec_from_config(hf.to_dict()), qk_head_dim) == hf_scale
    if rope_scaling:  # the correction is real: (0.1 ln 40 + 1)^2 ~ 1.87
        assert hf_scale > 1.8 * qk_head_dim**-0.5
