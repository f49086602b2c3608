"""Where a process computes: resolved once per replica, then passed explicitly to every loader.

There is no global default device: the model, the experts, the KV cache and the runner's inputs are
put on the device they are given, and the places where tensors cross between host and device say so.
"""

from __future__ import annotations

import torch

from serving.errors import ConfigError


def resolve_device(requested: str | None, accelerator: str, replica: str) -> torch.device:
    """The device replica `replica` computes on: `requested` (engine_config.device) if set, else its GPU
    with accelerator "gpu" (Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU, so that is cuda:0), else
    the CPU. A CUDA device with no CUDA visible is a ConfigError naming the replica.

    >>> resolve_device(None, "cpu", "Router#a1")
    device(type='cpu')
    """
    name = requested or ("cuda" if accelerator == "gpu" else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = f"engine_config.device={requested!r}" if requested else "accelerator: gpu"
            raise ConfigError(
                f"{replica}: {why} but no CUDA device is visible in this replica (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}); run it on a GPU node or set accelerator: cpu"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{replica}: device {name} asked for, but {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", index)
    return device
