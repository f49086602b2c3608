"""Errors the engine raises for bad checkpoints, configs and requests.

Each message names the thing at fault (field, file, tensor, limit) and, where there is one,
what to do about it. The HTTP layer maps them to 4xx/503 responses.
"""


class ConfigError(ValueError):
    """A checkpoint or app config field that is missing, malformed or unsupported; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint file or tensor that is missing, corrupt or mis-shaped; the message names file and tensor."""


class RequestError(ValueError):
    """A request the engine cannot take as given (prompt too long, bad sampling parameter)."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 429/503 with Retry-After)."""


class EngineStoppedError(RuntimeError):
    """The engine has shut down (or is shutting down); the caller should retry on another replica (HTTP 503)."""


class RetrievalUnavailableError(RuntimeError):
    """The vector store cannot be reached or opened now (server down, timeout, folder locked); retry later (503)."""


class UnknownCollectionError(LookupError):
    """A collection that does not exist; the message names it and the ones that do (HTTP 404)."""


class EngineUnavailableError(RuntimeError):
    """No replica can take the request now: no router is up, or an expert shard stayed unreachable past its
    bound; the message names which. The caller should retry later (HTTP 503 with Retry-After)."""


class StepFailedError(RuntimeError):
    """An engine step failed: its requests (`request_ids`) are aborted and fail with `cause`; requests
    that were not in the step go on."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"an engine step with {len(request_ids)} requests failed: {cause}")
        self.request_ids, self.cause = list(request_ids), cause


class StalePlacementError(RuntimeError):
    """A shard call meant for another placement or checkpoint (a router and a shard replica of different app
    versions, during a rolling update): the shard refuses it rather than compute the rows with the wrong
    experts. The router retries it briefly (another replica of the shard may match); past
    RetryPolicy.stale_wait_s the step's requests fail with this error, and the Ingress moves them to another
    router (deployments/ingress.py), the way it moves the streams of a dead one."""


class RebalanceConflictError(RuntimeError):
    """A rebalance that cannot be done now: an update of the app is already under way, or the routers' window
    holds too little load to plan from; the message says which (HTTP 409)."""
