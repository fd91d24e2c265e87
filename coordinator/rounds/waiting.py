"""Long-polling for the next round: `GET /v1/rounds/current?after=R&wait=S`.

A node that has just sent its update would otherwise poll until the next round
opens; with `after` it is answered the moment a round newer than `after` is open.
The closer notifies waiters in this process at once; every waiter also re-reads
the database once a second (rounds opened by a catalog upload, a promotion or
another coordinator process). No database connection is held while waiting.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.concurrency import run_in_threadpool

from coordinator.db import Database
from coordinator.rounds.service import current_round, round_out
from coordinator.settings import CoordinatorSettings
from shared.aio import wait_event
from shared.schemas import RoundOut

MAX_WAIT_SECONDS = 30.0
RECHECK_SECONDS = 1.0


class RoundSignal:
    """Wakes every waiting request when a round opens (same process, same event loop)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


def read_current_round(db: Database, settings: CoordinatorSettings) -> RoundOut | None:
    with db.sessions() as session:
        r = current_round(session)
        return None if r is None else round_out(session, r, settings)


async def wait_for_round(
    db: Database,
    settings: CoordinatorSettings,
    signal: RoundSignal,
    *,
    after: int | None,
    wait: float,
) -> RoundOut | None:
    """The open round; with `after`, wait up to `wait` seconds for one newer than `after`."""
    deadline = time.monotonic() + min(wait, MAX_WAIT_SECONDS)
    while True:
        woken = signal.current()  # taken before reading, so no notification is missed
        rnd = await run_in_threadpool(read_current_round, db, settings)
        if after is None or (rnd is not None and rnd.round_id > after):
            return rnd
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return rnd
        await wait_event(woken, min(remaining, RECHECK_SECONDS))
