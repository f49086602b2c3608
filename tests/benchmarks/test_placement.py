"""benchmarks.placement end to end on a small load: every cell of the grid, figures that hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_placement_benchmark_runs_the_grid(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.placement", "--layers", "2", "--tokens", "4096", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "placement.json").read_text())["rows"]
    assert len(rows) == 27  # 3 exponents x 3 shard counts x 3 redundant counts
    for row in rows:
        assert row["contiguous"] <= row["planner"] <= row["bound"] + 1e-3, row
        if row["hier"] != "-":
            assert row["hier"] <= row["node_cap"] + 1e-3, row
    assert [r["eplb_reference"] for r in rows if r["eplb_reference"] != "-"] == [0.93, 0.68, 0.71]
    assert "| s | shards | redundant | contiguous | planner (split by load) |" in result.stdout
