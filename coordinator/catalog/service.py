"""The public product catalog. Each item keeps its row in the model's item table forever."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.models import CatalogItemRow, CatalogRevision
from shared.errors import Unprocessable
from shared.schemas import CatalogInfo, CatalogItem, CatalogOut, utcnow


def _to_schema(row: CatalogItemRow) -> CatalogItem:
    return CatalogItem(
        item_id=row.item_id,
        title=row.title,
        category=row.category,
        material=row.material,
        gemstone=row.gemstone,
        style_tags=list(row.style_tags or []),
        price_usd=row.price_usd,
    )


def catalog_version(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.max(CatalogRevision.id), 0))) or 0)


def catalog_size(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(CatalogItemRow)) or 0)


# pg_advisory_xact_lock key of catalog uploads (any constant no other lock uses).
_CATALOG_LOCK = 0x6665646A  # "fedj"


def _one_upload_at_a_time(session: Session) -> None:
    """Queue concurrent uploads until this transaction ends: each numbers new items from
    the rows it reads, and two at once picked the same numbers (a 500 on PostgreSQL).
    SQLite's BEGIN IMMEDIATE already runs one writer at a time."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_CATALOG_LOCK)))


def upsert_catalog(
    session: Session, items: Sequence[CatalogItem], *, deactivate_missing: bool
) -> CatalogInfo:
    """Add new items at the end, update changed ones, optionally deactivate missing ones.

    Does not commit: the caller commits together with any model bootstrap.
    """
    if not items:
        raise Unprocessable("the catalog must contain at least one item")
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.item_id in seen:
            raise Unprocessable(
                f"duplicate item_id {item.item_id!r} at positions {seen[item.item_id]} and {i}"
            )
        seen[item.item_id] = i
    _one_upload_at_a_time(session)
    existing = {r.item_id: r for r in session.scalars(select(CatalogItemRow))}
    revision = CatalogRevision(
        created_at=utcnow(), added=0, updated=0, deactivated=0, total_items=0
    )
    session.add(revision)
    session.flush()
    next_row = len(existing)
    added = updated = deactivated = 0
    for item in items:
        row = existing.get(item.item_id)
        values = item.model_dump(exclude={"item_id"})
        if row is None:
            session.add(
                CatalogItemRow(
                    row=next_row, item_id=item.item_id, active=True, revision=revision.id, **values
                )
            )
            next_row += 1
            added += 1
            continue
        changed = not row.active or any(getattr(row, k) != v for k, v in values.items())
        if changed:
            for k, v in values.items():
                setattr(row, k, v)
            row.active = True
            row.revision = revision.id
            updated += 1
    if deactivate_missing:
        for item_id, row in existing.items():
            if item_id not in seen and row.active:
                row.active = False
                row.revision = revision.id
                deactivated += 1
    revision.added, revision.updated, revision.deactivated = added, updated, deactivated
    revision.total_items = next_row
    session.flush()
    active = int(
        session.scalar(
            select(func.count()).select_from(CatalogItemRow).where(CatalogItemRow.active)
        )
        or 0
    )
    return CatalogInfo(
        items=next_row,
        active_items=active,
        catalog_version=revision.id,
        added=added,
        updated=updated,
        deactivated=deactivated,
    )


def get_catalog(session: Session) -> CatalogOut:
    rows = list(session.scalars(select(CatalogItemRow).order_by(CatalogItemRow.row)))
    return CatalogOut(
        catalog_version=catalog_version(session),
        items=[_to_schema(r) for r in rows],
        inactive_item_ids=[r.item_id for r in rows if not r.active],
    )


def catalog_items(session: Session) -> list[CatalogItem]:
    rows = session.scalars(select(CatalogItemRow).order_by(CatalogItemRow.row))
    return [_to_schema(r) for r in rows]
