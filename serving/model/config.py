"""Model hyperparameters, read once from a checkpoint's config.json into a frozen dataclass.

The five supported architectures share one decoder; what differs between them is data here
(attention kind, q/k norms, gate scoring, shared experts, which layers are sparse). A field that
would change the maths and that we do not implement is a ConfigError naming the field: we never
serve a model that computes something other than what its authors trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from router.gate import GateSpec
from serving.errors import ConfigError
from serving.model.rope import RopeSpec, rope_spec_from_config

Arch = Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
ARCHS: tuple[Arch, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek multi-head latent attention: queries/keys/values come from low-rank latents."""

    q_lora_rank: int | None  # None: queries are a plain projection (DeepSeek-V2-Lite style)
    kv_lora_rank: int  # width of the cached latent
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # width of the rotary part, shared by all heads for keys
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs to know about a checkpoint, validated."""

    arch: Arch
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # per-head width for GQA models (MLA uses `mla` instead)
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeSpec
    rope_interleaved: bool  # DeepSeek's rope_interleave: rotary pairs are adjacent dims
    qkv_bias: bool
    o_bias: bool
    qk_norm: Literal["none", "per_head", "full"]  # Qwen3: RMSNorm per head; OLMoE: over all heads
    clip_qkv: float | None  # OLMoE: clamp q, k, v to [-clip, clip]
    mla: MLAConfig | None
    gate: GateSpec
    has_gate_bias: bool  # DeepSeek-V3's e_score_correction_bias (selection only)
    moe_intermediate_size: int
    dense_intermediate_size: int  # MLP width of the layers that are not sparse
    shared_intermediate_size: int  # 0: no shared expert
    shared_expert_gated: bool  # Qwen2-MoE: sigmoid(Linear(x)) scales the shared expert
    sparse_layers: tuple[bool, ...]  # per layer: MoE block (True) or dense MLP (False)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # Block-wise fp8 checkpoint (DeepSeek-V3's layout): (rows, cols) of a weight_scale_inv block; None: not quantized.
    # Weights are dequantized to the served dtype at load (serving/model/fp8.py); the model then runs on those values.
    fp8_block: tuple[int, int] | None

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, sparse in enumerate(self.sparse_layers) if sparse)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `<path>/config.json` (or a config.json path) and validate it."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{file}: no config.json; is this a Hugging Face checkpoint folder?")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from e

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        arch = cfg.get("model_type")
        if arch not in ARCHS:
            raise ConfigError(f"model_type={arch!r} is not supported; supported: {', '.join(ARCHS)}")
        _refuse_unsupported(cfg, arch)
        hidden = _int(cfg, "hidden_size")
        heads = _int(cfg, "num_attention_heads")
        layers = _int(cfg, "num_hidden_layers")
        mla = _mla(cfg) if arch == "deepseek_v3" else None
        head_dim = cfg.get("head_dim") or hidden // heads
        if mla is not None:
            head_dim = mla.qk_head_dim
        return cls(
            arch=arch,
            vocab_size=_int(cfg, "vocab_size"),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=_int(cfg, "max_position_embeddings"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope=rope_spec_from_config(cfg),
            rope_interleaved=arch == "deepseek_v3" and bool(cfg.get("rope_interleave", True)),
            qkv_bias=bool(cfg.get("qkv_bias", True)) if arch == "qwen2_moe" else bool(cfg.get("attention_bias")),
            o_bias=arch != "qwen2_moe" and bool(cfg.get("attention_bias")),
            qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(arch, "none"),
            clip_qkv=cfg.get("clip_qkv") if arch == "olmoe" else None,
            mla=mla,
            gate=_gate(cfg, arch),
            has_gate_bias=arch == "deepseek_v3",
            moe_intermediate_size=_int(
                cfg, "intermediate_size" if arch in ("mixtral", "olmoe") else "moe_intermediate_size"
            ),
            dense_intermediate_size=_int(cfg, "intermediate_size"),
            shared_intermediate_size=_shared_width(cfg, arch),
            shared_expert_gated=arch == "qwen2_moe",
            sparse_layers=_sparse_layers(cfg, arch, layers),
            eos_token_ids=_token_ids(cfg.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
            fp8_block=_fp8_block(cfg.get("quantization_config")),
        )


def _int(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r}: expected a positive integer")
    return value


def _first(cfg: dict[str, Any], *keys: str) -> int:
    """Checkpoints in the wild spell some fields two ways (e.g. num_experts / num_local_experts)."""
    for key in keys:
        if key in cfg:
            return _int(cfg, key)
    raise ConfigError(f"missing field: one of {', '.join(keys)}")


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _refuse_unsupported(cfg: dict[str, Any], arch: str) -> None:
    """Fields that change the maths in ways this engine does not implement."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')")
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
        raise ConfigError("use_sliding_window / layer_types: sliding-window attention is not supported")
    if arch == "mixtral" and cfg.get("sliding_window") is not None:
        raise ConfigError(f"sliding_window={cfg['sliding_window']}: sliding-window attention is not supported")
    if arch == "deepseek_v3":
        if cfg.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ConfigError(f"topk_method={cfg['topk_method']!r}: only 'noaux_tc' (DeepSeek-V3) is supported")
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise ConfigError(f"scoring_func={cfg['scoring_func']!r}: only 'sigmoid' is supported")
    if cfg.get("num_key_value_heads") and cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")


