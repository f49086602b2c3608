"""Capacity planning: how many GPUs an expert-parallel deployment of a checkpoint needs (`moe-serve plan`).

Pure arithmetic on the checkpoint's config.json, no Ray and no weights. Routed experts live on
shards; everything else (embeddings, attention, norms, dense MLPs, shared experts, gates) lives on
every router replica, together with that router's KV cache.

    cfg = load_config("DeepSeek-V3/config.json")        # a checkpoint folder or its config.json
    plan = plan_capacity(cfg, gpu_memory_gib=80, dtype="bf16", routers=2)
    print(plan.describe())           # shards, experts per shard, bytes per GPU, KV room, worker groups
    plan.worker_groups()             # {"routers": 2, "shards": 18}

`dtype` is the format of the weights in GPU memory. A block-wise fp8 checkpoint (DeepSeek-V3's, whose
config.json has quantization_config) is dequantized to the served dtype at load, so its plan also
reports the bytes on disk (1 byte per quantized weight plus a float32 scale per block, the rest bf16)
separately from the bytes in memory.

What it does not count: DeepSeek-V3's multi-token-prediction layer (`num_nextn_predict_layers`,
about 14B parameters, only used for speculative decoding, which we do not run), activations
(covered by the overhead fraction) and, for fp8 in memory, quantisation scales.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from router.placement import Placement, shard_weight_bytes
from serving.errors import ConfigError
from serving.model.config import ModelConfig
from serving.model.fp8 import scale_shape

Dtype = Literal["bf16", "fp8"]
BYTES_PER_PARAM: dict[str, int] = {"bf16": 2, "fp8": 1}
# The KV cache stays in bf16 even for fp8 weights (what vLLM's kv_cache_dtype="auto" does for fp8 checkpoints).
KV_BYTES_PER_VALUE = 2
UNQUANTIZED_BYTES = 2  # what a block-wise fp8 checkpoint stores in bf16: embeddings, norms, gates, lm_head
SCALE_BYTES = 4  # a float32 weight_scale_inv per block
# Kept free on every GPU for the CUDA context, activations, NCCL buffers and allocator fragmentation.
OVERHEAD_FRACTION = 0.10
GIB = 2**30


class CapacityError(ValueError):
    """A model that cannot be placed on the given GPUs; the message says which part does not fit and why."""


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the main model (no MTP layer), split by where they live."""

    routed: int  # all routed experts of all MoE layers: what the shards hold
    dense: int  # everything else: what each router holds
    per_expert: int  # one routed expert across every MoE layer (gate, up and down projections)

    @property
    def total(self) -> int:
        return self.routed + self.dense


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the main model's weights, split as ParamCounts is."""

    routed: int
    dense: int
    per_expert: int

    @property
    def total(self) -> int:
        return self.routed + self.dense


def load_config(path: str | Path) -> ModelConfig:
    """A checkpoint folder's (or a config.json file's) ModelConfig, validated as the engine does.

    Block-wise fp8 checkpoints (the public DeepSeek-V3/R1 configs) give `fp8_block`; other quantizations
    are a ConfigError naming the field, as the engine would refuse them.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: cannot read a checkpoint config.json ({e})") from e
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from e


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Count parameters from the config alone (matches the tensors transformers builds; see tests)."""
    h = cfg.hidden_size
    moe_layers = len(cfg.moe_layer_ids)
    dense_layers = cfg.num_layers - moe_layers
    per_expert = moe_layers * 3 * h * cfg.moe_intermediate_size
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)  # embed_tokens (+ lm_head)
    norms = cfg.num_layers * 2 * h + h  # input and post-attention norm per layer, final norm
    attention = cfg.num_layers * _attention_params(cfg)
    dense_mlp = dense_layers * 3 * h * cfg.dense_intermediate_size
    gate = cfg.num_experts * h + (cfg.num_experts if cfg.has_gate_bias else 0)
    shared = 3 * h * cfg.shared_intermediate_size + (h if cfg.shared_expert_gated else 0)
    dense = embeddings + norms + attention + dense_mlp + moe_layers * (gate + shared)
    return ParamCounts(routed=per_expert * cfg.num_experts, dense=dense, per_expert=per_expert)


