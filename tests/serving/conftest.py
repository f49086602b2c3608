from __future__ import annotations

import pytest

from serving.model.decoder import load_local
from tests.serving.hf_models import build_reference, save_both_layouts


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    """A tiny random Mixtral checkpoint (per-expert layout), made with transformers."""
    per_expert, _ = save_both_layouts(build_reference("mixtral"), tmp_path_factory.mktemp("mixtral"))
    return per_expert


@pytest.fixture(scope="session")
def mixtral(mixtral_dir):
    """(model, expert backend) for the tiny Mixtral, loaded once."""
    return load_local(mixtral_dir)
