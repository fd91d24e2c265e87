"""The node's private event store (its own database; nothing here leaves the region)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from regional_node.models import Event, NodeSecret, Participation, ServedSnapshot
from shared.db import make_engine, make_session_factory, read_only, upgrade_to_head
from shared.schemas import EventIn

# How much each event type says about interest, for regional popularity.
POPULARITY_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
_INSERT_CHUNK = 2000

# Built once: the per-request cost of /v1/recommend is two indexed lookups, not query building.
_RECENT_EVENTS = (
    select(Event.item_id, Event.event_type, Event.ts, Event.country)
    .where(Event.user_id == bindparam("user_id"))
    .order_by(Event.ts.desc(), Event.id.desc())
    .limit(bindparam("limit"))
)
# /v1/recommend's one query. Part 0: the user's newest `limit` events, newest first
# (`recommend` turns them into the history training sees: distinct items by first
# contact, each with its strongest type, `shared.training.UserSequence.add`; ties in
# time go by id, as in training). Part 1: every item the user bought. Part 2: the
# newest event's country. One round trip, and no timestamp parsing (ts only sorts).
_RECOMMEND_CONTEXT = text(
    "SELECT 0 AS part, item_id, event_type, ts, id FROM (SELECT item_id, event_type, ts, id "
    "FROM events WHERE user_id = :user_id ORDER BY ts DESC, id DESC LIMIT :limit) AS recent "
    "UNION ALL "
    "SELECT 1, item_id, 'purchase', MAX(ts), MAX(id) FROM events "
    "WHERE user_id = :user_id AND event_type = 'purchase' GROUP BY item_id "
    "UNION ALL "
    "SELECT 2, country, '', ts, id FROM (SELECT country, ts, id FROM events "
    "WHERE user_id = :user_id AND country IS NOT NULL "
    "ORDER BY ts DESC, id DESC LIMIT 1) AS newest "
    "ORDER BY part, ts DESC, id DESC"
)
# How many of a user's newest events /v1/recommend reads: the history is built from
# them (all of a user's events up to this many, the same history training sees).
RECOMMEND_HISTORY_EVENTS = 1000
_PURCHASED = (
    select(Event.item_id)
    .where(Event.user_id == bindparam("user_id"), Event.event_type == "purchase")
    .distinct()
)


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


class EventStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.reader = read_only(self.engine)  # reads never take SQLite's write lock
        self._popularity: tuple[float, list[tuple[str, float]]] | None = None
        self._lock = threading.Lock()
        self._refreshing = False

    def migrate(self) -> None:
        upgrade_to_head("node", self.url)

    def dispose(self) -> None:
        self.engine.dispose()

    def _insert(self):  # type: ignore[no-untyped-def]
        dialect = self.engine.dialect.name
        return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Event)

    def add_events(self, events: Sequence[EventIn]) -> int:
        """Insert events, ignoring ones already stored (same user, item, type, time).

        All or nothing: the whole batch is one transaction. Returns rows inserted.
        Rows go in in one total order of the duplicate key, time first, so two batches
        holding the same events in other orders lock them in the same order (on
        PostgreSQL they deadlocked: a 500) and ids still follow time, which training
        and serving use to break ties (one user's same-second events go in item order).
        """
        inserted = 0
        events = sorted(events, key=lambda e: (e.timestamp, e.user_id, e.item_id, e.event_type))
        with self.sessions() as session, session.begin():
            for start in range(0, len(events), _INSERT_CHUNK):
                chunk = events[start : start + _INSERT_CHUNK]
                rows = [
                    {
                        "user_id": e.user_id,
                        "item_id": e.item_id,
                        "event_type": e.event_type,
                        "ts": e.timestamp,
                        "country": e.country,
                    }
                    for e in chunk
                ]
                # Counted from RETURNING: psycopg's rowcount reaches SQLAlchemy as -1 here.
                stmt = self._insert().values(rows).on_conflict_do_nothing().returning(Event.id)
                inserted += len(session.execute(stmt).all())
        cached = self._popularity
        if inserted and cached is not None:
            self._popularity = (float("-inf"), cached[1])  # stale: recomputed in the background
        return inserted

    def count(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Event)) or 0)

    def events_marker(self) -> tuple[int | None, int]:
        """(id of the newest stored event, number of events): changes whenever events are
        inserted. Not the id alone: on PostgreSQL a batch can commit after one that drew
        higher ids, which leaves the newest id as it was."""
        with self.reader.connect() as conn:
            newest, count = conn.execute(select(func.max(Event.id), func.count(Event.id))).one()
        return newest, int(count)

    def user_events(self, user_id: str, limit: int) -> list[tuple[str, str, datetime, str | None]]:
        """The user's most recent events, oldest first: (item_id, event_type, ts, country)."""
        with self.sessions() as session:
            rows = session.execute(
                select(Event.item_id, Event.event_type, Event.ts, Event.country)
                .where(Event.user_id == user_id)
                .order_by(Event.ts.desc(), Event.id.desc())
                .limit(limit)
            ).all()
        return [(r[0], r[1], _aware(r[2]), r[3]) for r in reversed(rows)]

    def user_context(
        self, user_id: str, limit: int
    ) -> tuple[list[tuple[str, str, datetime, str | None]], set[str]]:
        """(`user_events(user_id, limit)`, `purchased_items(user_id)`) on one connection."""
        with self.reader.connect() as conn:
            rows = conn.execute(_RECENT_EVENTS, {"user_id": user_id, "limit": limit}).all()
            purchased = set(conn.execute(_PURCHASED, {"user_id": user_id}).scalars())
        return [(r[0], r[1], _aware(r[2]), r[3]) for r in reversed(rows)], purchased

    def recommend_context(
        self, user_id: str, limit: int = RECOMMEND_HISTORY_EVENTS
    ) -> tuple[list[tuple[str, str]], set[str], str | None]:
        """(newest `limit` events as (item_id, event_type), oldest first; purchased items;
        the country of the newest event that has one): one query, for /v1/recommend."""
        with self.reader.connect() as conn:
            rows = conn.execute(_RECOMMEND_CONTEXT, {"user_id": user_id, "limit": limit}).all()
        history: list[tuple[str, str]] = []
        purchased: set[str] = set()
        country: str | None = None
        for part, value, event_type, _ts, _id in rows:
            if part == 0:
                history.append((value, event_type))
            elif part == 1:
                purchased.add(value)
            else:
                country = value
        history.reverse()
        return history, purchased, country

    def purchased_items(self, user_id: str) -> set[str]:
        with self.sessions() as session:
            return set(
                session.scalars(
                    select(Event.item_id).where(
                        Event.user_id == user_id, Event.event_type == "purchase"
                    )
                )
            )

    def iter_events(self) -> Iterator[tuple[str, str, str, float, str | None]]:
        """All events as (user_id, item_id, event_type, unix_time, country), for training."""
        with self.reader.connect() as conn:
            result = conn.execution_options(yield_per=10_000).execute(
                select(
                    Event.user_id, Event.item_id, Event.event_type, Event.ts, Event.country
                ).order_by(Event.id)
            )
            for user_id, item_id, etype, ts, country in result:
                yield user_id, item_id, etype, _aware(ts).timestamp(), country

    def popularity(self, ttl_seconds: float = 30.0) -> list[tuple[str, float]]:
        """Items by weighted event count in this region, most popular first (cached).

        Only the first call computes in the caller's thread; afterwards a stale ranking
        (older than `ttl_seconds`, or events arrived) is answered as it is while one
        background thread recomputes it, so no request waits for the full scan.
        """
        cached = self._popularity
        if cached is None:
            with self._lock:
                if self._popularity is None:
                    self._popularity = (time.monotonic(), self._rank_popularity())
                return self._popularity[1]
        if time.monotonic() - cached[0] >= ttl_seconds and not self._refreshing:
            self._refreshing = True
            threading.Thread(target=self._refresh_popularity, daemon=True).start()
        return cached[1]

    def _refresh_popularity(self) -> None:
        try:
            ranked = self._rank_popularity()
            with self._lock:
                self._popularity = (time.monotonic(), ranked)
        finally:
            self._refreshing = False

    def _rank_popularity(self) -> list[tuple[str, float]]:
        with self.reader.connect() as conn:
            rows = conn.execute(
                select(Event.item_id, Event.event_type, func.count()).group_by(
                    Event.item_id, Event.event_type
                )
            ).all()
        scores: dict[str, float] = {}
        for item_id, etype, n in rows:
            scores[item_id] = scores.get(item_id, 0.0) + POPULARITY_WEIGHTS[etype] * int(n)
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))

    # Participation bookkeeping ------------------------------------------------------------

    def joined_rounds(self) -> set[int]:
        with self.sessions() as session:
            return set(session.scalars(select(Participation.round_id)))

    def last_round_joined(self) -> int | None:
        with self.sessions() as session:
            return session.scalar(select(func.max(Participation.round_id)))

    def record_participation(
        self, round_id: int, base_version: int, sha256: str, num_examples: int
    ) -> None:
        with self.sessions() as session, session.begin():
            if session.get(Participation, round_id) is None:
                session.add(
                    Participation(
                        round_id=round_id,
                        base_version=base_version,
                        sha256=sha256,
                        num_examples=num_examples,
                        submitted_at=datetime.now(UTC),
                    )
                )

    # What the node serves, for a restart without the coordinator ---------------------------

    def save_snapshot(self, snapshot: ServedSnapshot) -> None:
        """Replace the stored snapshot (one row) with this one."""
        snapshot.slot = 1
        with self.sessions() as session, session.begin():
            session.merge(snapshot)

    def load_snapshot(self) -> ServedSnapshot | None:
        with self.sessions() as session:
            return session.get(ServedSnapshot, 1)

    def secret(self, name: str) -> bytes:
        """The node's secret `name`: 32 random bytes made on first use, then kept."""
        with self.sessions() as session, session.begin():
            row = session.get(NodeSecret, name)
            if row is None:
                row = NodeSecret(name=name, value=os.urandom(32), created_at=datetime.now(UTC))
                session.add(row)
            return bytes(row.value)
