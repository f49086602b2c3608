import pytest
import torch

from router.dispatch import flatten, split_by_shard
from router.placement import LayeredPlacement, Placement, PlacementError, build_placement, shard_weight_bytes


def test_contiguous_uneven_gives_first_shards_one_more():
    p = Placement.contiguous(8, 3)
    assert p.shards == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert p.num_shards == 3 and p.num_experts == 8


def test_contiguous_one_shard_and_one_expert_per_shard():
    assert Placement.contiguous(8, 1).shards == (tuple(range(8)),)
    assert Placement.contiguous(8, 8).shards == tuple((e,) for e in range(8))


def test_round_robin():
    assert Placement.round_robin(8, 3).shards == ((0, 3, 6), (1, 4, 7), (2, 5))
    assert Placement.round_robin(8, 1).shards == (tuple(range(8)),)
    assert Placement.round_robin(8, 8).shards == tuple((e,) for e in range(8))


@pytest.mark.parametrize("make", [Placement.contiguous, Placement.round_robin])
@pytest.mark.parametrize("num_shards", [0, 9])
def test_num_shards_outside_1_to_num_experts_names_both(make, num_shards):
    with pytest.raises(PlacementError, match=f"num_shards={num_shards} must be in 1..num_experts=8"):
        make(8, num_shards)


def test_explicit_sorts_ids_and_equals_the_same_layout():
    p = Placement.explicit(8, [[2, 0, 1], [5, 4, 3], [7, 6]])
    assert p.shards == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert p == Placement.contiguous(8, 3)


def test_expert_on_no_shard_is_named():
    with pytest.raises(PlacementError, match=r"experts \[5, 7\] are on no shard"):
        Placement.explicit(8, [[0, 1, 2], [3, 4, 6]])


@pytest.mark.parametrize("bad", [8, -1])
def test_out_of_range_id_names_id_and_shard(bad):
    with pytest.raises(PlacementError, match=f"shard 1 holds expert {bad}, outside 0..7"):
        Placement.explicit(8, [list(range(8)), [3, bad]])


def test_empty_shard_is_named():
    with pytest.raises(PlacementError, match="shard 2 holds no experts"):
        Placement.explicit(4, [[0, 1], [2, 3], []])


def test_duplicate_within_a_shard_is_named():
    with pytest.raises(PlacementError, match=r"shard 0 lists experts \[1\] more than once"):
        Placement.explicit(4, [[0, 1, 1], [2, 3]])


def test_replicas_are_accepted_and_mapped():
    # Hot expert 0 on shards 0 and 2; expert 3 on shards 1 and 2.
    p = Placement.explicit(4, [[0, 1], [2, 3], [0, 3]])
    assert p.holders(0) == (0, 2) and p.holders(3) == (1, 2) and p.holders(1) == (0,)
    assert p.expert_to_shard().tolist() == [0, 0, 1, 1]  # default: lowest shard holding it
    assert p.expert_to_shard([1, 0, 0, 1]).tolist() == [2, 0, 1, 2]
    with pytest.raises(PlacementError, match=r"replica_choice\[1\]=1, but expert 1 is on 1 shard"):
        p.expert_to_shard([0, 1, 0, 0])
    with pytest.raises(PlacementError, match="replica_choice must have num_experts=4 entries, got 3"):
        p.expert_to_shard([0, 0, 0])


PLACEMENTS = {
    "contiguous-8-on-3": Placement.contiguous(8, 3),
    "round_robin-8-on-3": Placement.round_robin(8, 3),
    "contiguous-8-on-1": Placement.contiguous(8, 1),
    "round_robin-8-on-8": Placement.round_robin(8, 8),
    "replicas-of-0-and-7": Placement.explicit(8, [[0, 1, 2, 7], [3, 4, 5], [6, 7, 0]]),
}


