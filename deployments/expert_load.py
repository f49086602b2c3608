"""Expert load across router replicas: the Ingress asks every Router replica for its window and adds them up.

    >>> loads = RouterLoads(router_handle)            # in the Ingress; build_api(..., expert_load=loads)
    >>> (await loads.expert_load()).routers           # how many replicas' windows the sum holds
    2

Each router counts only the tokens it ran, so with `routers: 2` one replica's window is about half the
load; the answer must be the sum over all of them. How the replicas are reached, and why this way:

- The Ingress pulls, when GET /v1/admin/expert-load is called, with Serve's own fan-out,
  `DeploymentHandle.broadcast("expert_load")`: one call to every replica in the handle's current replica
  set (the one Serve routes requests by, kept up to date by the controller), in parallel. A replica that
  died before the call is skipped by Serve; one that dies during it comes back as an exception, which we
  skip and log. `routers` in the answer says how many windows were added up.
- Not routers pushing to a collector actor: that would put a periodic call on every router whether or not
  anyone reads the load, add an actor to keep alive, and make the answer as stale as the push period.
  Pulling costs nothing until someone asks, and each window is read as it is at that moment.
- Not listing the replica actors by name (SERVE_REPLICA::app#Router#id, as deployments/faults.py does to
  kill them) and calling into them with `__ray_call__`: that depends on Serve's actor naming and reaches
  past the deployment's interface; broadcast calls the deployment method like any other request.

One limit of broadcast: its timeout covers the whole fan-out, so a replica that is alive but does not
answer within TIMEOUT_S makes the route a 503 (there are no partial results to return). A router that
cannot answer a lock-guarded read in seconds is not serving requests either.
"""

from __future__ import annotations

import logging

from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serving.errors import EngineUnavailableError
from serving.expert_load import ExpertLoad

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0  # all router replicas together


class RouterLoads:
    """ExpertLoadSource (serving/expert_load.py): the sum of every live Router replica's expert load window."""

    def __init__(self, router: DeploymentHandle, timeout_s: float = TIMEOUT_S):
        self.router, self.timeout_s = router, timeout_s

    async def expert_load(self) -> ExpertLoad:
        """The sum over the replicas that answered; EngineUnavailableError (503) when none did."""
        try:
            answers = await self.router.broadcast("expert_load").results_async(
                timeout_s=self.timeout_s, return_exceptions=True
            )
        except DeploymentUnavailableError:
            raise EngineUnavailableError("expert load: no Router replica is up; retry later") from None
        except TimeoutError:
            raise EngineUnavailableError(
                f"expert load: the Router replicas did not all answer within {self.timeout_s:g} s; retry later"
            ) from None
        loads = [a for a in answers if isinstance(a, ExpertLoad)]
        for failure in (a for a in answers if not isinstance(a, ExpertLoad)):
            log.warning("expert load: a Router replica did not answer (%s); adding up the others", failure)
        if not loads:
            raise EngineUnavailableError(f"expert load: none of {len(answers)} Router replicas answered; retry later")
        return ExpertLoad.total(loads)
