"""asyncio helpers that stay correct on Python 3.11."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True if it was set.

    Not `asyncio.wait_for(event.wait(), timeout)`: on Python 3.10 and 3.11 that
    swallows a cancellation of the caller delivered in the same event-loop tick in
    which the event is set (python/cpython#86296, fixed by the 3.12 rewrite), so a
    background loop cancelled at shutdown right after a wake-up ran on forever and
    the app's lifespan never finished. `asyncio.wait` neither raises the inner
    task's cancellation nor absorbs the caller's.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        if not waiter.done():
            waiter.cancel()
    return waiter in done
