"""Skewed gates for demo checkpoints: expert load that follows a Zipf law (`make-demo --router-skew zipf:S`).

Random demo gates route unevenly only by accident (on the corpus, per layer and seed, fitted exponents of
0.4-1.0 with no control over which), which is no load to study placement and rebalancing on. With a skew,
the expert of rank r in each MoE layer gets load proportional to r^-S (ranks drawn per layer from the
seed), measured on ordinary text: the demo corpus (serving/demo_data/corpus.txt).

    >>> skew = parse_router_skew("zipf:1.0")
    >>> skew_gates(model, skew, seed=0, prompts=calibration_prompts(tokenizer))   # a transformers model
    >>> fitted_exponent(load_of_one_layer)                                           # ~1.0 on other text

The skew lives in the checkpoint's weights, so whatever loads the checkpoint gets the same gates:
transformers routes the same tokens to the same experts as our engine (tests/serving/test_router_skew.py
checks it). Per layer, in model order (a layer's skew changes what the next layer sees):

1. Run the calibration prompts (`calibration_prompts`) through the model and keep the gate's input h [T, D]
   (the normed hidden states). A random model's h are far from centred: they share a direction, so some
   u [D] has s = h . u ~ 1 for every token (least squares over the calibration tokens; measured on the
   mixtral demo: s has mean ~0.85 and std ~0.35 on the corpus).
2. Fit a per-expert bias b [E] so that top-k routing of (logits + b) gives each expert its Zipf share of
   the calibration rows: b_e grows by a step times log(target_e / measured_e) each round (the step grows
   after a round that fits better, and halves after one that does not), up to FIT_ROUNDS rounds.
3. Write b into the gate. DeepSeek-V3 has a selection bias (e_score_correction_bias): it is b. Mixtral,
   Qwen2-MoE, Qwen3-MoE and OLMoE have only a weight: row e gains b_e * u, so token t's logit for e gains
   b_e * s_t, about b_e. The fit in step 2 uses those logits (with each token's own s_t), so it fits what
   the checkpoint will really do.

Measured on the corpus paragraphs the fit never saw (`held_out_prompts`), weight seeds 0-2, every MoE layer:
the sorted load fits r^-S with an exponent of 0.46-0.74 for S = 0.6, 0.82-1.08 for S = 1.0 and 1.18-1.50
for S = 1.4 through a weight direction (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), and 0.59-0.64, 0.97-1.04
and 1.35-1.44 through DeepSeek-V3's bias, which reaches every token alike. Through a direction the skew
depends on the text (s is smaller on hidden states unlike the calibration's): on the load tests' prompts
(loadtests/workload.py, ~60 distinct words) S = 1.0 measured 0.63-1.23 (DeepSeek-V3: 0.91-1.3). One
expert can take at most 1/top_k of a layer's rows (a token picks it once), which bounds S: `max_exponent`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from router.gate import GateSpec, top_k_gate
from serving.errors import ConfigError
from serving.model.config import ModelConfig
from serving.tokenizer import Tokenizer

# T = calibration tokens, D = hidden, E = routed experts, K = experts per token
CORPUS_MIN_CHARS = 40  # paragraphs shorter than this are headings
PROMPT_TOKENS = 128  # each paragraph's first tokens (the demo's paragraphs are ~60-90 tokens)
FIT_ROUNDS = 200
FIT_TOLERANCE = 5e-3  # L1 distance of the measured shares from the target: good enough, stop
GROW, SHRINK = 1.2, 0.5  # the step after a round that fits better / worse (then the best bias is taken back)
SHUFFLED_SEED = 0
RIDGE = 1e-3  # keeps the least-squares direction u finite where the hidden states are degenerate


@dataclass(frozen=True)
class ZipfSkew:
    """Load of the rank-r expert (r = 1..E) proportional to r^-exponent."""

    exponent: float

    def shares(self, num_experts: int) -> Tensor:
        """[E] float64 shares by rank (rank 1 first), summing to 1."""
        weights = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -self.exponent  # [E]
        return weights / weights.sum()

    def spec(self) -> str:
        return f"zipf:{self.exponent:g}"


def parse_router_skew(spec: str) -> ZipfSkew:
    """`zipf:S` with S > 0 (e.g. zipf:1.0); ConfigError saying what is wrong otherwise."""
    kind, sep, value = spec.strip().partition(":")
    if kind != "zipf" or not sep:
        raise ConfigError(f"router skew {spec!r}: the only kind is zipf:S, S > 0 (e.g. zipf:1.0)")
    if not value.strip():
        raise ConfigError(f"router skew {spec!r}: give the exponent S after 'zipf:' (e.g. zipf:1.0)")
    try:
        exponent = float(value)
    except ValueError:
        raise ConfigError(f"router skew {spec!r}: exponent {value!r} is not a number (e.g. zipf:1.0)") from None
    if not (math.isfinite(exponent) and exponent > 0):
        raise ConfigError(f"router skew {spec!r}: the exponent must be a finite number > 0 (e.g. zipf:1.0)")
    return ZipfSkew(exponent)


def max_exponent(num_experts: int, top_k: int) -> float:
    """The largest S whose top share, 1 / sum_r r^-S, is at most 1/top_k (to 0.01; inf for top_k=1)."""
    if top_k == 1:
        return math.inf
    low, high = 0.0, 64.0
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (mid, high) if ZipfSkew(mid).shares(num_experts)[0] <= 1 / top_k else (low, mid)
    return math.floor(low * 100) / 100


def corpus_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """The demo corpus's paragraphs as token ids (headings skipped, at most PROMPT_TOKENS each)."""
    return [tokenizer.encode(p)[:PROMPT_TOKENS] for p in _paragraphs()]


