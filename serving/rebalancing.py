"""Online rebalancing, the API side: POST /v1/admin/rebalance plans a placement from the routers' expert load
and deploys it as a rolling update (deployments/rebalancer.py does both on Ray Serve).

Torch-free, like serving/expert_load.py: the Ingress and the CLI import it, never the model stack.

    >>> outcome = await target.rebalance(redundant=None, dry_run=False)    # any RebalanceTarget
    >>> outcome["current_balancedness"], outcome["balancedness"], outcome["applied"]
    (0.58, 0.97, True)
    >>> post_rebalance("http://127.0.0.1:8000", api_key=None)             # what `moe-serve rebalance --apply` sends

The outcome is router/rebalance.py's report (`balancedness`, `current_balancedness`, their per-layer lists,
`contiguous_*`, `placement`) plus `applied` (whether a rolling update to the plan was started), `reason` (one
line saying why or why not), `redundant` (the slots the plan used) and `rows` (the rows per MoE layer the
window held). docs/placement.md, "Online", describes the route and when the server rebalances by itself.
"""

from __future__ import annotations

from typing import Any, Protocol

import httpx

from serving.http_client import error_message

ROUTE = "/v1/admin/rebalance"
POST_TIMEOUT_S = 60.0  # planning at DeepSeek-V3 scale takes seconds on a router


class RebalanceTarget(Protocol):
    """What the admin route asks: plan from the current load and, unless `dry_run`, deploy the plan.

    Raises RequestError (400) for a `redundant` that cannot be placed, RebalanceConflictError (409) when it
    cannot be done now (an update under way, too little load in the window), EngineUnavailableError (503) when
    no router answers."""

    async def rebalance(self, redundant: int | None, dry_run: bool) -> dict[str, Any]: ...


class BelowFor:
    """Whether a value has stayed below `threshold` for at least `duration_s` (the automatic trigger's
    hysteresis: one thin or noisy window must not redeploy the app).

    >>> below = BelowFor(0.8, duration_s=60)
    >>> below.update(now=0, value=0.5), below.update(now=30, value=0.6), below.update(now=61, value=0.7)
    (False, False, True)
    """

    def __init__(self, threshold: float, duration_s: float):
        self.threshold, self.duration_s = threshold, duration_s
        self.since: float | None = None  # when the current run of values below threshold began

    def update(self, now: float, value: float) -> bool:
        if value >= self.threshold:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= self.duration_s

    def reset(self) -> None:
        self.since = None


class RebalanceRequestError(RuntimeError):
    """POST /v1/admin/rebalance failed; the message has the URL, the status and the server's error message."""


def post_rebalance(
    url: str,
    api_key: str | None,
    redundant: int | None = None,
    dry_run: bool = False,
    timeout_s: float = POST_TIMEOUT_S,
) -> dict[str, Any]:
    """Ask a running server to rebalance (an admin key when it has keys); its outcome (module docstring)."""
    where = f"POST {url.rstrip('/')}{ROUTE}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"redundant": redundant, "dry_run": dry_run}
    try:
        response = httpx.post(f"{url.rstrip('/')}{ROUTE}", json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise RebalanceRequestError(f"{where}: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise RebalanceRequestError(f"{where}: HTTP {response.status_code}: {error_message(response)}")
    return response.json()
