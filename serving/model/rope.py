"""Rotary position embeddings (RoPE) with the scalings our checkpoints use: default, linear, llama3, YaRN.

Shapes: T = tokens (flattened across the batch), H = heads, D = rotary dims, F = D // 2 frequencies,
P = max_positions.

The inverse frequencies are computed in float32 with the same operations, in the same order, as
transformers 5.19: a relative error e in a frequency f moves the angle at position p by e * f * p, which
at long positions is far above the 1e-6 the tables must match to.

    spec = rope_spec_from_config(json.load(open("config.json")))
    rope = RotaryEmbedding(spec, rotary_dim=64, max_positions=4096)
    q = rope(q, positions)  # q: [T, H, D], positions: [T] int64
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from serving.errors import ConfigError

RopeKind = Literal["default", "linear", "yarn", "llama3"]

# The scaling keys each kind reads. Any other key is refused: the implementation that wrote it would use it,
# so ignoring it silently would change the model.
_LLAMA3_NUMBERS = ("low_freq_factor", "high_freq_factor")
_YARN_NUMBERS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")
_KIND_KEYS = MappingProxyType(
    {
        "default": frozenset(),
        "linear": frozenset({"factor"}),
        "yarn": frozenset({"factor", "original_max_position_embeddings", "truncate", *_YARN_NUMBERS}),
        "llama3": frozenset({"factor", "original_max_position_embeddings", *_LLAMA3_NUMBERS}),
    }
)
_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_HARMLESS_KEYS = frozenset({"finetuned"})  # NousResearch YaRN configs: read only by their dynamic variant


@dataclass(frozen=True)
class RopeSpec:
    """RoPE hyperparameters from a checkpoint's config.json; None means "not set" (the kind's default)."""

    theta: float  # base of the geometric frequency ladder
    kind: RopeKind = "default"
    factor: float | None = None  # context extension ratio (linear, yarn, llama3)
    original_max_position_embeddings: int | None = None  # pretraining context (yarn, llama3)
    beta_fast: float | None = None  # yarn: rotations above which a frequency is kept (default 32)
    beta_slow: float | None = None  # yarn: rotations below which a frequency is interpolated (default 1)
    mscale: float | None = None  # yarn (DeepSeek): numerator of the cos/sin attention factor
    mscale_all_dim: float | None = None  # yarn (DeepSeek): its denominator, and the softmax scale correction
    attention_factor: float | None = None  # yarn: explicit cos/sin factor, overrides the mscale rule
    truncate: bool | None = None  # yarn: round the ramp's ends to whole dims (default True)
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3

    def __post_init__(self) -> None:
        needs = {"linear": 1, "yarn": 2, "llama3": 4}.get(self.kind, 0)
        fields = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
        for name in fields[:needs]:
            if getattr(self, name) is None:
                raise ConfigError(f"rope_type={self.kind!r} needs rope parameter {name!r}, which is not set")
        for name in ("beta_fast", "beta_slow"):
            if (value := getattr(self, name)) is not None and value <= 0:
                raise ConfigError(f"rope parameter {name}={value} must be > 0 (unset means the default)")


def rope_spec_from_config(cfg: dict[str, Any]) -> RopeSpec:
    """Read RoPE settings from a config.json dict in either format.

    Old: `rope_theta` plus an optional `rope_scaling` dict keyed by `type` or `rope_type`.
    transformers 5: a `rope_parameters` dict holding `rope_type`, `rope_theta` and the scaling keys.
    Raises ConfigError naming the field for unsupported kinds, unknown keys and missing values.
    """
    new, old = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if new is not None and old is not None:
        raise ConfigError("config has both 'rope_parameters' and 'rope_scaling'; keep one")
    field = "rope_parameters" if new is not None else "rope_scaling"
    params = new if new is not None else (old or {})
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{field} must be one flat dict (per-layer RoPE is not supported), got {params!r}")
    rope_type, legacy_type = params.get("rope_type"), params.get("type")
    if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
        raise ConfigError(f"{field} has rope_type={rope_type!r} but type={legacy_type!r}; they must agree")
    kind = rope_type or legacy_type or "default"
    if not isinstance(kind, str) or kind not in _KIND_KEYS:
        raise ConfigError(f"{field}.rope_type={kind!r} is not supported; supported: {', '.join(_KIND_KEYS)}")
    if unknown := set(params) - _COMMON_KEYS - _KIND_KEYS[kind] - _HARMLESS_KEYS:
        allowed = sorted(_KIND_KEYS[kind] | _COMMON_KEYS)
        raise ConfigError(f"{field} keys {sorted(unknown)} are not used by {kind!r} RoPE; allowed: {allowed}")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        raise ConfigError(f"partial_rotary_factor={partial} is not supported (only full-width rotary, 1.0)")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise ConfigError(f"rope_theta={theta!r} must be a number > 1: set {field}.rope_theta or rope_theta")
    truncate = params.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise ConfigError(f"{field}.truncate={truncate!r} must be true or false")

    def number(key: str, value: Any) -> float | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{field}.{key}={value!r} must be a number")
        return None if value is None else float(value)

    original = params.get("original_max_position_embeddings")
    if original is None and kind in ("yarn", "llama3"):  # transformers falls back to the model's context
        original = cfg.get("max_position_embeddings")
    numbers = {key: number(key, params.get(key)) for key in ("factor", *_LLAMA3_NUMBERS, *_YARN_NUMBERS)}
    original = number("original_max_position_embeddings", original)
    numbers["original_max_position_embeddings"] = None if original is None else int(original)
    return RopeSpec(float(theta), kind, truncate=truncate, **numbers)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN's temperature: a stretched context flattens attention, so logits are sharpened by ~0.1 ln(s) + 1.
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _inverse_frequencies(spec: RopeSpec, dim: int) -> tuple[Tensor, float]:
    """The [F] float32 inverse frequencies, and the factor that scales cos and sin."""
    powers = spec.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)  # [F] theta^(2i/D)
    inv_freq = 1.0 / powers  # [F]
    if spec.kind == "linear":  # Position Interpolation: positions / factor, folded into the frequencies
        return inv_freq / spec.factor, 1.0
    if spec.kind == "llama3":
        return _llama3(spec, inv_freq), 1.0
    if spec.kind == "yarn":
        return _yarn(spec, dim, powers, inv_freq)
    return inv_freq, 1.0


def _yarn(spec: RopeSpec, dim: int, powers: Tensor, inv_freq: Tensor) -> tuple[Tensor, float]:
    # YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models").
    # A frequency that turns more than beta_fast times within the original context was trained over whole
    # periods, so it is kept (extrapolated); one that turns fewer than beta_slow times is divided by
    # `factor` (interpolated), so long positions stay within angles seen in training. A linear ramp over
    # the frequency index blends the two in between.
    factor, original = spec.factor, spec.original_max_position_embeddings

    def dim_of(rotations: float) -> float:  # the fractional dim index whose frequency turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low = dim_of(32.0 if spec.beta_fast is None else spec.beta_fast)
    high = dim_of(1.0 if spec.beta_slow is None else spec.beta_slow)
    if spec.truncate is None or spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)  # [F]
    keep = 1 - ramp.clamp(0, 1)  # [F] 1 = original frequency, 0 = interpolated
    inv_freq = 1.0 / (factor * powers) * (1 - keep) + inv_freq * keep  # [F]
    # cos and sin carry the temperature, so q.k gets its square. DeepSeek puts m(mscale) / m(mscale_all_dim)
    # here (1 when they are equal) and m(mscale_all_dim)**2 in the softmax scale (see softmax_scale), so
    # rotary dims get m(mscale)**2 overall and the other dims m(mscale_all_dim)**2.
    attention = spec.attention_factor
    if attention is None and spec.mscale and spec.mscale_all_dim:
        attention = _yarn_mscale(factor, spec.mscale) / _yarn_mscale(factor, spec.mscale_all_dim)
    return inv_freq, _yarn_mscale(factor) if attention is None else attention


def _llama3(spec: RopeSpec, inv_freq: Tensor) -> Tensor:
    # Llama 3.1: wavelengths below original/high_freq_factor are kept, those above original/low_freq_factor
    # are divided by factor, and those in between are blended by where the wavelength falls.
    factor, original = spec.factor, spec.original_max_position_embeddings
    low, high = spec.low_freq_factor, spec.high_freq_factor
    wavelength = 2 * math.pi / inv_freq  # [F]
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)  # [F]
    blend = (original / wavelength - low) / (high - low)  # [F] 0 at original/low .. 1 at original/high
    blended = (1 - blend) * scaled / factor + blend * scaled  # [F]
    middle = (wavelength >= original / high) & (wavelength <= original / low)  # [F]
    return torch.where(middle, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates [T, H, D] queries or keys by their absolute positions, from precomputed cos/sin tables.

    `interleaved=False`: dims i and i + D/2 form a pair (transformers' rotate_half layout).
    `interleaved=True`: dims 2i and 2i+1 form a pair (DeepSeek-V3's rope_interleave); the output is
    de-interleaved, [rotated evens | rotated odds], exactly as transformers' apply_rotary_pos_emb_interleave
    returns it: q and k get the same permutation, so their dot products are unchanged.
    Positions must be < max_positions (unchecked: a check would sync the device on every call).
    """

    def __init__(self, spec: RopeSpec, rotary_dim: int, max_positions: int, interleaved: bool = False):
        super().__init__()
        if rotary_dim <= 0 or rotary_dim % 2:
            raise ConfigError(f"rotary dim must be a positive even number, got {rotary_dim}")
        self.rotary_dim, self.interleaved = rotary_dim, interleaved
        inv_freq, attention = _inverse_frequencies(spec, rotary_dim)  # [F], float
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq  # [P, F]
        self.register_buffer("cos", angles.cos() * attention, persistent=False)  # [P, F]
        self.register_buffer("sin", angles.sin() * attention, persistent=False)  # [P, F]

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        if x.shape[-1] != self.rotary_dim:
            raise ValueError(f"rotary input has {x.shape[-1]} dims, expected rotary_dim={self.rotary_dim}")
        cos = self.cos[positions].to(x.dtype)[:, None, :]  # [T, 1, F]
        sin = self.sin[positions].to(x.dtype)[:, None, :]  # [T, 1, F]
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]  # [T, H, F] each: first and second of each pair
        else:
            x1, x2 = x.chunk(2, dim=-1)  # [T, H, F] each
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # [T, H, D]


def softmax_scale(spec: RopeSpec, head_dim: int) -> float:
    """Attention logit scale for MLA (DeepSeek): head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 for
    YaRN with mscale_all_dim set, as transformers' DeepseekV3Attention.scaling. head_dim is the full q/k
    width (nope + rope). The other models' attention uses plain head_dim**-0.5.
    """
    scale = head_dim**-0.5
    if spec.kind == "yarn" and spec.mscale_all_dim:
        mscale = _yarn_mscale(spec.factor, spec.mscale_all_dim)
        scale = scale * mscale * mscale
    return scale
