"""The dtype names of the config (serving/engine_client.py) as torch dtypes."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """torch_dtype("bfloat16") -> torch.bfloat16; KeyError names the known ones."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise KeyError(f"dtype {name!r}: expected one of {sorted(TORCH_DTYPES)}") from None
