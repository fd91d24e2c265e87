"""Shared fixtures: real PostgreSQL databases, SQLite files, tiny catalogs and events."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

PG_ADMIN_DSN = os.environ.get(
    "FEDJEWEL_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
PG_URL_BASE = os.environ.get("FEDJEWEL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_admin():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)


def _require_postgres() -> None:
    try:
        with _pg_admin() as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        msg = f"PostgreSQL unreachable at {PG_ADMIN_DSN}: {exc}"
        if IN_CI:
            pytest.fail(msg + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(msg)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    _require_postgres()
    name = f"fedjewel_test_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_URL_BASE}/{name}"
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'coordinator.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The coordinator's database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
    else:
        yield request.getfixturevalue("pg_url")


CATEGORIES = ["ring", "necklace", "earrings", "bracelet"]
MATERIALS = ["gold", "silver", "platinum"]


def tiny_catalog(n: int = 60) -> list[dict[str, object]]:
    return [
        {
            "item_id": f"I{i:03d}",
            "title": f"Item {i}",
            "category": CATEGORIES[i % 4],
            "material": MATERIALS[(i // 4) % 3],
            "gemstone": "diamond" if i % 5 == 0 else None,
            "style_tags": ["classic"] if i % 2 else ["modern", "minimalist"],
            "price_usd": float(50 + 37 * i),
        }
        for i in range(n)
    ]


def tiny_events(
    prefix: str, *, users: int, material: str, seed: int, n_items: int = 60
) -> list[dict[str, object]]:
    """Events of one region whose users prefer one material."""
    rng = random.Random(seed)
    catalog = tiny_catalog(n_items)
    liked = [c["item_id"] for c in catalog if c["material"] == material]
    others = [c["item_id"] for c in catalog if c["material"] != material]
    start = datetime(2026, 10, 1, tzinfo=UTC)
    events: list[dict[str, object]] = []
    for u in range(users):
        t = start + timedelta(hours=rng.randint(0, 500))
        for _ in range(rng.randint(3, 8)):
            item = rng.choice(liked) if rng.random() < 0.8 else rng.choice(others)
            for etype in ("view", "click", "add_to_cart", "purchase")[: rng.randint(1, 4)]:
                t += timedelta(minutes=rng.randint(1, 30))
                events.append(
                    {
                        "user_id": f"{prefix}-user-{u}",
                        "item_id": item,
                        "event_type": etype,
                        "timestamp": t.isoformat(),
                        "country": "DE",
                    }
                )
    return events


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors on a shared CI box: extra torch threads only spin and slow tests down."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