def fp8_checkpoint_bytes(cfg: ModelConfig) -> WeightBytes:
    """Bytes a block-wise fp8 checkpoint (cfg.fp8_block) stores, as DeepSeek-V3's does: each linear
    weight (attention projections, dense MLPs, shared and routed experts) 1 byte per parameter plus a
    float32 scale per block (edges partial); every other parameter in bf16. Raises ValueError without fp8_block.
    """
    if cfg.fp8_block is None:
        raise ValueError("fp8_checkpoint_bytes: the config has no block-wise fp8 quantization_config")
    block = cfg.fp8_block

    def fp8_bytes(shapes: list[tuple[int, int]]) -> tuple[int, int]:
        """(bytes on disk, parameters) of these quantized matrices."""
        params = sum(r * c for r, c in shapes)
        scales = sum(math.prod(scale_shape(shape, block)) for shape in shapes)
        return params + scales * SCALE_BYTES, params

    h, params = cfg.hidden_size, count_params(cfg)
    moe_layers = len(cfg.moe_layer_ids)
    per_expert, _ = fp8_bytes(_mlp_shapes(h, cfg.moe_intermediate_size))
    per_expert *= moe_layers
    dense_shapes = cfg.num_layers * _attention_shapes(cfg)
    dense_shapes += (cfg.num_layers - moe_layers) * _mlp_shapes(h, cfg.dense_intermediate_size)
    dense_shapes += moe_layers * (_mlp_shapes(h, cfg.shared_intermediate_size) if cfg.shared_intermediate_size else [])
    dense_fp8, dense_quantized = fp8_bytes(dense_shapes)
    dense = dense_fp8 + (params.dense - dense_quantized) * UNQUANTIZED_BYTES
    return WeightBytes(routed=per_expert * cfg.num_experts, dense=dense, per_expert=per_expert)


