import math

import pytest
import torch

from router.gate import GateSpec, top_k_gate


def naive_gate(logits: torch.Tensor, spec: GateSpec, bias: torch.Tensor | None = None):
    """One token at a time, sorting python floats: the reference for top_k_gate."""
    num_experts, per_group = spec.num_experts, spec.experts_per_group
    all_ids, all_weights = [], []
    for row in logits.float():
        if spec.score_func == "softmax":
            exps = [math.exp(x - max(row.tolist())) for x in row.tolist()]
            scores = [x / sum(exps) for x in exps]
        else:
            scores = [1 / (1 + math.exp(-x)) for x in row.tolist()]
        choice = [s + (0.0 if bias is None else float(bias[e])) for e, s in enumerate(scores)]
        group_score = [
            sum(sorted(choice[g * per_group : (g + 1) * per_group], reverse=True)[:2]) for g in range(spec.n_group)
        ]
        kept = sorted(range(spec.n_group), key=lambda g: (-group_score[g], g))[: spec.topk_group]
        candidates = [e for e in range(num_experts) if e // per_group in kept]
        ids = sorted(candidates, key=lambda e: (-choice[e], e))[: spec.top_k]
        weights = [scores[e] for e in ids]
        if spec.renormalize:
            weights = [w / sum(weights) for w in weights]
        all_ids.append(ids)
        all_weights.append([w * spec.scaling for w in weights])
    return torch.tensor(all_weights, dtype=torch.float32), torch.tensor(all_ids, dtype=torch.int64)


def check_against_naive(logits, spec, bias=None):
    weights, ids = top_k_gate(logits, spec, bias)
    want_weights, want_ids = naive_gate(logits, spec, bias)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_matches_naive(top_k, renormalize):
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(top_k))
    check_against_naive(logits, GateSpec(num_experts=8, top_k=top_k, renormalize=renormalize))


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2), (4, 1)])
def test_sigmoid_with_bias_groups_and_scaling_matches_naive(renormalize, n_group, topk_group):
    gen = torch.Generator().manual_seed(n_group * 10 + topk_group)
    logits = torch.randn(32, 16, generator=gen)
    bias = 0.3 * torch.randn(16, generator=gen)
    spec = GateSpec(16, 3, "sigmoid", renormalize, scaling=2.5, n_group=n_group, topk_group=topk_group)
    check_against_naive(logits, spec, bias)


def test_bias_steers_choice_but_weights_are_unbiased_scores():
    scores = torch.tensor([[0.9, 0.6, 0.5, 0.1]])
    spec = GateSpec(4, 1, "sigmoid")
    assert top_k_gate(torch.logit(scores), spec)[1].tolist() == [[0]]
    weights, ids = top_k_gate(torch.logit(scores), spec, bias=torch.tensor([0.0, 0.5, 0.0, 0.0]))
    assert ids.tolist() == [[1]]  # 0.6 + 0.5 beats 0.9
    torch.testing.assert_close(weights, torch.tensor([[0.6]]))  # not 1.1


def test_group_limit_drops_the_best_expert_overall():
    # Group 0 holds the best single expert (0.95) but its top-2 sum (0.95) loses to group 1's (1.6).
    scores = torch.tensor([[0.95, 0.0001, 0.8, 0.8, 0.7, 0.01, 0.2, 0.3]])
    spec = GateSpec(8, 2, "sigmoid", renormalize=True, scaling=2.0, n_group=4, topk_group=1)
    weights, ids = top_k_gate(torch.logit(scores), spec)
    assert ids.tolist() == [[2, 3]]
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0]]))  # 0.8 / 1.6 * 2.0
    # Without the group limit the best expert is chosen.
    assert top_k_gate(torch.logit(scores), GateSpec(8, 2, "sigmoid"))[1].tolist() == [[0, 2]]


@pytest.mark.parametrize(
    "spec",
    [GateSpec(8, 3), GateSpec(8, 3, "sigmoid"), GateSpec(8, 3, "sigmoid", n_group=4, topk_group=2)],
)
def test_equal_scores_pick_lowest_ids(spec):
    weights, ids = top_k_gate(torch.zeros(5, 8), spec)
    assert ids.tolist() == [[0, 1, 2]] * 5


