"""Writing a benchmark's results: JSON under the output folder and a markdown table on stdout."""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path
from typing import Any

import torch


def machine_meta(**extra: Any) -> dict[str, Any]:
    """Date, machine and torch version, plus the benchmark's own settings."""
    return dict(
        date=str(date.today()),
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        **extra,
    )


def write_report(out_dir: str, name: str, meta: dict[str, Any], rows: list[dict], columns: dict[str, str]) -> None:
    """Save {meta, rows} as OUT_DIR/NAME.json and print `columns` (header -> row key) as a table."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in columns.values()) + " |")
