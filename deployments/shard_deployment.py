"""ExpertShard: one shard's routed experts of every MoE layer, stateless, one GPU per replica.

Each replica reads only its own experts' tensors from the checkpoint, so its memory is its share
of the expert weights. It holds no per-request state: any replica of a shard serves any call. Its experts
run on the expert kernel the config names (`engine_config.expert_kernel`, serving/experts/kernels.py),
resolved in the replica and exported once as moe_expert_kernel_info{model, kernel}.

A replica is ready (Serve routes calls to it, and in a rolling update stops an old one for it) only once a
router of its own version is up, or after `router_wait_s`: a shard of a new version is of use only to new
routers, and old routers keep the old shards meanwhile instead of waiting for new routers to start.

Each replica counts the expert rows it computes and reports their rate to Serve (`record_autoscaling_stats`),
the metric a shard autoscales on with `shard_autoscaling` (deployments/autoscaling.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import ray
import torch
from ray import serve
from torch import Tensor

from deployments.autoscaling import EXPERT_ROWS_PER_S, RowRate
from deployments.engine_deployment import NativeEngineFactory
from deployments.metrics import RaySink
from serving.engine_client import EngineConfig
from serving.errors import StalePlacementError
from serving.experts.compute_thread import ComputeThread
from serving.experts.kernels import kernel_of
from serving.experts.loading import load_experts
from serving.experts.row_channel import rows_on_channel
from serving.experts.shard_server import ShardServer
from serving.experts.sharded import ShardCall, run_shard_call, shard_version
from serving.metrics import EXPERT_KERNEL
from serving.model.checkpoint import Checkpoint
from serving.model.config import ModelConfig
from serving.model.device import resolve_device
from serving.model.dtypes import torch_dtype

log = logging.getLogger(__name__)


@serve.deployment(max_ongoing_requests=64)
class ExpertShard:
    async def __init__(
        self,
        model_path: str,
        shard_id: int,
        expert_ids: list[int] | list[list[int]],
        engine_config: dict,
        accelerator: str,
        model_name: str | None = None,
        router_wait_s: float | None = None,
        transport: str = "handles",
        direct_rows: str = "auto",
    ):
        """expert_ids: the experts it holds in every MoE layer, or one list per MoE layer in model order.
        router_wait_s: how long to wait for a router of this version before reporting ready (the app sets
        failover.router_wait_s); None: ready at once (shards deployed on their own, as in benchmarks).
        transport: "direct" also answers calls on a TCP port of this node (ShardServer; the routers learn it
        from `direct_endpoint`); "handles": Serve handle calls only. direct_rows: whether that port also takes
        row channels, the rows then landing on this replica's device (serving/experts/row_channel.py)."""
        cfg = ModelConfig.from_pretrained(model_path)
        per_layer = (
            expert_ids if expert_ids and isinstance(expert_ids[0], list) else [expert_ids] * len(cfg.moe_layer_ids)
        )
        if len(per_layer) != len(cfg.moe_layer_ids):
            raise ValueError(
                f"ExpertShard-{shard_id}: {len(per_layer)} expert lists for {len(cfg.moe_layer_ids)} MoE layers"
            )
        self.shard_id = shard_id
        self.rows = RowRate()
        self.expert_ids = {layer: sorted(ids) for layer, ids in zip(cfg.moe_layer_ids, per_layer, strict=True)}
        self.version = shard_version(model_path, shard_id, self.expert_ids)
        config = EngineConfig.model_validate(engine_config)
        self.replica = serve.get_replica_context().replica_tag
        self.device = resolve_device(config.device, accelerator, f"ExpertShard-{shard_id} replica {self.replica}")
        # Loaded and computed on one thread where the replica runs several OpenMP threads (compute_thread.py).
        self.compute_thread = ComputeThread(f"shard-{shard_id}-compute")
        ckpt = Checkpoint(model_path, fp8_block=cfg.fp8_block)  # fp8: only these experts' weights and scales
        load = (ckpt, cfg, self.expert_ids, torch_dtype(config.dtype), self.device, config.expert_kernel)
        self.layers = self.compute_thread.run(load_experts, *load)
        self.bytes_loaded = ckpt.bytes_read
        self.kernel = kernel_of(self.layers)  # resolved here, where it runs: "auto" becomes loop or vllm
        labels = {"model": model_name or Path(model_path).name, "kernel": self.kernel}
        RaySink().record(EXPERT_KERNEL, 1, labels)
        # Started before the wait below: a new router of this version may call as soon as it learns the port.
        self.server = None
        if transport == "direct":
            channel_device = self.device if rows_on_channel(direct_rows, self.device) else None
            self.server = ShardServer(self.compute, ray.util.get_node_ip_address(), channel_device=channel_device)
        if router_wait_s is not None:
            await self._wait_for_a_router_of_this_version(router_wait_s)

    async def _wait_for_a_router_of_this_version(self, wait_s: float) -> None:
        """Return once a running Router replica sends this shard's version, or after `wait_s`. (Serve's
        handle reaches only running replicas, old or new; asking again reaches a new one once it is up.)"""
        app = serve.get_replica_context().app_name
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                routers = serve.get_deployment_handle(NativeEngineFactory.deployment_name, app_name=app)
                versions = await asyncio.wait_for(routers.shard_versions.remote(), timeout=2.0)
                if self.shard_id < len(versions) and versions[self.shard_id] == self.version:
                    return
            except Exception:  # none up yet, or one dying: ask again
                pass
            await asyncio.sleep(0.25)
        log.warning("ExpertShard-%d: no router of version %s within %.0f s; ready anyway", self.shard_id,
                    self.version, wait_s)  # fmt: skip

    def run(self, layer: int, call: ShardCall, version: str | None = None) -> Tensor:
        """A call through a Serve handle: `compute`, its result device -> host (Serve pickles it back)."""
        return self.compute(layer, call, version).cpu()

    def compute(self, layer: int, call: ShardCall, version: str | None = None) -> Tensor:
        """Weighted partial sums [R_s, D] of this shard's experts over the rows it was sent, on its device.
        `version`: the router's shard_version for this shard; another one is refused (StalePlacementError).
        From any thread (Serve's, a ShardServer connection's): it runs on the compute thread where there is one."""
        return self.compute_thread.run(self._compute, layer, call, version)

    @torch.inference_mode()  # here, not in __init__: grad mode is per thread, and calls come from other threads
    def _compute(self, layer: int, call: ShardCall, version: str | None) -> Tensor:
        if version is not None and version != self.version:
            raise StalePlacementError(
                f"ExpertShard-{self.shard_id} (version {self.version}, experts {self.expert_ids}) got a call for "
                f"version {version}: the router and this replica are of different app versions"
            )
        # Host -> device on arrival (a no-op for rows that came on a row channel: they are there already).
        out = run_shard_call(self.layers, layer, call.to(self.device))
        self.rows.add(call.experts.numel())  # one expert row per (row, expert) assignment
        return out

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric, asked for every look_back_period_s / 5: expert rows computed per
        second since it last asked. Only deployments with an autoscaling_config ask."""
        return {EXPERT_ROWS_PER_S: self.rows.rate()}

    def direct_endpoint(self) -> dict:
        """Where this replica answers direct calls (deployments/direct_transport.py, Endpoint)."""
        if self.server is None:
            raise RuntimeError(f"ExpertShard-{self.shard_id} was deployed with transport: handles")
        server = self.server
        return {"replica": self.replica, "host": server.host, "port": server.port, "version": self.version,
                "store_port": server.store_port}  # fmt: skip

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: routers' streams end, and their calls fail over at once.
        server = getattr(self, "server", None)
        if server is not None:
            server.close()
        compute_thread = getattr(self, "compute_thread", None)
        if compute_thread is not None:
            compute_thread.close()

    def ping(self) -> bool:
        """A replica is up (the transport's probe of a shard that failed)."""
        return True

    def info(self) -> dict:
        return {
            "shard_id": self.shard_id,
            "expert_ids": self.expert_ids,
            "bytes_loaded": self.bytes_loaded,
            "device": str(self.device),
            "expert_bytes": sum(layer.nbytes for layer in self.layers.values()),
            "expert_kernel": self.kernel,
            "version": self.version,
            "replica": self.replica,
            "expert_rows": self.rows.total,  # computed by this replica since it started
            "row_channels": self.server.channels_opened if self.server else 0,  # opened by routers (direct_rows)
            "compute_thread": self.compute_thread.threaded,  # one thread loads and computes (compute_thread.py)
        }
