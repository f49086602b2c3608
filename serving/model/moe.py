"""The MoE block: gate on the router, routed experts behind an ExpertBackend, shared experts local.

Shape legend: T = tokens, D = hidden, E = routed experts, K = experts per token.

The block never touches routed-expert weights itself: it scores, picks (weights, ids) with the
pure gate from router/, and hands rows to the backend, which may hold the experts in this process
(LocalExpertBackend) or on remote shards. Both give the same numbers; a test checks it.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from router.gate import top_k_gate
from serving.experts.backend import ExpertBackend, Routed
from serving.experts.pipeline import ExpertPipeline
from serving.model.config import ModelConfig
from serving.model.layers import GatedMLP


class Gate(nn.Module):
    """Router weights (and DeepSeek-V3's selection bias), named as in the checkpoints (mlp.gate.*)."""

    def __init__(self, hidden: int, num_experts: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        if with_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts))


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.spec = layer_id, cfg.gate
        self.gate = Gate(cfg.hidden_size, cfg.num_experts, cfg.has_gate_bias)
        self.shared_expert = (
            GatedMLP(cfg.hidden_size, cfg.shared_intermediate_size) if cfg.shared_intermediate_size else None
        )
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gated else None

    @staticmethod
    def is_gate_tensor(name: str) -> bool:
        """Whether a state-dict name is a gate tensor, which the loader keeps in float32."""
        return name.endswith((".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [T, K] float32, ids [T, K]) for each token row of x [T, D]."""
        # Scores in float32 whatever the model dtype: near-ties in bf16 would flip expert choices. The
        # loader stores the gate in float32 already, so `.float()` on it is free (no copy per call).
        logits = F.linear(x.float(), self.gate.weight.float())  # [T, E]
        bias = getattr(self.gate, "e_score_correction_bias", None)
        return top_k_gate(logits, self.spec, None if bias is None else bias.float())

    def forward(self, x: Tensor, experts: ExpertBackend) -> Tensor:
        weights, ids = self.route(x)  # [T, K], [T, K]
        # Remote experts: their rows are sent and the shards compute while this thread runs the shared
        # expert in finish (the shared-expert overlap DeepSeek's and SGLang's MoE layers do); in process,
        # start computes them at once. The same numbers either way: nothing is added before both are done.
        routed = experts.start(self.layer_id, x, weights.to(x.dtype), ids)
        return self.finish(PendingMoE(x, routed))

    def submit(self, x: Tensor, pipeline: ExpertPipeline) -> PendingMoE:
        """The first half of forward with the routed experts sent off (forward_overlapped): route, submit."""
        weights, ids = self.route(x)  # [T, K], [T, K]
        return PendingMoE(x, pipeline.submit(self.layer_id, x, weights.to(x.dtype), ids))

    def finish(self, pending: PendingMoE) -> Tensor:
        """The second half: the shared expert while the routed ones may still run, then their sum (forward's
        own second half, so a submitted layer's result is the same to the bit)."""
        shared = self._shared(pending.x)
        out = pending.routed.result()  # [T, D]
        return out if shared is None else out + shared

    def _shared(self, x: Tensor) -> Tensor | None:
        if self.shared_expert is None:
            return None
        shared = self.shared_expert(x)  # [T, D]
        if self.shared_expert_gate is not None:  # Qwen2-MoE: a learned sigmoid gate per token
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared


@dataclass(frozen=True)
class PendingMoE:
    """An MoE block whose routed experts were submitted: its input rows and the experts' future output."""

    x: Tensor  # [T, D]
    routed: Routed | Future  # of [T, D]: the backend's start, or the expert pipeline's future
