"""POST /v1/admin/rebalance in process: the body, admin keys, the outcome's fields, and every refusal as a 4xx/503;
`moe-serve rebalance --url URL --apply` against a live server; the automatic trigger's hysteresis."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from deployments.cli import main
from serving.api.app import build_api
from serving.errors import EngineUnavailableError, RebalanceConflictError
from serving.rebalancing import BelowFor
from serving.tokenizer import Tokenizer
from tests.serving.api.fakes import FixedExpertLoad, PlanningTarget, ScriptedEngine
from tests.serving.api.live_server import live_server

ROUTE = "/v1/admin/rebalance"
ADMIN, USER = "admin-key-1", "user-key-1"


def post(app, body: object = None, key: str | None = None) -> httpx.Response:
    async def main():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(ROUTE, json=body if body is not None else {}, headers=headers)

    return asyncio.run(main())


def app_with(tokenizer_dir, target, **keys):
    tokenizer = Tokenizer(tokenizer_dir)
    engine = ScriptedEngine(tokenizer.vocab_size, 256)
    return build_api(
        engine, tokenizer, "demo", max_model_len=256, expert_load=FixedExpertLoad(), rebalancer=target, **keys
    )


def test_the_outcome_has_the_plan_beside_the_placement_served(tokenizer_dir):
    target = PlanningTarget()
    r = post(app_with(tokenizer_dir, target), {"redundant": 2})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["applied"] is True and target.calls == [(2, False)] and target.deployed == 1
    # layer 0's load (10, 3, 2, 1) on contiguous halves: 13 against 3; a plan with 2 copies evens it
    assert doc["current_balancedness_per_layer"][0] == pytest.approx(8 / 13)
    assert doc["balancedness_per_layer"][0] > doc["current_balancedness_per_layer"][0]
    assert len(doc["placement"]) == 2 and all(len(shards) == 2 for shards in doc["placement"])
    assert doc["redundant"] == 2 and doc["rows"] == 16


def test_a_dry_run_deploys_nothing_and_the_body_is_checked(tokenizer_dir):
    target = PlanningTarget()
    app = app_with(tokenizer_dir, target)
    r = post(app, {"dry_run": True})
    assert r.status_code == 200 and r.json()["applied"] is False and target.deployed == 0
    for bad, field in (({"redundant": -1}, "redundant"), ({"shards": 3}, "shards"), ({"dry_run": "maybe"}, "dry_run")):
        refused = post(app, bad)
        assert refused.status_code == 400 and field in refused.json()["error"]["message"], refused.text
    assert target.calls == [(None, True)]  # refused bodies never reach the target


def test_it_needs_an_admin_key(tokenizer_dir):
    app = app_with(tokenizer_dir, PlanningTarget(), api_keys=frozenset({USER}), admin_keys=frozenset({ADMIN}))
    assert post(app, key=USER).status_code == 403
    assert post(app).status_code == 401
    assert post(app, key=ADMIN).status_code == 200


def test_refusals_are_409_503_and_404_naming_why(tokenizer_dir):
    busy = RebalanceConflictError("app 'moe' is UPDATING, not RUNNING: an update is under way")
    r = post(app_with(tokenizer_dir, PlanningTarget(refuse=busy)))
    assert r.status_code == 409 and r.json()["error"]["code"] == "rebalance_conflict"
    assert "UPDATING" in r.json()["error"]["message"]
    down = post(app_with(tokenizer_dir, PlanningTarget(refuse=EngineUnavailableError("no Router replica is up"))))
    assert down.status_code == 503 and down.headers["Retry-After"]
    none = post(app_with(tokenizer_dir, None))
    assert none.status_code == 404 and "no expert shards" in none.json()["error"]["message"]


def test_the_cli_applies_through_the_route(tokenizer_dir, capsys):
    target = PlanningTarget()
    with live_server(app_with(tokenizer_dir, target)) as url:
        assert main(["rebalance", "--url", url, "--apply", "--redundant", "1"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("applied: rolling update started") and "layer  served  planned" in out
        assert main(["rebalance", "--url", url, "--apply", "--dry-run", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["applied"] is False
        assert main(["rebalance", "--url", url, "--apply", "--shards", "4"]) == 2
        assert "--shards cannot go with --apply" in capsys.readouterr().err
    assert target.calls == [(1, False), (None, True)]
    assert main(["rebalance", "--load", "x.json", "--apply"]) == 2
    assert "--apply needs --url" in capsys.readouterr().err


def test_below_for_needs_a_whole_run_below_the_threshold():
    below = BelowFor(0.8, duration_s=10)
    assert [below.update(t, v) for t, v in ((0, 0.5), (5, 0.6), (9, 0.7))] == [False, False, False]
    assert below.update(10, 0.7) is True
    assert below.update(11, 0.9) is False  # back above: the run starts again
    assert [below.update(t, 0.5) for t in (12, 21, 22)] == [False, False, True]
