"""Builds the dashboard summary from the coordinator's tables in a handful of queries."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.dashboard.schemas import (
    DashboardNode,
    DashboardRound,
    DashboardSummary,
    DashboardVersion,
    NodeHealth,
)
from coordinator.models import ModelVersion, Node, Round, Update
from coordinator.settings import CoordinatorSettings
from shared.schemas import utcnow


def _aware(ts: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def node_health(
    *, revoked: bool, last_seen_at: datetime | None, now: datetime, stale_after: float
) -> NodeHealth:
    if revoked:
        return "revoked"
    if last_seen_at is None:
        return "never_seen"
    return "healthy" if (now - last_seen_at).total_seconds() <= stale_after else "stale"


def stale_after_seconds(settings: CoordinatorSettings) -> float:
    # A participating node downloads every new version and submits once per round,
    # so it is seen at least once per round deadline; two deadlines of silence is stale.
    return 2.0 * settings.round_deadline_seconds


def build_summary(
    session: Session, settings: CoordinatorSettings, *, limit: int = 200
) -> DashboardSummary:
    now = utcnow()
    stale_after = stale_after_seconds(settings)
    versions = list(
        session.scalars(select(ModelVersion).order_by(ModelVersion.version.desc()).limit(limit))
    )
    rounds = list(session.scalars(select(Round).order_by(Round.id.desc()).limit(limit)))
    participants: dict[int, list[str]] = defaultdict(list)
    examples: dict[int, int] = defaultdict(int)
    if rounds:
        rows = session.execute(
            select(Update.round_id, Update.node_id, Update.num_examples)
            .where(Update.round_id.in_([r.id for r in rounds]))
            .order_by(Update.round_id, Update.node_id)
        )
        for round_id, node_id, num_examples in rows:
            participants[round_id].append(node_id)
            examples[round_id] += int(num_examples)
    nodes = list(session.scalars(select(Node).order_by(Node.node_id)))

    def round_row(r: Round) -> DashboardRound:
        closed = _aware(r.closed_at) if r.closed_at else None
        created = _aware(r.created_at)
        return DashboardRound(
            round_id=r.id,
            state="open" if r.state == "open" else "closed",
            base_version=r.base_version,
            result_version=r.result_version,
            created_at=created,
            closed_at=closed,
            duration_seconds=(closed - created).total_seconds() if closed else None,
            close_reason=r.close_reason,
            participants=participants[r.id],
            num_examples=examples[r.id],
        )

    def node_row(n: Node) -> DashboardNode:
        seen = _aware(n.last_seen_at) if n.last_seen_at else None
        return DashboardNode(
            node_id=n.node_id,
            region=n.region,
            last_seen_at=seen,
            seconds_since_seen=(now - seen).total_seconds() if seen else None,
            last_model_version=n.last_model_version,
            health=node_health(
                revoked=n.revoked_at is not None,
                last_seen_at=seen,
                now=now,
                stale_after=stale_after,
            ),
        )

    active = [v.version for v in versions if v.status == "active"]
    open_rounds = [r.id for r in rounds if r.state == "open"]
    return DashboardSummary(
        generated_at=now,
        active_version=max(active) if active else None,
        current_round_id=max(open_rounds) if open_rounds else None,
        stale_after_seconds=stale_after,
        versions=[
            DashboardVersion(
                version=v.version,
                status=v.status,  # type: ignore[arg-type]
                created_at=_aware(v.created_at),
                round_id=v.round_id,
                num_items=v.num_items,
                size_bytes=v.size_bytes,
                metrics={k: float(x) for k, x in (v.metrics or {}).items()},
            )
            for v in versions
        ],
        rounds=[round_row(r) for r in rounds],
        nodes=[node_row(n) for n in nodes],
    )
