"""Node tokens: random, shown once, stored as sha256, compared in constant time; and
the re-check that a node was not revoked meanwhile."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy.orm import Session

from coordinator.models import Node
from shared.errors import Forbidden


def new_node_token(node_id: str) -> str:
    # The node id prefix lets us look the node up without scanning hashes.
    return f"{node_id}.{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored_hash)


def admin_token_matches(token: str, admin_token: str) -> bool:
    return hmac.compare_digest(token.encode("utf-8"), admin_token.encode("utf-8"))


def node_id_of(token: str) -> str | None:
    node_id, sep, secret = token.rpartition(".")
    return node_id if sep and node_id and secret else None


def refuse_if_revoked(session: Session, node_id: str) -> None:
    """Re-read the node under the round lock the caller holds (a revoke takes it too)
    and refuse it (403, transaction rolled back) if it was revoked after its token was
    checked, while its body streamed in, say."""
    current = session.get(Node, node_id, populate_existing=True)
    if current is None or current.revoked_at is not None:
        session.rollback()
        raise Forbidden(f"node {node_id!r} was revoked")
