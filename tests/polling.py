"""Waiting for a condition with a deadline (tests never sleep a fixed time to wait for something)."""

from __future__ import annotations

import asyncio
import time


async def poll(condition, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """True as soon as condition() holds; False if it still does not after `timeout` seconds. `interval`:
    the pause between checks (longer for a condition that asks Serve's controller)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if condition():
            return True
        await asyncio.sleep(interval)
    return condition()


def wait_until(condition, timeout: float = 10.0, interval: float = 0.5) -> bool:
    """poll for a thread that is not on an event loop: True as soon as condition() holds; False if it still
    does not after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return condition()
