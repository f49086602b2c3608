"""Expert load: token rows per (MoE layer, expert) over a sliding window, as the routers measured it.

Torch-free, like serving/engine_client.py: the Ingress and the CLI import it, never the model stack.

    >>> load = await source.expert_load()              # any ExpertLoadSource: AsyncEngine, the Ingress's RouterLoads
    >>> load.imbalance()                               # per MoE layer: the busiest expert's rows / the mean
    [2.4, 1.9]
    >>> Path("load.json").write_text(json.dumps(load.to_json()))    # a load file (docs/placement.md)
    >>> fetch_expert_load("http://127.0.0.1:8000", api_key=None)    # GET /v1/admin/expert-load of a server

The load file (and the body of GET /v1/admin/expert-load) is JSON:
`{"load": [[rows of expert 0, ..., expert E-1] for each MoE layer], "layers": [...], "num_experts": E,
"window_s": W, "routers": R}`. `load[i]` is the i-th MoE layer in model order (dense layers are skipped,
e.g. DeepSeek-V3's first layers), and `layers[i]` is that layer's index among all the model's layers.
A row is one token sent to one expert: a token routed to top_k experts adds top_k rows to its layer,
so every layer's rows add up to top_k x the tokens that ran through the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from serving.http_client import error_message

ROUTE = "/v1/admin/expert-load"
FETCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ExpertLoad:
    """Rows per (MoE layer, expert) of the last `window_s` seconds, summed over `routers` router replicas.

    layers: the model layer index of each MoE layer, in order (load[i] is layer layers[i]).
    load: [len(layers)][num_experts] token rows the gate sent to each expert.
    """

    layers: tuple[int, ...]
    num_experts: int
    window_s: float
    load: tuple[tuple[int, ...], ...]
    routers: int = 1

    def __post_init__(self) -> None:
        if len(self.load) != len(self.layers) or any(len(row) != self.num_experts for row in self.load):
            shape = [len(row) for row in self.load]
            raise ValueError(
                f"ExpertLoad: load must be [{len(self.layers)} MoE layers][{self.num_experts} experts], "
                f"got {len(self.load)} rows of lengths {shape[:8]}"
            )

    @classmethod
    def total(cls, loads: Sequence[ExpertLoad]) -> ExpertLoad:
        """The sum of several replicas' loads (all of one model and window); `routers` adds up too."""
        if not loads:
            raise ValueError("ExpertLoad.total: no loads to add")
        first = loads[0]
        for other in loads[1:]:
            if (other.layers, other.num_experts, other.window_s) != (first.layers, first.num_experts, first.window_s):
                raise ValueError(
                    f"ExpertLoad.total: replicas disagree on (MoE layers, experts, window_s): "
                    f"{(first.layers, first.num_experts, first.window_s)} vs "
                    f"{(other.layers, other.num_experts, other.window_s)}; do they serve the same model and config?"
                )
        rows = tuple(tuple(map(sum, zip(*layer, strict=True))) for layer in zip(*(x.load for x in loads), strict=True))
        return cls(first.layers, first.num_experts, first.window_s, rows, sum(x.routers for x in loads))

    def imbalance(self) -> list[float | None]:
        """Per MoE layer, the busiest expert's rows over the mean rows per expert (1.0: perfectly even,
        num_experts: one expert took everything); None for a layer that saw no tokens."""
        return [max(row) * self.num_experts / sum(row) if sum(row) else None for row in self.load]

    def summary(self) -> str:
        """A few lines for people: per MoE layer its rows, max/mean ratio and busiest expert."""
        lines = [f"expert load over the last {self.window_s:g} s, {self.routers} router(s), {self.num_experts} experts"]
        for layer, row, ratio in zip(self.layers, self.load, self.imbalance(), strict=True):
            if ratio is None:
                lines.append(f"  layer {layer:>3}: no tokens")
                continue
            busiest = max(range(self.num_experts), key=lambda e: (row[e], -e))
            lines.append(f"  layer {layer:>3}: {sum(row):>10} rows, max/mean {ratio:5.2f} (expert {busiest})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The load file / route body (module docstring); `load` first, as a reader looks for it."""
        return {
            "load": [list(row) for row in self.load],
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "window_s": self.window_s,
            "routers": self.routers,
        }

    @classmethod
    def from_json(cls, doc: Any) -> ExpertLoad:
        """Parse a load file / route body; ValueError naming the field that is missing or malformed."""
        if not isinstance(doc, dict):
            raise ValueError(f"expert load: expected a JSON object, got {type(doc).__name__}")
        missing = [k for k in ("load", "layers", "num_experts", "window_s") if k not in doc]
        if missing:
            raise ValueError(f"expert load: missing field(s) {', '.join(missing)}")
        try:
            load = tuple(tuple(int(n) for n in row) for row in doc["load"])
            layers = tuple(int(i) for i in doc["layers"])
            return cls(layers, int(doc["num_experts"]), float(doc["window_s"]), load, int(doc.get("routers", 1)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"expert load: malformed field ({e})") from None


class ExpertLoadSource(Protocol):
    """Where the API reads expert load: AsyncEngine in one process; the Ingress's RouterLoads on Ray Serve,
    which adds up every router replica's. Raises EngineUnavailableError when no router answers."""

    async def expert_load(self) -> ExpertLoad: ...


class ExpertLoadFetchError(RuntimeError):
    """GET /v1/admin/expert-load failed; the message has the URL, the status and the server's error message."""


def fetch_expert_load(url: str, api_key: str | None, timeout_s: float = FETCH_TIMEOUT_S) -> ExpertLoad:
    """A running server's expert load (GET `url`/v1/admin/expert-load, with an admin key when it has keys)."""
    where = f"GET {url.rstrip('/')}{ROUTE}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}{ROUTE}", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise ExpertLoadFetchError(f"{where}: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise ExpertLoadFetchError(f"{where}: HTTP {response.status_code}: {error_message(response)}")
    try:
        return ExpertLoad.from_json(response.json())
    except ValueError as e:
        raise ExpertLoadFetchError(f"{where}: {e}") from None
