"""ExpertLoad: the sum over routers, the load file's JSON, the summary, and fetching it from a server."""

from __future__ import annotations

import pytest

from deployments.local_cluster import free_port
from serving.expert_load import ExpertLoad, ExpertLoadFetchError, fetch_expert_load


def load(rows, routers: int = 1, layers=(1, 2), window_s: float = 60.0) -> ExpertLoad:
    return ExpertLoad(tuple(layers), len(rows[0]), window_s, tuple(map(tuple, rows)), routers)


def test_total_adds_rows_and_routers():
    total = ExpertLoad.total([load([[1, 2], [3, 4]]), load([[10, 0], [0, 10]], routers=2)])
    assert total.load == ((11, 2), (3, 14)) and total.routers == 3 and total.layers == (1, 2)


def test_total_refuses_loads_of_different_models_or_windows():
    with pytest.raises(ValueError, match="disagree"):
        ExpertLoad.total([load([[1, 2], [3, 4]]), load([[1, 2], [3, 4]], window_s=30.0)])
    with pytest.raises(ValueError, match="no loads"):
        ExpertLoad.total([])


def test_the_shape_is_checked():
    with pytest.raises(ValueError, match=r"\[2 MoE layers\]\[3 experts\]"):
        ExpertLoad((0, 1), 3, 60.0, ((1, 2, 3), (1, 2)))


def test_imbalance_and_summary():
    skewed = load([[6, 1, 1, 0], [0, 0, 0, 0]], routers=2)
    assert skewed.imbalance() == [3.0, None]  # 6 rows vs a mean of 2; no tokens at all
    text = skewed.summary()
    assert "2 router(s)" in text and "max/mean  3.00 (expert 0)" in text and "no tokens" in text


def test_json_round_trip_and_errors():
    original = load([[1, 2], [3, 4]], routers=2)
    doc = original.to_json()
    assert list(doc) == ["load", "layers", "num_experts", "window_s", "routers"]
    assert doc["load"] == [[1, 2], [3, 4]] and ExpertLoad.from_json(doc) == original
    with pytest.raises(ValueError, match="missing field.*num_experts"):
        ExpertLoad.from_json({"load": [[1]], "layers": [0], "window_s": 60})
    with pytest.raises(ValueError, match="malformed"):
        ExpertLoad.from_json({**doc, "load": [["x", 2], [3, 4]]})
    with pytest.raises(ValueError, match="JSON object"):
        ExpertLoad.from_json([1, 2])


def test_fetch_names_the_url_when_nothing_answers():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ExpertLoadFetchError, match=f"GET {url}/v1/admin/expert-load: ConnectError"):
        fetch_expert_load(url, api_key=None, timeout_s=5)
