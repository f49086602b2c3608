"""The decoder for all five architectures, and loading it from a checkpoint.

Shape legend: T = new tokens in the step (all sequences flattened), D = hidden, V = vocabulary.

Module and parameter names mirror the Hugging Face checkpoints (model.layers.{i}.self_attn.q_proj, ...),
so the dense part loads by name. Routed experts are not parameters of this module: they live behind
an ExpertBackend (in process, or on remote shards), passed to `forward`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from serving.engine_client import ExpertKernel
from serving.experts.backend import ExpertBackend
from serving.experts.loading import load_experts
from serving.experts.local import LocalExpertBackend
from serving.experts.pipeline import ExpertPipeline
from serving.model.attention import AttentionMetadata, GQAttention
from serving.model.checkpoint import Checkpoint
from serving.model.config import ModelConfig
from serving.model.layers import GatedMLP, RMSNorm
from serving.model.mla import MLAttention
from serving.model.moe import MoEBlock, PendingMoE
from serving.model.prepack import PackedLinear, can_prepack, prepack_linears
from serving.model.rope import RotaryEmbedding, softmax_scale


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.mla is not None:
            scale = softmax_scale(cfg.rope, cfg.mla.qk_head_dim)
            self.self_attn = MLAttention(cfg.hidden_size, cfg.num_heads, cfg.mla, cfg.o_bias, cfg.rms_norm_eps, scale)
        else:
            self.self_attn = GQAttention(
                cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                cfg.qkv_bias, cfg.o_bias, cfg.qk_norm, cfg.clip_qkv, cfg.rms_norm_eps,
            )  # fmt: skip
        self.sparse = cfg.sparse_layers[layer_id]
        self.mlp = MoEBlock(cfg, layer_id) if self.sparse else GatedMLP(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(
        self,
        x: Tensor,
        meta: AttentionMetadata,
        cache: list[Tensor],
        rope: RotaryEmbedding,
        experts: ExpertBackend,
    ) -> Tensor:
        x, h = self._attend(x, meta, cache, rope)
        return x + (self.mlp(h, experts) if self.sparse else self.mlp(h))  # [T, D]

    def start(
        self, x: Tensor, meta: AttentionMetadata, cache: list[Tensor], rope: RotaryEmbedding, pipeline: ExpertPipeline
    ) -> tuple[Tensor, PendingMoE | None]:
        """forward up to the routed experts, which are submitted to `pipeline`: (x after attention, pending).
        A dense layer has nothing to wait for: its output, None."""
        x, h = self._attend(x, meta, cache, rope)
        if not self.sparse:
            return x + self.mlp(h), None
        return x, self.mlp.submit(h, pipeline)

    def finish(self, x: Tensor, pending: PendingMoE | None) -> Tensor:
        return x if pending is None else x + self.mlp.finish(pending)

    def _attend(
        self, x: Tensor, meta: AttentionMetadata, cache: list[Tensor], rope: RotaryEmbedding
    ) -> tuple[Tensor, Tensor]:
        """x after the attention residual [T, D], and its post-attention norm [T, D] (the MLP's input)."""
        x = x + self.self_attn(self.input_layernorm(x), meta, cache, rope)  # [T, D]
        return x, self.post_attention_layernorm(x)


class DecoderStack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoEForCausalLM(nn.Module):
    """The dense part of an MoE language model; experts are reached through an ExpertBackend."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = self._rotary(cfg)

    @staticmethod
    def _rotary(cfg: ModelConfig) -> RotaryEmbedding:
        rotary_dim = cfg.mla.qk_rope_head_dim if cfg.mla is not None else cfg.head_dim
        return RotaryEmbedding(cfg.rope, rotary_dim, cfg.max_position_embeddings, interleaved=cfg.rope_interleaved)

    def cache_shapes(self) -> list[list[tuple[int, ...]]]:
        """Per layer, the shapes of the rows one token keeps in the KV cache."""
        return [layer.self_attn.cache_shapes() for layer in self.model.layers]

    def forward(
        self, input_ids: Tensor, meta: AttentionMetadata, caches: list[list[Tensor]], experts: ExpertBackend
    ) -> Tensor:
        """Run the new tokens input_ids [T] of a step; returns final hidden states [T, D]."""
        x = self.model.embed_tokens(input_ids)  # [T, D]
        for layer, cache in zip(self.model.layers, caches, strict=True):
            x = layer(x, meta, cache, self.rotary, experts)
        return self.model.norm(x)

    def forward_overlapped(
        self, parts: list[tuple[Tensor, AttentionMetadata]], caches: list[list[Tensor]], pipeline: ExpertPipeline
    ) -> list[Tensor]:
        """forward for two micro-batches (input_ids [T_a], its metadata), kept in flight together: each one's
        routed experts run in `pipeline` while this thread runs the other's attention. Per layer:

            start A_l   (attention of A; its experts submitted: the shards compute them ...)
            finish B_l-1 (... while B's shared expert runs; then B's experts of the layer before are awaited)
            start B_l   (attention of B, while the shards compute A_l)
            finish A_l  (A's experts awaited, while the shards compute B_l)

        Each micro-batch sees exactly the operations forward would run on it; returns final hidden states
        [T_a, D], [T_b, D]."""
        (ids_a, meta_a), (ids_b, meta_b) = parts
        a, b = self.model.embed_tokens(ids_a), self.model.embed_tokens(ids_b)  # [T_a, D], [T_b, D]
        b_open: tuple[DecoderLayer, Tensor, PendingMoE | None] | None = None
        for layer, cache in zip(self.model.layers, caches, strict=True):
            a_x, a_pending = layer.start(a, meta_a, cache, self.rotary, pipeline)
            if b_open is not None:
                b = b_open[0].finish(b_open[1], b_open[2])
            b_x, b_pending = layer.start(b, meta_b, cache, self.rotary, pipeline)
            a = layer.finish(a_x, a_pending)
            b_open = (layer, b_x, b_pending)
        if b_open is not None:
            b = b_open[0].finish(b_open[1], b_open[2])
        return [self.model.norm(a), self.model.norm(b)]

    @property
    def device(self) -> torch.device:
        """Where the model was loaded (load_model's `device`); the engine puts its inputs and cache there."""
        return self.model.embed_tokens.weight.device

    @property
    def weight_bytes(self) -> int:
        """Bytes of the dense part's weights, packed ones included: what a decode step reads at least once."""
        packed = [m.packed for m in self.modules() if isinstance(m, PackedLinear)]
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *packed])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (load_model's `dtype`)."""
        return self.model.embed_tokens.weight.dtype

    def logits(self, hidden: Tensor) -> Tensor:
        """[N, D] -> [N, V] float32 logits (only for the rows that are sampled)."""
        return self.lm_head(hidden).float()


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", prepack: bool = True
) -> tuple[MoEForCausalLM, Checkpoint]:
    """Build the dense part of the model at `path` and load its weights (routed experts excluded) onto
    `device`.

    Returns the model (eval mode, no grad needed) and the open Checkpoint, from which experts are read.
    A block-wise fp8 checkpoint (config.fp8_block) is dequantized to `dtype` at load: memory is that of `dtype`.
    `prepack`: on CPU in bfloat16, the linears run on weights packed for oneDNN (serving/model/prepack.py:
    the same outputs, faster); False keeps nn.Linear (to compare the two).
    """
    cfg = ModelConfig.from_pretrained(path)
    ckpt = Checkpoint(path, fp8_block=cfg.fp8_block)  # fp8 checkpoints: dequantized to `dtype` as they are read
    with torch.device("meta"):  # no time spent initialising weights we overwrite
        model = MoEForCausalLM(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_word_embeddings and not ckpt.has("lm_head.weight"):
        del shapes["lm_head.weight"]  # tied: the embedding serves as the output head
    # Host -> device, one tensor at a time as it is read: host memory never holds the whole model.
    state = {name: ckpt.read(name, shape, dtype).to(device) for name, shape in shapes.items()}
    for name in [n for n in state if MoEBlock.is_gate_tensor(n)]:
        # Gates score in float32 (MoEBlock.route): upcast once here, from the served dtype's values, not per call.
        state[name] = state[name].float()
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.rotary = model._rotary(cfg).to(device)  # rotary tables are buffers, not weights: rebuilt off meta
    model.eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, MLAttention):
            module.absorb()  # kv_b_proj into the layouts MLA's forward reads
    if prepack and can_prepack(dtype, torch.device(device)):
        tied = model.lm_head.weight is model.model.embed_tokens.weight  # packing it would keep a second copy
        prepack_linears(model, keep=(model.lm_head,) if tied else ())
    return model, ckpt


def load_local(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    expert_kernel: ExpertKernel = "loop",
) -> tuple[MoEForCausalLM, LocalExpertBackend]:
    """The whole model in this process, on `device`: dense part plus every routed expert, on `expert_kernel`."""
    model, ckpt = load_model(path, dtype, device)
    experts = load_experts(ckpt, model.config, list(range(model.config.num_experts)), dtype, device, expert_kernel)
    return model, LocalExpertBackend(experts)
