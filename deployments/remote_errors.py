"""What a call into another replica raised, read the same way by every caller (Ingress, Rebalancer).

- `unwrapped(kinds)`: a replica's own exception of one of `kinds` comes out as itself, not wrapped in Ray's
  RayTaskError, so the API maps it to its 4xx/503; any other failure stays as it is.
- `replica_died(error)`: the replica that was serving the call is gone (killed, crashed, its node lost). A
  replica's own exception *caused by* a dead replica further down (a router whose shard died) arrives as
  RayTaskError(ActorDiedError) and is not this.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError


@contextmanager
def unwrapped(kinds: tuple[type[Exception], ...]) -> Iterator[None]:
    try:
        yield
    except RayTaskError as e:
        if isinstance(e.cause, kinds):
            raise e.cause from None
        raise


def replica_died(error: BaseException) -> bool:
    return isinstance(error, ActorDiedError | ActorUnavailableError) and not isinstance(error, RayTaskError)
