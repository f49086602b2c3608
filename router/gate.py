"""The top-k gate: router logits in, (weights, expert ids) out.

One function covers the MoE families we serve, matching Hugging Face transformers 5.19 exactly
(all maths in float32):

- Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all experts, top-k, optional renormalisation.
- DeepSeek-V3: sigmoid scores, a correction bias used only to *choose* experts, group-limited
  selection, weights gathered from the unbiased scores, renormalisation, then a scaling factor.

Ties: ``torch.topk`` does not say which of two equal scores wins. Here the lower expert id (and the
lower group id) always wins, so the same logits give the same ids on every device and every run.

Usage::

    spec = GateSpec(num_experts=8, top_k=2, score_func="softmax", renormalize=True)
    weights, ids = top_k_gate(logits, spec)   # [T, K] float32, [T, K] int64
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

# T = tokens, E = experts, K = experts per token, G = groups, P = experts per group

ScoreFunc = Literal["softmax", "sigmoid"]

# DeepSeek-V3 divides by (sum + 1e-20) so that all-zero sigmoid scores do not give 0/0. For softmax
# the sum of the top-k probabilities is at least K/E, so adding 1e-20 rounds back to the same float32
# and Mixtral/Qwen's plain division is reproduced bit for bit.
_RENORM_EPS = 1e-20


@dataclass(frozen=True)
class GateSpec:
    """How a model turns router logits into (weights, ids). Values come from the checkpoint config.

    num_experts: routed experts E (HF ``num_local_experts`` / ``num_experts`` / ``n_routed_experts``).
    top_k: experts per token K (HF ``num_experts_per_tok``).
    score_func: "softmax" (Mixtral, Qwen-MoE, OLMoE) or "sigmoid" (DeepSeek-V3).
    renormalize: divide the K weights by their sum (HF ``norm_topk_prob``; Mixtral always does).
    scaling: multiply the final weights by this (DeepSeek's ``routed_scaling_factor``).
    n_group: experts are split into this many equal groups (DeepSeek's ``n_group``).
    topk_group: a token may only use experts from its best ``topk_group`` groups.
    """

    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"
    renormalize: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"GateSpec.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"GateSpec.top_k must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"GateSpec.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if not self.scaling > 0:
            raise ValueError(f"GateSpec.scaling must be > 0, got {self.scaling}")
        if self.n_group < 1 or self.num_experts % self.n_group != 0:
            raise ValueError(
                f"GateSpec.n_group must be >= 1 and divide num_experts={self.num_experts}, got {self.n_group}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"GateSpec.topk_group must be in 1..n_group={self.n_group}, got {self.topk_group}")
        if self.n_group > 1 and self.experts_per_group < 2:
            raise ValueError(
                f"GateSpec.n_group={self.n_group} leaves {self.experts_per_group} expert per group; "
                "a group's score sums its top-2 experts, so each group needs at least 2 (use fewer groups)"
            )
        if self.top_k > self.topk_group * self.experts_per_group:
            raise ValueError(
                f"GateSpec.top_k={self.top_k} exceeds the experts in the kept groups "
                f"(topk_group={self.topk_group} x {self.experts_per_group} experts per group)"
            )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group


def top_k_gate(logits: Tensor, spec: GateSpec, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Choose ``spec.top_k`` experts per token and their weights.

    logits: [T, E] router logits, any float dtype (upcast to float32 here).
    bias: optional [E] score correction (DeepSeek-V3 ``e_score_correction_bias``). It is added to the
        scores only to choose experts; the returned weights are always the unbiased scores.
    Returns ``(weights [T, K] float32, ids [T, K] int64)``; each row is ordered by descending
    selection score (the biased score when ``bias`` is given), equal scores by ascending expert id.
    """
    if logits.ndim != 2 or logits.shape[1] != spec.num_experts:
        raise ValueError(
            f"top_k_gate: logits must be [tokens, num_experts={spec.num_experts}], got {tuple(logits.shape)}"
        )
    logits = logits.float()  # [T, E]
    if spec.score_func == "softmax":
        scores = logits.softmax(dim=-1)  # [T, E]
    else:
        scores = logits.sigmoid()  # [T, E]

    choice = scores  # [T, E] what we rank experts by
    if bias is not None:
        if bias.shape != (spec.num_experts,):
            raise ValueError(f"top_k_gate: bias must be [{spec.num_experts}], got {tuple(bias.shape)}")
        # The bias balances load across experts during training; it steers the choice but is not
        # part of the expert's weight, so it never reaches `weights` below.
        choice = scores + bias.to(device=scores.device, dtype=torch.float32)  # [T, E]
    if spec.n_group > 1:
        choice = _mask_dropped_groups(choice, spec)  # [T, E]

    ids = _top_k_ids(choice, spec.top_k)  # [T, K]
    weights = scores.gather(1, ids)  # [T, K] unbiased scores of the chosen experts
    if spec.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + _RENORM_EPS)  # [T, K]
    weights = weights * spec.scaling  # [T, K]
    return weights, ids


def _top_k_ids(scores: Tensor, k: int) -> Tensor:
    """Ids of the k largest scores per row [T, k]; equal scores: lower id first.

    A stable descending sort keeps equal elements in index order, which torch.topk does not promise.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [T, E]
    return order[:, :k]  # [T, K]


def _mask_dropped_groups(choice: Tensor, spec: GateSpec) -> Tensor:
    """Set the scores of experts outside each token's best ``topk_group`` groups to -inf.

    Why: DeepSeek-V3 trains with one group of experts per node and limits each token to a few
    groups (4 of 8), which bounds how many nodes a token's rows must travel to. A group is ranked
    by the sum of its two best (biased) scores, not its best one: with 8 experts per token over 4
    groups a token uses about 2 experts per kept group, so the top-2 sum estimates what the group
    would contribute. transformers hard-codes the 2, and so do we.
    """
    tokens = choice.shape[0]
    grouped = choice.view(tokens, spec.n_group, spec.experts_per_group)  # [T, G, P]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G] values only: ties do not matter
    kept_groups = _top_k_ids(group_scores, spec.topk_group)  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)  # [T, G]
    keep.scatter_(1, kept_groups, True)  # [T, G]
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, spec.num_experts)  # [T, E]
    # -inf can never be chosen: __post_init__ checks top_k <= experts in the kept groups.
    return choice.masked_fill(~keep, float("-inf"))  # [T, E]