def calibration_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """What the gates are fitted on: every other paragraph of the corpus, from the first, and as many prompts
    of 16-64 corpus words in random order (fixed seed), like the load tests' word lists. Without them the
    fit leans on what the paragraphs' hidden states share, and transfers less well to other text."""
    words = " ".join(_paragraphs()).split()
    rng = random.Random(SHUFFLED_SEED)
    paragraphs = corpus_prompts(tokenizer)[0::2]
    shuffled = [" ".join(rng.choice(words) for _ in range(rng.randint(16, 64))) for _ in paragraphs]
    return paragraphs + [tokenizer.encode(text)[:PROMPT_TOKENS] for text in shuffled]


def held_out_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """The paragraphs the fit never saw (every other one, from the second), for measuring it."""
    return corpus_prompts(tokenizer)[1::2]


def _paragraphs() -> list[str]:
    from serving.demo import CORPUS  # serving.demo imports this module

    return [p for p in CORPUS.read_text(encoding="utf-8").splitlines() if len(p) >= CORPUS_MIN_CHARS]


def fitted_exponent(load: Sequence[int]) -> float:
    """S of the least-squares line log(load) = c - S log(rank) through one layer's loads sorted high to low
    (an empty expert counts as half a row, so its log is finite)."""
    ranked = torch.tensor(sorted(load, reverse=True), dtype=torch.float64).clamp(min=0.5)  # [E]
    x = torch.arange(1, len(ranked) + 1, dtype=torch.float64).log()  # [E]
    y = ranked.log()  # [E]
    dx = x - x.mean()
    return float(-(dx * (y - y.mean())).sum() / (dx * dx).sum())


def rank_orders(num_experts: int, num_layers: int, seed: int) -> list[list[int]]:
    """Per MoE layer in model order, the expert ids from most to least loaded that `skew_gates` with `seed`
    gives them (a placement can put a layer's hottest experts on one shard: tests/deployments/test_autoscaling)."""
    order = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_experts, generator=order).tolist() for _ in range(num_layers)]


def skew_gates(model: PreTrainedModel, skew: ZipfSkew, seed: int, prompts: list[list[int]]) -> None:
    """Bias the gates of a transformers MoE `model` in place so that each MoE layer's load on `prompts`
    follows `skew` (module docstring); ranks are a random permutation of the experts per layer from `seed`.
    Raises ConfigError when the skew is steeper than top-k routing allows."""
    config = ModelConfig.from_dict(model.config.to_dict())
    spec = config.gate
    if skew.exponent > (limit := max_exponent(spec.num_experts, spec.top_k)):
        top = float(skew.shares(spec.num_experts)[0])
        raise ConfigError(
            f"router skew {skew.spec()}: the top expert would take {top:.0%} of a layer's rows, but with "
            f"top_k={spec.top_k} one expert gets at most {1 / spec.top_k:.0%} (a token picks it once); "
            f"use S <= {limit:g} for {spec.num_experts} experts"
        )
    threads = torch.get_num_threads()
    # A tiny model and hundreds of tiny ops: a second intra-op thread costs more in sync than it brings
    # (measured 2-4x slower with 2 threads than with 1 on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        _skew_layers(model, config, skew, seed, prompts)
    finally:
        torch.set_num_threads(threads)


