"""Waiting for a condition with a deadline: the one way tests wait (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import time


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate, timeout: float, what: str, guard: asyncio.Task | None = None,
                           interval: float = 0.05) -> None:
    """`wait_until` inside an event loop; `guard`: a task whose end (its error) fails the wait."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if guard is not None and guard.done():
            guard.result()  # the guard died: its error is the test's failure
            raise AssertionError(f"the guard returned while waiting for {what}")
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