def _mlp_shapes(hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """A gated MLP's [out, in] weights: gate_proj, up_proj, down_proj."""
    return [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def _attention_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """One layer's attention projection weights, [out, in] (what fp8 checkpoints quantize)."""
    h, heads = cfg.hidden_size, cfg.num_heads
    if cfg.mla is not None:
        m = cfg.mla
        if m.q_lora_rank is None:
            q = [(heads * m.qk_head_dim, h)]
        else:  # q_a_proj, q_b_proj
            q = [(m.q_lora_rank, h), (heads * m.qk_head_dim, m.q_lora_rank)]
        kv = [(m.kv_lora_rank + m.qk_rope_head_dim, h), (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)]
        return q + kv + [(h, heads * m.v_head_dim)]
    q_width, kv_width = heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [(q_width, h), (kv_width, h), (kv_width, h), (h, q_width)]


def _attention_params(cfg: ModelConfig) -> int:
    """One layer's attention projections, biases and q/k norms."""
    h, heads = cfg.hidden_size, cfg.num_heads
    if cfg.mla is not None:
        m = cfg.mla
        if m.q_lora_rank is None:
            q = h * heads * m.qk_head_dim
        else:  # q_a_proj, its norm, q_b_proj
            q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * m.qk_head_dim
        # kv_a_proj_with_mqa makes the latent and the shared rotary key; kv_b_proj expands the latent.
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        kv += m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + heads * m.v_head_dim * h
    q_width, kv_width = heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    params = h * q_width + 2 * h * kv_width + q_width * h
    if cfg.qkv_bias:
        params += q_width + 2 * kv_width
    if cfg.o_bias:
        params += h
    if cfg.qk_norm == "per_head":
        params += 2 * cfg.head_dim
    elif cfg.qk_norm == "full":
        params += q_width + kv_width
    return params


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = KV_BYTES_PER_VALUE) -> int:
    """Cache bytes one token costs across all layers: MLA keeps a latent and a rotary key, GQA keeps K and V."""
    if cfg.mla is not None:
        per_layer = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.num_kv_heads * cfg.head_dim
    return per_layer * cfg.num_layers * bytes_per_value


@dataclass(frozen=True)
class CapacityPlan:
    """Where the weights go on GPUs of one size, and what is left for the KV cache. Bytes throughout."""

    dtype: Dtype
    gpu_bytes: int
    usable_bytes: int  # gpu_bytes less OVERHEAD_FRACTION
    params: ParamCounts
    placement: Placement  # contiguous: experts split as evenly as possible
    shard_bytes: tuple[int, ...]  # routed-expert weights on each shard
    spare_expert_slots: tuple[int, ...]  # redundant expert copies that would still fit on each shard
    router_bytes: int  # dense weights on each router
    kv_room_bytes: int  # usable_bytes - router_bytes: each router's KV cache
    kv_bytes_per_token: int
    routers: int
    max_model_len: int
    checkpoint_bytes: WeightBytes | None = None  # block-wise fp8 checkpoints: bytes on disk (memory is `dtype`)

    @property
    def num_shards(self) -> int:
        return self.placement.num_shards

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV cache one router holds (all its running sequences together)."""
        return self.kv_room_bytes // self.kv_bytes_per_token

    def worker_groups(self) -> dict[str, int]:
        """GPU worker pods per RayService worker group: one GPU per router replica and per shard replica."""
        return {"routers": self.routers, "shards": self.num_shards}

    def describe(self) -> str:
        """The plan as text for people: what `moe-serve plan` prints."""
        sizes = sorted({len(ids) for ids in self.placement.shards}, reverse=True)
        counts = ", ".join(f"{sum(len(ids) == n for ids in self.placement.shards)} x {n}" for n in sizes)
        spare = sum(self.spare_expert_slots)
        groups = self.worker_groups()
        width = BYTES_PER_PARAM[self.dtype]
        lines = [
            f"parameters: {self.params.total / 1e9:.1f}B ({self.params.routed / 1e9:.1f}B in routed experts, "
            f"{self.params.dense / 1e9:.1f}B dense); weights in {self.dtype} "
            f"({width} byte(s)/param)",
        ]
        if (disk := self.checkpoint_bytes) is not None:
            largest = max(len(ids) for ids in self.placement.shards)
            lines += [
                f"checkpoint on disk: {_gib(disk.total)} GiB in block-wise fp8 ({_gib(disk.routed)} GiB routed "
                f"experts, {_gib(disk.dense)} GiB dense; 1 byte per quantized weight + float32 scales, the rest bf16)",
                f"weights in memory: {_gib(self.params.total * width)} GiB in {self.dtype} "
                f"({_gib(self.params.routed * width)} GiB routed experts, "
                f"{_gib(self.params.dense * width)} GiB dense): "
                + ("dequantized at load" if self.dtype != "fp8" else "kept in fp8, scales not counted")
                + f"; each shard reads only its own experts (largest: {_gib(largest * disk.per_expert)} GiB from disk)",
            ]
        lines += [
            f"GPU: {_gib(self.gpu_bytes)} GiB, of which {_gib(self.usable_bytes)} GiB usable "
            f"({OVERHEAD_FRACTION:.0%} kept for CUDA context and activations)",
            f"shards: {self.num_shards} (experts per shard: {counts}); "
            f"{_gib(self.params.per_expert * BYTES_PER_PARAM[self.dtype])} GiB per expert",
            f"weights per shard GPU: {_gib(max(self.shard_bytes))} GiB (largest shard)",
            f"redundant expert copies that fit: {spare}"
            + (f" (per shard: {list(self.spare_expert_slots)}; place them with placement: explicit)" if spare else ""),
            f"weights per router GPU: {_gib(self.router_bytes)} GiB",
            f"KV cache per router: {_gib(self.kv_room_bytes)} GiB = {self.kv_tokens:,} tokens at "
            f"{self.kv_bytes_per_token:,} bytes/token ({self.kv_tokens / self.max_model_len:.1f} full "
            f"{self.max_model_len:,}-token contexts)",
            f"GPUs: {groups['routers'] + groups['shards']} "
            f"(RayService workerGroupSpecs: routers replicas={groups['routers']}, "
            f"shards replicas={groups['shards']}, each nvidia.com/gpu: 1)",
            f"app args: shards: {self.num_shards}, routers: {self.routers}, accelerator: gpu, "
            f"engine_config.kv_cache_mb: {self.kv_room_bytes // 2**20}",
        ]
        if self.dtype == "fp8":
            lines.append("note: the native engine serves bf16 weights only; fp8 shows what fp8 weights would need")
        return "\n".join(lines)


def plan_capacity(cfg: ModelConfig, gpu_memory_gib: float, dtype: Dtype = "bf16", routers: int = 1) -> CapacityPlan:
    """The fewest shards whose routed experts fit on one GPU each, and the router's KV room.

    Shards: the smallest N such that the largest of N contiguous, near-equal expert ranges fits in
    the usable memory. Raises CapacityError when one expert, or the dense part, does not fit a GPU.
    """
    if dtype not in BYTES_PER_PARAM:
        raise CapacityError(f"dtype={dtype!r}: use one of {', '.join(BYTES_PER_PARAM)}")
    if gpu_memory_gib <= 0 or routers < 1:
        raise CapacityError(f"gpu_memory_gib={gpu_memory_gib} must be > 0 and routers={routers} >= 1")
    width = BYTES_PER_PARAM[dtype]
    gpu_bytes = int(gpu_memory_gib * GIB)
    usable = int(gpu_bytes * (1 - OVERHEAD_FRACTION))
    params = count_params(cfg)
    expert_bytes = params.per_expert * width
    experts_per_gpu = usable // expert_bytes
    if experts_per_gpu < 1:
        raise CapacityError(
            f"one routed expert ({_gib(expert_bytes)} GiB in {dtype}) does not fit the {_gib(usable)} GiB "
            f"usable on a {gpu_memory_gib} GiB GPU; use bigger GPUs{' or fp8' if dtype == 'bf16' else ''}"
        )
    num_shards = -(-cfg.num_experts // experts_per_gpu)  # ceil: the largest shard then holds <= experts_per_gpu
    placement = Placement.contiguous(cfg.num_experts, num_shards)
    moe_layers = len(cfg.moe_layer_ids)
    shard_bytes = shard_weight_bytes(placement, moe_layers, cfg.hidden_size, cfg.moe_intermediate_size, width)
    router_bytes = params.dense * width
    if router_bytes >= usable:
        raise CapacityError(
            f"the dense part ({_gib(router_bytes)} GiB in {dtype}) leaves no KV cache room in the {_gib(usable)} "
            f"GiB usable on one GPU; routers are not tensor-parallel, so use bigger GPUs"
            + (" or fp8" if dtype == "bf16" else "")
        )
    return CapacityPlan(
        dtype=dtype,
        gpu_bytes=gpu_bytes,
        usable_bytes=usable,
        params=params,
        placement=placement,
        shard_bytes=tuple(shard_bytes),
        spare_expert_slots=tuple((usable - b) // expert_bytes for b in shard_bytes),
        router_bytes=router_bytes,
        kv_room_bytes=usable - router_bytes,
        kv_bytes_per_token=kv_bytes_per_token(cfg),
        routers=routers,
        max_model_len=cfg.max_position_embeddings,
        checkpoint_bytes=fp8_checkpoint_bytes(cfg) if cfg.fp8_block is not None else None,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"
