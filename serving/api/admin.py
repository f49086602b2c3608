"""Admin routes: GET /v1/admin/expert-load, the routers' expert load over their sliding window, and
POST /v1/admin/rebalance, a placement planned from it and deployed online (serving/rebalancing.py).

    >>> app = build_api(engine, tokenizer, "demo", max_model_len=2048, expert_load=engine)   # AsyncEngine
    >>> httpx.get(f"{url}/v1/admin/expert-load", headers={"Authorization": "Bearer <admin key>"}).json()
    {"load": [[412, 97, ...], [...]], "layers": [0, 1], "num_experts": 8, "window_s": 60.0, "routers": 2}

With keys configured the route needs an admin key (an API key gets 403; serving/api/errors.py ADMIN_ROUTES).
Without a load source (engine: vllm, which does not expose its routing) it answers 404
`expert_load_unavailable`: the route exists on every server, so clients and the OpenAPI document do not
depend on the engine, and 404 is what /v1/retrieve answers when retrieval is off. With no router
answering it is a 503 with Retry-After. The body's format is the load file's (serving/expert_load.py).
POST /v1/admin/rebalance answers the same 404 without expert shards (engine: vllm, or shards: 0), and 409
when it cannot rebalance now (an update under way, too little load in the window).
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field

from serving.api.errors import APIError
from serving.api.openapi import errors
from serving.expert_load import ROUTE, ExpertLoad, ExpertLoadSource
from serving.rebalancing import ROUTE as REBALANCE_ROUTE
from serving.rebalancing import RebalanceTarget

UNAVAILABLE = (
    f"GET {ROUTE}: this server's engine does not measure expert load (only the native engine's routers do; "
    "engine: vllm does not expose its routing)"
)

NO_SHARDS = (
    f"POST {REBALANCE_ROUTE}: this server has no expert shards to rebalance (engine: vllm, or shards: 0 with the "
    "experts in the router)"
)


class ExpertLoadResponse(BaseModel):
    """Token rows per (MoE layer, expert) over the routers' window, summed over every router that answered."""

    load: list[list[int]] = Field(
        description="One list per MoE layer, in model order (dense layers skipped): the token rows the gate sent "
        "to each expert (index = expert id). Each layer's rows add up to top_k x the tokens routed."
    )
    layers: list[int] = Field(description="The model layer index of each MoE layer (`load[i]` is layer `layers[i]`).")
    num_experts: int = Field(description="Routed experts per MoE layer (the length of each `load` list).")
    window_s: float = Field(description="The window, in seconds (engine_config.expert_load_window_s).")
    routers: int = Field(description="Router replicas whose windows are summed here (those that answered).")

    @classmethod
    def of(cls, load: ExpertLoad) -> ExpertLoadResponse:
        return cls.model_validate(load.to_json())


class RebalanceRequest(BaseModel):
    """What to plan with, and whether to deploy the plan."""

    model_config = ConfigDict(extra="forbid", strict=True)  # as every body: no 0 for false (serving/api/fields.py)

    redundant: int | None = Field(
        None,
        ge=0,
        description="Redundant expert slots per MoE layer for the plan; null: the server's rebalance.redundant.",
    )
    dry_run: bool = Field(False, description="Plan and report, but deploy nothing.")


class RebalanceResponse(BaseModel):
    """The plan beside the placement served, under the routers' current load, and what was done with it."""

    applied: bool = Field(description="Whether a rolling update to the planned placement was started.")
    reason: str = Field(description="Why it was or was not applied.")
    redundant: int = Field(description="Redundant slots per MoE layer the plan used.")
    rows: int = Field(description="Token rows per MoE layer in the window the plan was made from.")
    balancedness: float = Field(description="The plan's balancedness (mean shard load / max), mean over MoE layers.")
    current_balancedness: float = Field(description="The same for the placement the server runs now.")
    balancedness_per_layer: list[float]
    current_balancedness_per_layer: list[float]
    contiguous_balancedness: float | None = Field(
        description="The contiguous placement's; null with more shards than experts."
    )
    contiguous_balancedness_per_layer: list[float] | None
    placement: list[list[list[int]]] = Field(
        description="The plan: [[[expert ids on shard 0], ..., [ids on shard N-1]] for each MoE layer] "
        "(docs/placement.md)."
    )


def install_admin_routes(
    app: FastAPI, expert_load: ExpertLoadSource | None, rebalancer: RebalanceTarget | None = None
) -> None:
    """Add GET /v1/admin/expert-load and POST /v1/admin/rebalance to `app` (each a 404 naming why when its
    source is None)."""
    describe = {
        404: "This server's engine does not measure expert load (engine: vllm); code expert_load_unavailable.",
        503: "No router replica answered (none is up, or they did not answer in time); retry after Retry-After.",
    }

    @app.get(ROUTE, response_model=ExpertLoadResponse, responses=errors(404, 503, describe=describe))
    async def get_expert_load() -> Response:
        """Token rows the gate sent to each expert of each MoE layer over the routers' sliding window, summed
        over every router replica that answered. Needs an admin key when the server has keys."""
        if expert_load is None:
            raise APIError(404, UNAVAILABLE, code="expert_load_unavailable")
        body = ExpertLoadResponse.of(await expert_load.expert_load())
        return Response(body.model_dump_json(), media_type="application/json")

    rebalance_errors = {
        400: "A bad field, or more redundant slots than the shards can hold (each holds an expert once).",
        404: "This server has no expert shards (engine: vllm, or shards: 0); code expert_load_unavailable.",
        409: "An update of the app is under way, or the window holds too little load; code rebalance_conflict.",
        503: "No router replica answered; retry after Retry-After.",
    }

    @app.post(
        REBALANCE_ROUTE,
        response_model=RebalanceResponse,
        responses=errors(400, 404, 409, 503, describe=rebalance_errors),
    )
    async def post_rebalance(request: RebalanceRequest | None = None) -> Response:
        """Plan a placement from the routers' expert load (their sliding window, summed) and, unless dry_run,
        deploy it as a rolling update: new shard and router replicas with the plan start first, the old ones
        drain, no request is lost. Applied only when the plan is better than the placement served. Needs an
        admin key when the server has keys."""
        if rebalancer is None:
            raise APIError(404, NO_SHARDS, code="expert_load_unavailable")
        request = request or RebalanceRequest()  # no body: the defaults
        outcome = await rebalancer.rebalance(request.redundant, request.dry_run)
        return Response(RebalanceResponse.model_validate(outcome).model_dump_json(), media_type="application/json")
