"""Waiting in async tests: poll a condition until it holds or a timeout fails the test."""

from __future__ import annotations

import asyncio

_UNSET = object()


async def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.05, expect=_UNSET):  # type: ignore[no-untyped-def]
    """Poll a sync or async callable until it returns `expect` (or anything truthy); fail on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    value = None
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if (value == expect) if expect is not _UNSET else value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value: {value!r})")
        await asyncio.sleep(interval_s)
