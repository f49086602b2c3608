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
