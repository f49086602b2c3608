"""Tiny random models built with transformers' own classes: the reference for parity tests.

Each is saved in both on-disk expert layouts (per expert, and fused gate_up_proj/down_proj).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

VOCAB = 160
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip


def tiny_config(variant: str):
    """Configs that exercise each architecture's distinctive features."""
    if variant == "mixtral":
        return MixtralConfig(**COMMON, num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2,
                             num_local_experts=8, num_experts_per_tok=2)  # fmt: skip
    if variant == "qwen2_moe":  # shared expert with its sigmoid gate; a dense layer via mlp_only_layers
        return Qwen2MoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=80, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, num_hidden_layers=3, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])  # fmt: skip
    if variant == "qwen3_moe":  # per-head q/k norm, explicit head_dim != hidden / heads
        return Qwen3MoeConfig(**COMMON, num_key_value_heads=2, head_dim=24, intermediate_size=64,
                              moe_intermediate_size=32, num_hidden_layers=2, num_experts=8,
                              num_experts_per_tok=3, norm_topk_prob=True)  # fmt: skip
    if variant == "olmoe":  # q/k norm over all heads, qkv clipping
        return OlmoeConfig(**COMMON, num_key_value_heads=4, intermediate_size=32, num_hidden_layers=2,
                           num_experts=8, num_experts_per_tok=2, clip_qkv=3.0)  # fmt: skip
    if variant.startswith("deepseek_v3"):
        # MLA, sigmoid gate with selection bias, group-limited top-k, scaling, shared expert, dense first layer
        extra = {}
        if variant == "deepseek_v3_qlora_yarn":  # low-rank queries and YaRN rope scaling (as the real model)
            extra = dict(q_lora_rank=32, rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})  # fmt: skip
        return DeepseekV3Config(**{**COMMON, "num_attention_heads": 4}, num_key_value_heads=4,
                                intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
                                first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8,
                                qk_nope_head_dim=16, v_head_dim=16, **{"q_lora_rank": None, **extra})  # fmt: skip
    raise ValueError(variant)


VARIANTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v3_qlora_yarn")


def build_reference(variant: str, seed: int = 0) -> PreTrainedModel:
    """A transformers model with random weights of std ~0.1, so outputs are not trivially repetitive."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(variant), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or "inv_freq" in name or "original_inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen) * 0.1
            # norms around 1 (not exactly: a norm that is loaded wrong must show), everything else ~N(0, 0.1)
            tensor.copy_(1.0 + noise if "norm" in name else noise)
    return model.eval()


def save_both_layouts(model: PreTrainedModel, root: Path) -> tuple[Path, Path]:
    per_expert, fused = root / "per_expert", root / "fused"
    model.save_pretrained(per_expert)
    model.save_pretrained(fused, save_original_format=False)
    return per_expert, fused
