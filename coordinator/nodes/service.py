"""Node registry: registration (token shown once), revocation, last-seen bookkeeping."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.models import Node, Round, Update
from coordinator.secagg.service import forget_revoked_node
from coordinator.security import hash_token, new_node_token
from coordinator.settings import CoordinatorSettings
from shared.errors import Conflict, NotFound
from shared.schemas import NodeCredentials, NodeInfo, NodeRegistration, utcnow


def register_node(session: Session, body: NodeRegistration) -> NodeCredentials:
    if session.get(Node, body.node_id) is not None:
        raise Conflict(f"node {body.node_id!r} is already registered")
    token = new_node_token(body.node_id)
    session.add(
        Node(
            node_id=body.node_id,
            region=body.region,
            token_hash=hash_token(token),
            created_at=utcnow(),
            last_seen_at=None,
            revoked_at=None,
            last_model_version=None,
        )
    )
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent registration of the same id
        session.rollback()
        raise Conflict(f"node {body.node_id!r} is already registered") from exc
    return NodeCredentials(node_id=body.node_id, region=body.region, token=token)


def node_info(node: Node) -> NodeInfo:
    return NodeInfo(
        node_id=node.node_id,
        region=node.region,
        created_at=node.created_at,
        last_seen_at=node.last_seen_at,
        revoked=node.revoked_at is not None,
        last_model_version=node.last_model_version,
    )


def list_nodes(session: Session) -> list[NodeInfo]:
    return [node_info(n) for n in session.scalars(select(Node).order_by(Node.node_id))]


def revoke_node(session: Session, settings: CoordinatorSettings, node_id: str) -> NodeInfo:
    node = session.get(Node, node_id)
    if node is None:
        raise NotFound(f"no node {node_id!r}")
    if node.revoked_at is None:
        # Under the open round's row lock, which uploads and closes hold while they store
        # or aggregate: a revoke never lands in the middle of either.
        open_round = select(Round).where(Round.state == "open").with_for_update()
        r = session.scalars(open_round).first()
        if r is None:
            # PostgreSQL: a close we waited on may have committed the next round, which
            # the first statement's snapshot cannot see; a new statement does.
            r = session.scalars(open_round).first()
        node.revoked_at = utcnow()
        if r is not None:
            # A revoked node may be compromised: its update to the open round no longer counts.
            session.execute(
                delete(Update).where(Update.node_id == node_id, Update.round_id == r.id)
            )
            if settings.secure_aggregation:
                forget_revoked_node(session, settings, r, node_id, utcnow())
        session.commit()
    return node_info(node)


def touch_node(session: Session, node: Node, model_version: int | None = None) -> None:
    """Record that the node was seen (and which version it fetched)."""
    node.last_seen_at = utcnow()
    if model_version is not None:
        node.last_model_version = model_version
    session.commit()