def _skew_layers(
    model: PreTrainedModel, config: ModelConfig, skew: ZipfSkew, seed: int, prompts: list[list[int]]
) -> None:
    """skew_gates' work, layer by layer in model order (a layer's skew changes what the next one sees)."""
    spec = config.gate
    orders = rank_orders(spec.num_experts, len(config.moe_layer_ids), seed)
    for layer, order in zip(config.moe_layer_ids, orders, strict=True):
        gate = model.model.layers[layer].mlp.gate
        ranks = torch.tensor(order)  # expert of rank r+1 is ranks[r]
        target = torch.empty(spec.num_experts, dtype=torch.float64)
        target[ranks] = skew.shares(spec.num_experts)  # [E] by expert id
        hidden = gate_inputs(model, layer, prompts)  # [T, D]
        logits = hidden @ gate.weight.detach().double().T  # [T, E]
        direction = None if config.has_gate_bias else _shared_direction(hidden)  # [D]
        scale = torch.ones(len(hidden), dtype=torch.float64) if direction is None else hidden @ direction  # [T]
        bias = _fit(logits, scale, spec, target, by_bias=direction is None)
        with torch.no_grad():
            if direction is None:  # DeepSeek-V3: the gate's own selection bias
                gate.e_score_correction_bias.copy_(bias)
            else:  # row e gains b_e * u: token t's logit for e gains b_e * s_t
                gate.weight.add_((bias[:, None] * direction[None, :]).to(gate.weight.dtype))  # [E, D]


class _Reached(Exception):
    """Raised by the hook on the gate whose inputs we want: the rest of the forward pass is not needed."""


def gate_inputs(model: PreTrainedModel, layer: int, prompts: list[list[int]]) -> Tensor:
    """What layer `layer`'s gate sees for every token of `prompts`, [T, D] float64.

    One forward pass of all prompts together, right-padded (causal attention: a real token never sees the
    padding after it, and routing is per token), stopped at that gate."""
    gate = model.model.layers[layer].mlp.gate
    longest = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])  # [B, longest]
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])  # [B, longest]
    seen: list[Tensor] = []

    def stop(_, args) -> None:
        seen.append(args[0].reshape(-1, args[0].shape[-1]))  # [B * longest, D]
        raise _Reached

    hook = gate.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Reached:
        pass
    finally:
        hook.remove()
    return seen[0][mask.flatten().bool()].double()  # [T, D] the real tokens, prompt by prompt


def _shared_direction(hidden: Tensor) -> Tensor:
    """u [D] with hidden @ u as close to 1 as least squares gets it (ridge RIDGE)."""
    gram = hidden.T @ hidden + RIDGE * torch.eye(hidden.shape[1], dtype=hidden.dtype)  # [D, D]
    return torch.linalg.solve(gram, hidden.T @ torch.ones(len(hidden), dtype=hidden.dtype))  # [D]


def _fit(logits: Tensor, scale: Tensor, spec: GateSpec, target: Tensor, by_bias: bool) -> Tensor:
    """The bias b [E] whose routing matches `target` shares best on these tokens.

    logits [T, E]; scale [T]: how much of b reaches each token (s_t; 1 for a real bias). by_bias: b is a
    selection bias on the scores (DeepSeek), else it adds to the logits (a weight direction)."""
    tokens, experts = logits.shape
    scores = logits.sigmoid() if spec.score_func == "sigmoid" else logits
    step = 0.5 * float(scores.std())  # about half the scores' spread per round at first
    bias = best_bias = torch.zeros(experts, dtype=torch.float64)
    best = math.inf
    for _ in range(FIT_ROUNDS):
        if by_bias:
            _, ids = top_k_gate(logits, spec, bias)  # [T, K]
        else:
            _, ids = top_k_gate(logits + scale[:, None] * bias[None, :], spec)  # [T, K]
        shares = torch.bincount(ids.flatten(), minlength=experts).double() / ids.numel()  # [E]
        error = float((shares - target).abs().sum())
        if error < FIT_TOLERANCE:
            return bias
        if error < best:  # a better fit: keep it, and dare a longer step
            best, best_bias, step = error, bias, step * GROW
        else:  # overshot: back to the best fit, with a shorter step
            bias, step = best_bias, step * SHRINK
            _, ids = top_k_gate(logits, spec, bias) if by_bias else top_k_gate(logits + scale[:, None] * bias, spec)
            shares = torch.bincount(ids.flatten(), minlength=experts).double() / ids.numel()  # [E]
        bias = bias + step * (target.log() - shares.clamp(min=1 / ids.numel()).log())
        bias = bias - bias.mean()  # a shift common to all experts changes no choice
    return best_bias
