"""The import graph the layout promises (docs/architecture.md): router <- serving <- deployments, Ray only
in deployments/, and the Ingress side (HTTP API, engine contract, app config) free of torch and the model.

Each check runs in a fresh interpreter, so what this test process already imported cannot hide an import.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import serving
import serving.api

REPO = Path(__file__).resolve().parents[1]
INGRESS_SIDE = (
    [f"serving.api.{m.name}" for m in pkgutil.iter_modules(serving.api.__path__)]
    + ["serving.engine_client", "serving.metrics", "serving.tokenizer", "serving.errors"]
    + ["deployments.config", "deployments.ingress"]
)
HEAVY = ("torch", "serving.model", "serving.engine", "serving.experts")


def _modules_after(code: str) -> set[str]:
    """The module names loaded after running `code` in a fresh interpreter of this venv."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def _all_modules(package) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")]


def test_the_ingress_side_imports_neither_torch_nor_the_model(tokenizer_dir):
    # Loading a checkpoint's tokenizer and rendering a chat is what the Ingress does at start and per request.
    code = "\n".join(f"import {m}" for m in INGRESS_SIDE) + (
        f"\nfrom serving.tokenizer import Tokenizer\ntok = Tokenizer({str(tokenizer_dir)!r})"
        "\nassert tok.apply_chat_template([{'role': 'user', 'content': 'hi'}]) and tok.encode('hi')"
    )
    loaded = _modules_after(code)
    assert set(INGRESS_SIDE) <= loaded  # the list names real modules
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == [], f"the Ingress side loaded {heavy[:8]}"


def test_router_and_serving_never_import_ray():
    import router

    modules = _all_modules(router) + _all_modules(serving)
    assert "serving.engine.llm_engine" in modules and "serving.experts.sharded" in modules
    loaded = _modules_after("\n".join(f"import {m}" for m in modules))
    assert "ray" not in loaded, "a module of router/ or serving/ imports ray; Ray belongs in deployments/"
