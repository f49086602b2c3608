"""benchmarks.gpu_check on the CPU: the script a GPU machine runs works end to end before it gets there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--model", "tiny", "--batches", "1,2",
           "--steps", "2", "--skip-tests", "--cache-dir", str(tmp_path / "ckpt"),
           "--out", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [row["batch"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["ours_tok_s"] > 0 and row["transformers_tok_s"] > 0 and row["floor_ms"] > 0
        assert row["step_over_floor"] >= 1  # nothing beats reading its weights once
    assert "| batch | ours tok/s |" in (tmp_path / "out" / "gpu_check.md").read_text()
    # the GPU machine has no Ray and no vLLM: the script must not need them
    imports = subprocess.run(
        [sys.executable, "-c", "import sys, benchmarks.gpu_check, serving.engine.llm_engine, serving.model.decoder;"
         "print(sorted(m for m in ('ray', 'vllm', 'qdrant_client', 'fastapi') if m in sys.modules))"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert imports.stdout.strip() == "[]", imports.stdout + imports.stderr