@pytest.mark.parametrize("p", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_expert_to_shard_agrees_with_experts_of(p):
    e2s = p.expert_to_shard()
    assert e2s.dtype == torch.int64 and e2s.shape == (p.num_experts,)
    for e, shard in enumerate(e2s.tolist()):
        assert e in p.experts_of(shard)
        assert shard == min(s for s in range(p.num_shards) if e in p.experts_of(s))


@pytest.mark.parametrize("p", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_split_by_shard_sends_rows_to_the_shard_holding_their_expert(p):
    gen = torch.Generator().manual_seed(0)
    tokens, top_k = 16, 2
    ids = torch.stack([torch.randperm(p.num_experts, generator=gen)[:top_k] for _ in range(tokens)])  # [T, K]
    a = flatten(torch.rand(tokens, top_k, generator=gen), ids)
    seen = []
    for shard, b in enumerate(split_by_shard(a, p.expert_to_shard(), p.num_shards)):
        if b is None:
            continue
        assert set(b.experts.tolist()) <= set(p.experts_of(shard))
        seen += list(zip(b.rows[b.local_rows].tolist(), b.experts.tolist(), strict=True))
    assert sorted(seen) == sorted(zip(a.rows.tolist(), a.experts.tolist(), strict=True))


def test_experts_of_unknown_shard_is_an_error():
    with pytest.raises(PlacementError, match="shard 3 does not exist"):
        Placement.contiguous(8, 3).experts_of(3)


def test_describe_one_line_per_shard():
    assert Placement.contiguous(8, 3).describe() == (
        "shard 0: experts 0-2 (3)\nshard 1: experts 3-5 (3)\nshard 2: experts 6-7 (2)"
    )
    assert Placement.explicit(9, [[0, 1, 2, 5, 7, 8], [3, 4, 6]]).describe().splitlines()[0] == (
        "shard 0: experts 0-2, 5, 7-8 (6)"
    )


def test_build_placement_strategies():
    assert build_placement("contiguous", 8, 3) == Placement.contiguous(8, 3)
    assert build_placement("round_robin", 8, 3) == Placement.round_robin(8, 3)
    assert build_placement("explicit", 4, 2, explicit=[[0, 1], [2, 3]]) == Placement.contiguous(4, 2)


def test_build_placement_explicit_lists_iff_explicit_strategy():
    with pytest.raises(PlacementError, match="required with strategy 'explicit'"):
        build_placement("explicit", 4, 2)
    with pytest.raises(PlacementError, match="strategy 'contiguous' with explicit=given"):
        build_placement("contiguous", 4, 2, explicit=[[0, 1], [2, 3]])


def test_build_placement_explicit_length_must_match_num_shards():
    with pytest.raises(PlacementError, match="explicit has 2 shard lists, but num_shards=3"):
        build_placement("explicit", 4, 3, explicit=[[0, 1], [2, 3]])


def test_build_placement_unknown_strategy_is_named():
    with pytest.raises(PlacementError, match="unknown strategy 'by_load'"):
        build_placement("by_load", 4, 2)  # type: ignore[arg-type]


def test_shard_weight_bytes():
    # Mixtral-like: 2 MoE layers, hidden 64, moe_intermediate 32, bf16 (2 bytes); 8 experts on 3 shards.
    # Per expert: layers x (gate, up, down) x H x I x bytes = 2 * 3 * 64 * 32 * 2 = 24576.
    assert shard_weight_bytes(Placement.contiguous(8, 3), 2, 64, 32, 2) == [73728, 73728, 49152]  # 3, 3, 2 experts
    # A replica counts on every shard that holds it: 1 * 3 * 4 * 2 * 4 = 96 bytes per expert.
    assert shard_weight_bytes(Placement.explicit(2, [[0, 1], [0]]), 1, 4, 2, 4) == [192, 96]
    with pytest.raises(PlacementError, match="hidden must be >= 1, got 0"):
        shard_weight_bytes(Placement.contiguous(2, 1), 1, 0, 2, 4)


def test_holder_table_lists_every_experts_holders():
    p = Placement.explicit(4, [[0, 1], [2, 3], [0, 3]])
    assert p.holder_table() == ((0, 2), (0,), (1,), (1, 2)) == tuple(p.holders(e) for e in range(4))


def test_layered_placement_round_trips_the_json_format():
    layers = [[[0, 1], [1, 2, 3]], [[2, 3], [0, 1, 3]]]
    p = LayeredPlacement.from_json(layers, num_experts=4)
    assert p.num_layers == 2 and p.num_shards == 2 and p.num_experts == 4
    assert p.to_json() == layers and LayeredPlacement.from_json(p.to_json(), 4) == p
    assert p.layers[1].holders(3) == (0, 1)  # replicated in layer 1 only
    assert p.experts_of(0) == ((0, 1), (2, 3))  # what shard 0 loads, per layer
    assert p.describe().splitlines()[:3] == ["layer 0:", "  shard 0: experts 0-1 (2)", "  shard 1: experts 1-3 (3)"]


def test_uniform_layered_placement_repeats_one_layer():
    p = LayeredPlacement.uniform(Placement.contiguous(8, 3), 4)
    assert p.num_layers == 4 and set(p.layers) == {Placement.contiguous(8, 3)}
    with pytest.raises(PlacementError, match="num_layers must be >= 1, got 0"):
        LayeredPlacement.uniform(Placement.contiguous(8, 3), 0)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([], "non-empty list with one entry per MoE layer"),
        ([[[0, 1], [2, 3]], [[0, 1, 2, 3]]], "layer 1 has 1 shards and 4 experts, layer 0 has 2 and 4"),
        ([[[0, 1], "23"]], "layer 0 must be a list of shards"),
        ([[[0, 1], [2, 3.5]]], "layer 0, shard 1: expert ids must be integers"),
        ([[[0, 1], [2, 3]], [[0, 1], [2]]], r"layer 1: Placement: experts \[3\] are on no shard"),
        ([[[0, 1, 1], [2, 3]]], r"layer 0: Placement: shard 0 lists experts \[1\] more than once"),
    ],
)
def test_layered_placement_errors_name_the_layer(layers, message):
    with pytest.raises(PlacementError, match=message):
        LayeredPlacement.from_json(layers, num_experts=4)
