"""The rebalance report: load files read with errors that say where, the report's JSON and text."""

from __future__ import annotations

import json

import pytest
import torch

from router.placement import LayeredPlacement
from router.rebalance import LoadFileError, parse_load, read_load, rebalance

LOAD = {"load": [[90, 10, 10, 10, 5, 5, 5, 5], [1, 1, 1, 1, 1, 1, 1, 50]]}


def test_integer_counts_stay_integers_and_others_become_floats():
    assert read_load(json.dumps(LOAD), "load.json").dtype == torch.int64
    load = parse_load({"load": [[1.5, 2], [0, 3]]}, "x")
    assert load.dtype == torch.float64 and load.tolist() == [[1.5, 2.0], [0.0, 3.0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"load.json: not JSON \(Expecting property name enclosed in double quotes at line 1, column 2\)"),
        ("[1, 2]", r'load.json: expected an object \{"load"'),
        ('{"load": [[1]], "layer": 3}', r"unknown field\(s\) \['layer'\]"),  # a typo; the server's 'layers' is read
        ('{"load": []}', "'load' must be a non-empty list"),
        ('{"load": [[1, 2], 3]}', r"load\[1\] must be a non-empty list of counts"),
        ('{"load": [[1, 2], [3]]}', r"load\[1\] has 1 experts, load\[0\] has 2"),
        ('{"load": [[1, -2]]}', r"load\[0\]\[1\] = -2; counts must be finite numbers >= 0"),
        ('{"load": [[1, "2"]]}', r"load\[0\]\[1\] = '2'"),
        ('{"load": [[1, true]]}', r"load\[0\]\[1\] = True"),
        ('{"load": [[1, NaN]]}', r"load\[0\]\[1\] = nan"),
    ],
)
def test_bad_load_files_name_the_file_and_the_place(text, message):
    with pytest.raises(LoadFileError, match=message):
        read_load(text, "load.json")


def test_the_json_report_has_the_documented_fields():
    report = rebalance(read_load(json.dumps(LOAD), "x"), num_shards=3, redundant=4)
    out = report.to_json()
    assert set(out) == {"balancedness", "contiguous_balancedness", "balancedness_per_layer",
                        "contiguous_balancedness_per_layer", "placement"}  # fmt: skip
    assert out["balancedness"] == pytest.approx(sum(out["balancedness_per_layer"]) / 2)
    assert out["balancedness"] > out["contiguous_balancedness"]
    placement = LayeredPlacement.from_json(out["placement"], num_experts=8)
    assert placement == report.placement and placement.num_shards == 3
    assert all(len(ids) == 4 for layer in out["placement"] for ids in layer)  # (8 + 4) / 3 slots a shard
    assert out["balancedness_per_layer"][0] == pytest.approx(140 / 3 / 47)  # 140 rows on 3 shards: 47 at best


def test_the_text_report_shows_both_placements_per_layer():
    text = rebalance(read_load(json.dumps(LOAD), "x"), num_shards=3, redundant=4).describe()
    lines = text.splitlines()
    assert lines[0] == "2 MoE layers, 8 experts, 3 shards, 4 redundant slots a layer (4 slots a shard)"
    assert "mean over layers: planned 0.996, contiguous 0.398" in lines[1]
    assert lines[4].startswith("0      0.993    0.424       0 x3")  # layer 0: expert 0 on every shard
    assert "layer 1:" in lines and any(line.startswith("  shard 2: experts") for line in lines)


def test_more_shards_than_experts_has_no_contiguous_figure():
    report = rebalance(torch.tensor([[8, 1, 1]]), num_shards=4, redundant=2)
    assert report.contiguous is None and report.to_json()["contiguous_balancedness"] is None
    assert "contiguous n/a" in report.describe()
