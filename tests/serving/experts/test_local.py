import pytest
import torch
import torch.nn.functional as F

from router.dispatch import combine, flatten, split_by_shard
from serving.experts.backend import ExpertBackend
from serving.experts.local import LocalExpertBackend, StackedExperts

E, D, I, T, K = 8, 6, 5, 12, 2


def random_experts(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, D, generator=gen).to(dtype)
    down = torch.randn(E, D, I, generator=gen).to(dtype)
    return gate_up, down


def random_routing(tokens=T, seed=0, experts=range(E)):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(list(experts))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:K]] for _ in range(tokens)])
    return torch.rand(tokens, K, generator=gen), ids


def naive_moe(hidden, weights, ids, gate_up, down):
    """Token by token: out[t] = sum_k w * down_e @ (silu(gate_e @ x) * (up_e @ x))."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = gate_up[e, :I] @ hidden[t], gate_up[e, I:] @ hidden[t]
            out[t] += float(weights[t, k]) * (down[e] @ (F.silu(gate) * up))
    return out


def test_local_backend_matches_naive_loop():
    gate_up, down = random_experts()
    hidden = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights, ids = random_routing()
    backend: ExpertBackend = LocalExpertBackend({0: StackedExperts(gate_up, down, range(E))})
    out = backend(0, hidden, weights, ids)
    assert out.shape == (T, D) and out.dtype == hidden.dtype
    torch.testing.assert_close(out, naive_moe(hidden, weights, ids, gate_up, down))


def test_one_matmul_pair_per_used_expert_and_unused_experts_cost_nothing(monkeypatch):
    gate_up, down = random_experts()
    unused = [1, 6]
    gate_up[unused] = float("nan")  # any use of an unused expert would poison the output
    hidden = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights, ids = random_routing(experts=[0, 2, 3, 4, 5, 7])
    calls = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: calls.append(x.shape[0]) or real_linear(x, w, b))
    out = LocalExpertBackend({0: StackedExperts(gate_up, down, range(E))})(0, hidden, weights, ids)
    used = ids.unique()
    assert len(calls) == 2 * len(used)  # gate_up and down once per expert, not once per token
    assert sum(calls) == 2 * T * K
    assert not out.isnan().any()
    torch.testing.assert_close(out, naive_moe(hidden, weights, ids, gate_up, down))


def test_forward_with_local_rows_and_no_assignments():
    gate_up, down = random_experts()
    experts = StackedExperts(gate_up, down, range(E))
    hidden = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = experts.forward(hidden, torch.tensor([2, 0, 2]), torch.tensor([5, 5, 1]), torch.tensor([0.5, 1.0, 2.0]))
    want = naive_moe(hidden, torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.5, 2.0]]),
                     torch.tensor([[0, 5], [0, 0], [5, 1]]), gate_up, down)  # fmt: skip
    torch.testing.assert_close(out, want)
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(experts.forward(hidden, empty, empty, torch.zeros(0)), torch.zeros_like(hidden))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sharded_backends_combine_to_the_local_result(dtype):
    gate_up, down = random_experts(dtype)
    hidden = torch.randn(T, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    weights, ids = random_routing(seed=4)
    want = LocalExpertBackend({0: StackedExperts(gate_up, down, range(E))})(0, hidden, weights, ids)
    held = [range(0, 3), range(3, 6), range(6, 8)]
    shards = [StackedExperts(gate_up[h.start : h.stop], down[h.start : h.stop], h) for h in held]
    expert_to_shard = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    out = torch.zeros_like(hidden)
    for shard, b in zip(shards, split_by_shard(flatten(weights, ids), expert_to_shard, 3), strict=True):
        assert b is not None
        combine(out, b.rows, shard.forward(hidden[b.rows], b.local_rows, b.experts, b.weights))
    # Contiguous shards combined in shard order add each token's terms in the same order as the
    # in-process loop (ascending expert id), so the results are identical, not just close.
    assert torch.equal(out, want)


def test_sub_range_rejects_ids_it_does_not_hold():
    gate_up, down = random_experts()
    backend = LocalExpertBackend({0: StackedExperts(gate_up[4:], down[4:], range(4, 8))})
    hidden = torch.randn(2, D, dtype=torch.float64)
    out = backend(0, hidden, torch.ones(2, 1), torch.tensor([[4], [7]]))  # held ids work
    torch.testing.assert_close(out, naive_moe(hidden, torch.ones(2, 1), torch.tensor([[4], [7]]), gate_up, down))
    with pytest.raises(ValueError, match=r"expert id 2 .*4\.\.7"):
        backend(0, hidden, torch.ones(2, 1), torch.tensor([[4], [2]]))
    with pytest.raises(ValueError, match="expert id 9"):
        backend(0, hidden, torch.ones(2, 1), torch.tensor([[9], [4]]))
    with pytest.raises(ValueError, match="layer 1"):
        backend(1, hidden, torch.ones(2, 1), torch.tensor([[4], [5]]))


def test_non_contiguous_ids_map_to_their_stack_rows():
    gate_up, down = random_experts()
    held = [1, 4, 6]
    experts = StackedExperts(gate_up[held], down[held], torch.tensor(held))
    assert experts.to_local(torch.tensor([6, 1, 4, 6])).tolist() == [2, 0, 1, 2]
    assert experts.to_local(torch.tensor([5, 0, 7, 99, -1])).tolist() == [3] * 5  # not held: the overflow slot
    hidden, rows = torch.randn(2, D), torch.tensor([0, 1])
    for bad in (5, 99, -1):
        with pytest.raises(ValueError, match=rf"expert id {bad} .*\[1, 4, 6\]"):
            experts.forward(hidden, rows, torch.tensor([4, bad]), torch.ones(2))


def test_bad_stacks_are_errors():
    gate_up, down = random_experts()
    with pytest.raises(ValueError, match="expert_ids"):
        StackedExperts(gate_up[:2], down[:2], [3, 1])
    with pytest.raises(ValueError, match="gate_up"):
        StackedExperts(gate_up, down, range(4))
    with pytest.raises(ValueError, match="disagree"):
        StackedExperts(gate_up, down[:, :, :-1], range(E))


def test_nbytes():
    gate_up, down = random_experts(dtype=torch.bfloat16)
    assert StackedExperts(gate_up, down, range(E)).nbytes == 2 * (E * 2 * I * D + E * D * I)


def test_packed_experts_give_the_same_bits_and_keep_no_stacks():
    gate_up, down = random_experts(dtype=torch.bfloat16)
    held = [1, 4, 6, 7]
    plain = StackedExperts(gate_up[held], down[held], held)
    packed = StackedExperts(gate_up[held], down[held], held, prepack=True)
    assert (packed.nbytes, packed.dtype, packed.expert_ids.tolist()) == (plain.nbytes, torch.bfloat16, held)
    gen = torch.Generator().manual_seed(6)
    for rows in (1, 3, 40):
        hidden = torch.randn(rows, D, generator=gen).to(torch.bfloat16)
        local_rows = torch.arange(rows).repeat(2)  # [A] every row twice, as a shard's rows come
        experts = torch.tensor(held)[torch.randint(0, len(held), (2 * rows,), generator=gen)]
        weights = torch.rand(2 * rows, generator=gen)
        assert torch.equal(packed.forward(hidden, local_rows, experts, weights),
                           plain.forward(hidden, local_rows, experts, weights)), rows  # fmt: skip
    with pytest.raises(AttributeError, match="packed"):
        packed.gate_up  # noqa: B018
    with pytest.raises(ValueError, match="bfloat16"):
        StackedExperts(gate_up.float(), down.float(), range(E), prepack=True)


@pytest.mark.parametrize("dtype, prepack", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_matches_transformers_eager_experts_bitwise(dtype, prepack):
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts, Qwen2MoeTopKRouter

    from router.gate import GateSpec, top_k_gate

    size = dict(hidden_size=16, num_experts_per_tok=2)
    mixtral = MixtralConfig(num_local_experts=E, intermediate_size=I, **size)
    qwen = Qwen2MoeConfig(num_experts=E, moe_intermediate_size=I, norm_topk_prob=False, **size)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(T, 16, generator=gen).to(dtype)
    for config, experts_cls, router_cls in [(mixtral, MixtralExperts, MixtralTopKRouter),
                                            (qwen, Qwen2MoeExperts, Qwen2MoeTopKRouter)]:  # fmt: skip
        config._experts_implementation = "eager"  # the default, grouped_mm, rounds differently in bf16
        hf_experts, router = experts_cls(config).to(dtype), router_cls(config).to(dtype)
        with torch.no_grad():
            for p in [*hf_experts.parameters(), *router.parameters()]:
                p.copy_(torch.randn(p.shape, generator=gen))
            logits, hf_weights, hf_ids = router(hidden)
            want = hf_experts(hidden, hf_ids, hf_weights)
        weights, ids = top_k_gate(logits, GateSpec(E, 2, renormalize=config is mixtral))
        if config is qwen:
            weights = weights.to(logits.dtype)  # Qwen/OLMoE round the weights to the logits dtype
        stacked = StackedExperts(hf_experts.gate_up_proj.detach(), hf_experts.down_proj.detach(), range(E), prepack)
        backend = LocalExpertBackend({0: stacked})
        with torch.no_grad():
            out = backend(0, hidden, weights, ids)
        assert torch.equal(out, want), type(hf_experts).__name__