def _fp8_block(quant: Any) -> tuple[int, int] | None:
    """The weight_scale_inv block of a block-wise fp8 `quantization_config`; None when there is none.

    Accepted: quant_method 'fp8', fmt 'e4m3' (or absent), activation_scheme 'dynamic' (or absent) and
    weight_block_size [B0, B1], as DeepSeek-V3/R1 publish. Anything else (another quant_method, per-tensor
    fp8 without a block size, static activation scales, e5m2) is a ConfigError naming the field.
    """
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"quantization_config={quant!r}: expected an object")
    supported = "only block-wise fp8 (quant_method 'fp8' with weight_block_size, as DeepSeek-V3) is supported"
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method={method!r}: {supported}")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"quantization_config.fmt={quant['fmt']!r}: only 'e4m3' (float8_e4m3fn) is supported")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(
            f"quantization_config.activation_scheme={quant['activation_scheme']!r}: only 'dynamic' is supported "
            "(static activation scales are not read)"
        )
    if quant.get("scale_fmt", "float") not in ("float", "ue8m0"):  # ue8m0: power-of-two scales, applied as stored
        raise ConfigError(f"quantization_config.scale_fmt={quant['scale_fmt']!r}: only 'float' or 'ue8m0'")
    block = quant.get("weight_block_size")
    if block is None:
        raise ConfigError(f"quantization_config.weight_block_size is missing (per-tensor fp8): {supported}")
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(f"quantization_config.weight_block_size={block!r}: expected two positive integers")
    return int(block[0]), int(block[1])


def _mla(cfg: dict[str, Any]) -> MLAConfig:
    q_rank = cfg.get("q_lora_rank")
    return MLAConfig(
        q_lora_rank=None if q_rank is None else _int(cfg, "q_lora_rank"),
        kv_lora_rank=_int(cfg, "kv_lora_rank"),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=_int(cfg, "qk_rope_head_dim"),
        v_head_dim=_int(cfg, "v_head_dim"),
    )


def _gate(cfg: dict[str, Any], arch: str) -> GateSpec:
    num_experts = _first(cfg, "n_routed_experts", "num_experts", "num_local_experts")
    norm_default = {"mixtral": True, "deepseek_v3": True}.get(arch, False)
    try:
        return GateSpec(
            num_experts=num_experts,
            top_k=_int(cfg, "num_experts_per_tok"),
            score_func="sigmoid" if arch == "deepseek_v3" else "softmax",
            # Mixtral always renormalises its top-k; the others say so in norm_topk_prob.
            renormalize=True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", norm_default)),
            scaling=float(cfg.get("routed_scaling_factor", 1.0)) if arch == "deepseek_v3" else 1.0,
            n_group=int(cfg.get("n_group") or 1) if arch == "deepseek_v3" else 1,
            topk_group=int(cfg.get("topk_group") or 1) if arch == "deepseek_v3" else 1,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _shared_width(cfg: dict[str, Any], arch: str) -> int:
    if arch == "qwen2_moe":
        return int(cfg.get("shared_expert_intermediate_size") or 0)
    if arch == "deepseek_v3":
        return int(cfg.get("n_shared_experts") or 0) * _int(cfg, "moe_intermediate_size")
    return 0


def _sparse_layers(cfg: dict[str, Any], arch: str, layers: int) -> tuple[bool, ...]:
    """Which decoder layers hold an MoE block; the rest hold a dense MLP."""
    if arch == "deepseek_v3":
        first_dense = int(cfg.get("first_k_dense_replace", 0))
        step = int(cfg.get("moe_layer_freq", 1))
        return tuple(i >= first_dense and i % step == 0 for i in range(layers))
    if arch in ("qwen2_moe", "qwen3_moe"):
        step = int(cfg.get("decoder_sparse_step", 1))
        dense = set(cfg.get("mlp_only_layers") or [])
        if bad := sorted(i for i in dense if not 0 <= i < layers):
            raise ConfigError(f"mlp_only_layers={bad}: layer ids outside 0..{layers - 1}")
        return tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
    return (True,) * layers