def test_ties_among_some_experts_pick_lower_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]])
    assert top_k_gate(logits, GateSpec(6, 2))[1].tolist() == [[1, 3]]


def test_all_experts_chosen_and_renormalized():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    weights, ids = top_k_gate(logits, GateSpec(6, 6, "sigmoid", renormalize=True, scaling=3.0))
    assert torch.equal(ids.sort(dim=-1).values, torch.arange(6).expand(4, 6))
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((4,), 3.0))


def test_low_precision_logits_are_upcast():
    logits = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    spec = GateSpec(8, 2, renormalize=True)
    weights, ids = top_k_gate(logits, spec)
    want_weights, want_ids = top_k_gate(logits.float(), spec)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, want_weights) and torch.equal(ids, want_ids)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=8, top_k=0), "top_k"),
        (dict(num_experts=8, top_k=9), "top_k"),
        (dict(num_experts=8, top_k=2, score_func="relu"), "score_func"),
        (dict(num_experts=8, top_k=2, n_group=3), "n_group"),
        (dict(num_experts=8, top_k=2, n_group=8, topk_group=4), "n_group"),
        (dict(num_experts=8, top_k=2, n_group=2, topk_group=3), "topk_group"),
        (dict(num_experts=8, top_k=3, n_group=4, topk_group=1), "top_k"),
        (dict(num_experts=8, top_k=2, scaling=0.0), "scaling"),
    ],
)
def test_bad_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GateSpec.{field}"):
        GateSpec(**kwargs)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="logits"):
        top_k_gate(torch.zeros(3, 7), GateSpec(8, 2))
    with pytest.raises(ValueError, match="bias"):
        top_k_gate(torch.zeros(3, 8), GateSpec(8, 2, "sigmoid"), bias=torch.zeros(7))


def _hf_softmax_routers():
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    size = dict(hidden_size=16, num_experts_per_tok=3)
    # Mixtral always renormalises; the others follow norm_topk_prob.
    yield MixtralTopKRouter(MixtralConfig(num_local_experts=8, **size)), True
    for norm in (False, True):
        yield Qwen2MoeTopKRouter(Qwen2MoeConfig(num_experts=8, norm_topk_prob=norm, **size)), norm
        yield Qwen3MoeTopKRouter(Qwen3MoeConfig(num_experts=8, norm_topk_prob=norm, **size)), norm
        yield OlmoeTopKRouter(OlmoeConfig(num_experts=8, norm_topk_prob=norm, **size)), norm


def test_matches_transformers_softmax_routers():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 16, generator=gen)
    for router, norm in _hf_softmax_routers():
        with torch.no_grad():
            router.weight.copy_(torch.randn(8, 16, generator=gen))
            logits, hf_weights, hf_ids = router(hidden)
        weights, ids = top_k_gate(logits, GateSpec(8, 3, "softmax", renormalize=norm))
        assert torch.equal(ids, hf_ids), type(router).__name__
        assert torch.equal(weights, hf_weights), type(router).__name__


def test_matches_transformers_deepseek_v3_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(
        hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5,
    )  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 16, generator=gen)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 16, generator=gen))
        router.e_score_correction_bias.copy_(0.5 * torch.randn(16, generator=gen))
        logits, hf_weights, hf_ids = router(hidden)
    spec = GateSpec(16, 4, "sigmoid", renormalize=True, scaling=2.5, n_group=4, topk_group=2)
    weights, ids = top_k_gate(logits, spec, bias=router.e_score_correction_bias)
    # transformers uses topk(sorted=False) here: compare each row as a set, ordered by expert id.
    hf_ids, hf_order = hf_ids.sort(dim=-1)
    ids, order = ids.sort(dim=-1)
    assert torch.equal(ids, hf_ids)
    # The renormalising sum adds the same four numbers in another order: allow float32 rounding.
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order), rtol=1e-6, atol=0)
