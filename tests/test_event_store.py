"""The node's event store under concurrent writers (real PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from regional_node.store import EventStore
from shared.schemas import EventIn


def _event(i: int) -> EventIn:
    return EventIn(
        user_id=f"u{i}",
        item_id="I001",
        event_type="view",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
    )


def test_overlapping_batches_in_other_orders_do_not_deadlock(pg_url: str) -> None:
    # A retry or a second sender with the same events in another order: each batch
    # locked its rows in arrival order, and the two deadlocked (a 500 to a storefront).
    store = EventStore(pg_url)
    store.migrate()
    results: list[int] = []
    errors: list[str] = []

    def send(events: list[EventIn]) -> None:
        try:
            results.append(store.add_events(events))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    for attempt in range(2):
        batch = [_event(i + 10_000 * attempt) for i in range(6000)]
        threads = [threading.Thread(target=send, args=(b,)) for b in (batch, batch[::-1])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    store.dispose()
    assert errors == []
    assert sorted(results) == [0, 0, 6000, 6000]  # each event stored once


def test_a_batch_is_stored_in_time_order(tmp_path: object) -> None:
    # Rows were inserted sorted by (user, item, type, time), so ids followed item names;
    # training and serving break one user's same-time ties by id.
    store = EventStore(f"sqlite:///{tmp_path}/node.db")
    store.migrate()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    batch = [
        EventIn(user_id="u", item_id=item, event_type="view", timestamp=t0 + timedelta(seconds=s))
        for item, s in (("I003", 0), ("I001", 2), ("I002", 1))
    ]
    assert store.add_events(batch) == 3
    assert [item for _, item, *_ in store.iter_events()] == ["I003", "I002", "I001"]
    store.dispose()


def test_the_events_marker_sees_a_batch_that_drew_lower_ids(tmp_path: object) -> None:
    # The node retries an empty training round when the marker changes; keyed on the
    # newest id alone it missed a PostgreSQL batch that committed after one with higher
    # ids (here: a row given a lower id directly).
    from sqlalchemy import insert

    from regional_node.models import Event

    store = EventStore(f"sqlite:///{tmp_path}/node.db")
    store.migrate()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    store.add_events([EventIn(user_id="u", item_id="I1", event_type="view", timestamp=t0)])
    with store.sessions() as session, session.begin():
        session.execute(
            insert(Event).values(id=100, user_id="u", item_id="I2", event_type="view", ts=t0)
        )
    before = store.events_marker()
    with store.sessions() as session, session.begin():
        session.execute(
            insert(Event).values(id=50, user_id="u", item_id="I3", event_type="view", ts=t0)
        )
    after = store.events_marker()
    store.dispose()
    assert before == (100, 2) and after == (100, 3)
