"""Admin routes: GET /v1/admin/expert-load, the routers' expert load over their sliding window.

    >>> app = build_api(engine, tokenizer, "demo", max_model_len=2048, expert_load=engine)   # AsyncEngine
    >>> httpx.get(f"{url}/v1/admin/expert-load", headers={"Authorization": "Bearer <admin key>"}).json()
    {"load": [[412, 97, ...], [...]], "layers": [0, 1], "num_experts": 8, "window_s": 60.0, "routers": 2}

With keys configured the route needs an admin key (an API key gets 403; serving/api/errors.py ADMIN_ROUTES).
Without a load source (engine: vllm, which does not expose its routing) it answers 404
`expert_load_unavailable`: the route exists on every server, so clients and the OpenAPI document do not
depend on the engine, and 404 is what /v1/retrieve answers when retrieval is off. With no router
answering it is a 503 with Retry-After. The body's format is the load file's (serving/expert_load.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from pydantic import BaseModel, Field

from serving.api.errors import APIError
from serving.api.openapi import errors
from serving.expert_load import ROUTE, ExpertLoad, ExpertLoadSource

UNAVAILABLE = (
    f"GET {ROUTE}: this server's engine does not measure expert load (only the native engine's routers do; "
    "engine: vllm does not expose its routing)"
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


def install_admin_routes(app: FastAPI, expert_load: ExpertLoadSource | None) -> None:
    """Add GET /v1/admin/expert-load to `app` (a 404 naming why when `expert_load` is None)."""
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
