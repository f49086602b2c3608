from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The demo byte-level BPE tokenizer, trained once per session."""
    from serving.demo import train_tokenizer

    path = tmp_path_factory.mktemp("demo-tokenizer")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The Mixtral demo checkpoint (what `moe-serve make-demo` writes), built once per session."""
    from serving.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "demo-mixtral", "mixtral", progress=False)


@pytest.fixture(scope="session")
def device():
    """The accelerator that tests marked `gpu` run on: cuda, or $MOE_TEST_DEVICE (benchmarks.gpu_check
    --device cpu runs them on the CPU as a smoke test of the GPU checks themselves)."""
    import torch

    return torch.device(os.environ.get("MOE_TEST_DEVICE", "cuda"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, where no CUDA device is visible (unless
    $MOE_TEST_DEVICE sends them to another device)."""
    if os.environ.get("MOE_TEST_DEVICE", "cuda").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA device (none visible here); run benchmarks.gpu_check on one")
            for item in items:
                if item.get_closest_marker("gpu") is not None:  # the marker, not a parameter named gpu
                    item.add_marker(skip)
