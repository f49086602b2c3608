"""What the CLI's clients of a moe-serve server share (serving/retrieval/remote.py, serving/expert_load.py)."""

from __future__ import annotations

import httpx


def error_message(response: httpx.Response) -> str:
    """The message of an error answer: the OpenAI error body's `error.message`, else the start of the body."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
