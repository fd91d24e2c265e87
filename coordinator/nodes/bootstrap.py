"""Pre-shared node credentials from configuration (`COORDINATOR_BOOTSTRAP_NODES`).

Registration over HTTP shows a node's token once, which a declarative
deployment (docker compose, Kubernetes) cannot pass on to the node. Instead the
operator puts one secret per node in both services' configuration: the
coordinator registers `node_id` with the hash of `"<node_id>.<secret>"` at
start-up, and the node uses `NODE_TOKEN=<node_id>.<secret>`. Applying the list
is idempotent; a changed secret rotates the node's token; a revoked node stays
revoked.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from coordinator.db import Database
from coordinator.models import Node
from coordinator.security import hash_token
from shared.schemas import NodeRegistration, utcnow

MIN_SECRET_LENGTH = 16


@dataclass(frozen=True)
class BootstrapNode:
    node_id: str
    region: str
    secret: str

    @property
    def token(self) -> str:
        return f"{self.node_id}.{self.secret}"


def parse_bootstrap_nodes(spec: str) -> list[BootstrapNode]:
    """`"eu-1:EU:secret,na-1:NA:secret"` -> nodes. Raises ValueError on a malformed entry."""
    nodes: list[BootstrapNode] = []
    seen: set[str] = set()
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3:
            raise ValueError(
                f"bootstrap node {entry.split(':')[0]!r}: expected node_id:region:secret"
            )
        node_id, region, secret = (p.strip() for p in parts)
        NodeRegistration(node_id=node_id, region=region)  # same id rules as POST /v1/nodes
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"bootstrap node {node_id!r}: secret shorter than {MIN_SECRET_LENGTH} characters"
            )
        if not all(" " <= c <= "~" and c != "." for c in secret):
            # The token is "<node_id>.<secret>", split at its last '.': a '.' in the secret
            # registered a node whose token never authenticated. Control and non-ASCII
            # characters cannot travel in an Authorization header (inner blanks can).
            raise ValueError(
                f"bootstrap node {node_id!r}: the secret may only hold printable ASCII "
                "characters other than '.'"
            )
        if node_id in seen:
            raise ValueError(f"bootstrap node {node_id!r} listed twice")
        seen.add(node_id)
        nodes.append(BootstrapNode(node_id=node_id, region=region, secret=secret))
    return nodes


def apply_bootstrap_nodes(session: Session, nodes: list[BootstrapNode]) -> None:
    """Register missing nodes, update region and token of existing ones; one transaction."""
    for spec in nodes:
        node = session.get(Node, spec.node_id)
        token_hash = hash_token(spec.token)
        if node is None:
            session.add(
                Node(
                    node_id=spec.node_id,
                    region=spec.region,
                    token_hash=token_hash,
                    created_at=utcnow(),
                    last_seen_at=None,
                    revoked_at=None,
                    last_model_version=None,
                )
            )
        else:
            node.region = spec.region
            node.token_hash = token_hash
    session.commit()


def bootstrap_from_settings(db: Database, spec: str) -> None:
    """Apply `COORDINATOR_BOOTSTRAP_NODES` (no-op when empty)."""
    nodes = parse_bootstrap_nodes(spec)
    if nodes:
        with db.sessions() as session:
            apply_bootstrap_nodes(session, nodes)
