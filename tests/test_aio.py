"""`shared.aio.wait_event`: a background loop stops when cancelled, whatever the timing."""

from __future__ import annotations

import asyncio

import pytest

from shared.aio import wait_event


async def _loop_until_cancelled(event: asyncio.Event) -> None:
    # The shape of the coordinator's round closer and the node's insights loop.
    while True:
        await wait_event(event, 10.0)
        event.clear()


@pytest.mark.parametrize("ticks", range(6))
def test_cancel_right_after_a_wakeup_stops_the_loop(ticks: int) -> None:
    # asyncio.wait_for(event.wait(), ...) on Python 3.11 loses a cancel delivered 0-2
    # event-loop ticks after the event is set: the loop then never ends.
    async def main() -> bool:
        event = asyncio.Event()
        task = asyncio.create_task(_loop_until_cancelled(event))
        for _ in range(3):
            await asyncio.sleep(0)
        event.set()
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        stopped = task in done and task.cancelled()
        if not stopped:  # do not leave a loop running past the test
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)
        return stopped

    assert asyncio.run(main())


def test_wait_event_reports_set_and_timeout() -> None:
    async def main() -> tuple[bool, bool, float]:
        event = asyncio.Event()
        loop = asyncio.get_running_loop()
        start = loop.time()
        timed_out = await wait_event(event, 0.05)
        waited = loop.time() - start
        loop.call_later(0.01, event.set)
        return timed_out, await wait_event(event, 5.0), waited

    timed_out, was_set, waited = asyncio.run(main())
    assert timed_out is False and was_set is True
    assert waited >= 0.04
