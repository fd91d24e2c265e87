"""Node tokens: random, shown once, stored as sha256, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


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
