"""Where a replica computes: resolved once, with a clear error when the GPU it was promised is not there."""

from __future__ import annotations

import pytest
import torch

from serving.errors import ConfigError
from serving.model.device import resolve_device


def test_cpu_unless_a_gpu_is_asked_for():
    assert resolve_device(None, "cpu", "Router#x") == torch.device("cpu")
    assert resolve_device("cpu", "gpu", "Router#x") == torch.device("cpu")  # engine_config.device overrides


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no CUDA device is visible")
def test_a_gpu_replica_without_cuda_is_an_error_naming_the_replica():
    with pytest.raises(ConfigError, match=r"ExpertShard-1 replica abc: accelerator: gpu but no CUDA device"):
        resolve_device(None, "gpu", "ExpertShard-1 replica abc")
    with pytest.raises(ConfigError, match=r"Router replica r1: engine_config.device='cuda:1'"):
        resolve_device("cuda:1", "cpu", "Router replica r1")


@pytest.mark.gpu
def test_the_replicas_gpu_when_cuda_is_visible(device):
    if device.type != "cuda":
        pytest.skip("this one is about CUDA devices")
    assert resolve_device(None, "gpu", "Router#x") == torch.device("cuda", 0)
