"""`moe-serve run`: a local Ray cluster serving the app until Ctrl-C or SIGTERM, then a clean shutdown."""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from deployments.config import AppConfig

APP_NAME = "moe"


def load_args(config_file: str | None) -> dict[str, Any]:
    """The first application's `args:` from a Serve config file (or {} without one)."""
    if config_file is None:
        return {}
    doc = yaml.safe_load(Path(config_file).read_text()) or {}
    apps = doc.get("applications") or []
    if not apps:
        raise SystemExit(f"{config_file}: no applications: block")
    return dict(apps[0].get("args") or {})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a Serve proxy or a metrics endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_app(serve_url: str, name: str, args: dict[str, Any], timeout_s: float = 300.0) -> str:
    """Deploy the app of `args` under /name on the running Serve instance at `serve_url` (its own route
    prefix, so apps on one proxy never share traffic); returns the app's URL once it answers."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{serve_url}/{name}"
    wait_ready(url, timeout_s=timeout_s)
    return url


def wait_ready(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f} s")


def serve_forever(
    args: dict[str, Any], host: str, port: int, metrics_port: int = 8080, temp_dir: str | None = None
) -> None:
    import ray
    from ray import serve

    from deployments.app import build_app, validate

    cfg = validate(args)  # config errors before any process starts
    if cfg.engine == "vllm":
        from serving.vllm_engine import require_vllm

        require_vllm()
    engine = describe_engine(cfg)  # expert_kernel: vllm without vLLM fails here, before any process starts
    stop = threading.Event()
    # CPU reservations are for placement, not limits: a laptop with fewer cores still runs the app.
    num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.total_cpus()))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             _metrics_export_port=metrics_port)  # fmt: skip
    # After ray.init, which installs its own fatal-signal handlers: ours turn both into a clean stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        wait_ready(url)
        model = cfg.served_model_name or Path(cfg.model).name
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        print(_banner(url, model, engine, metrics_url, cfg.retrieval is not None), flush=True)
        stop.wait()
        print("shutting down...", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def describe_engine(cfg: AppConfig) -> str:
    """The banner's engine words: "2 expert shard(s), expert kernel vllm (auto)", or "engine vllm".

    The kernel is resolved here as every replica on this machine resolves it (same venv, same rule).
    """
    if cfg.engine == "vllm":
        return "engine vllm"
    import torch

    from serving.experts.kernels import resolve_kernel
    from serving.model.config import ModelConfig
    from serving.model.dtypes import torch_dtype

    name = cfg.engine_config.expert_kernel
    hidden_size = ModelConfig.from_pretrained(cfg.model).hidden_size
    kernel = resolve_kernel(name, torch_dtype(cfg.engine_config.dtype), torch.device("cpu"), hidden_size)
    where = f"{cfg.shards} expert shard(s)" if cfg.shards else "experts in the router"
    return f"{where}, expert kernel {kernel}" + (" (auto)" if name == "auto" else "")


def _banner(url: str, model: str, engine: str, metrics_url: str, retrieval: bool) -> str:
    rag = f'\n  retrieval      {url}/v1/retrieve, /v1/documents, /v1/collections (RAG: add "retrieval": {{}})'
    return f"""
moe-serve is up: model {model!r}, {engine}. Press Ctrl-C to stop.

  OpenAI API     {url}/v1   (GET /v1/models, POST /v1/completions, POST /v1/chat/completions){rag if retrieval else ""}
  health         {url}/healthz
  metrics        {metrics_url}   (Prometheus format; Ray prefixes every name with ray_)

  curl {url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "prompt": "Experts live on", "max_tokens": 16, "temperature": 0}}'
"""
