"""FastAPI dependencies, gathered in one place (Annotated aliases)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from coordinator.db import Database
from coordinator.models import Node
from coordinator.security import admin_token_matches, node_id_of, token_matches
from coordinator.settings import CoordinatorSettings
from shared.errors import Forbidden, Unauthorized
from shared.schemas import IDENTIFIER_PATTERN


def get_settings(request: Request) -> CoordinatorSettings:
    settings: CoordinatorSettings = request.app.state.settings
    return settings


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_session(db: Annotated[Database, Depends(get_db)]) -> Iterator[Session]:
    with db.sessions() as session:
        yield session


SettingsDep = Annotated[CoordinatorSettings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_db)]
SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="Admin token or a node token.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or not creds.credentials:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return creds.credentials


def _node_for_token(session: Session, token: str) -> Node | None:
    node_id = node_id_of(token)
    node = session.get(Node, node_id) if node_id else None
    # End the lookup's transaction now (the node stays loaded: no expiry on commit). On
    # SQLite it began with BEGIN IMMEDIATE, the write lock, and an update upload streams
    # its body only after this: every other request would wait for a slow uploader.
    session.commit()
    if node is None or not token_matches(token, node.token_hash):
        return None
    return node


def require_admin(creds: BearerDep, settings: SettingsDep, session: SessionDep) -> None:
    token = _token(creds)
    if settings.admin_token and admin_token_matches(token, settings.admin_token):
        return
    if _node_for_token(session, token) is not None:
        raise Forbidden("this endpoint needs the admin token; a node token is not enough")
    if not settings.admin_token:
        raise Forbidden("admin API disabled: set COORDINATOR_ADMIN_TOKEN")
    raise Unauthorized("invalid bearer token")


def require_node(creds: BearerDep, settings: SettingsDep, session: SessionDep) -> Node:
    token = _token(creds)
    node = _node_for_token(session, token)
    if node is None:
        if settings.admin_token and admin_token_matches(token, settings.admin_token):
            raise Forbidden("this endpoint needs a node token, not the admin token")
        raise Unauthorized("invalid bearer token")
    if node.revoked_at is not None:
        raise Forbidden(f"node {node.node_id!r} has been revoked")
    return node


def require_reader(creds: BearerDep, settings: SettingsDep, session: SessionDep) -> Node | None:
    """Admin (None) or any non-revoked node (the node), e.g. for model weights."""
    token = _token(creds)
    if settings.admin_token and admin_token_matches(token, settings.admin_token):
        return None
    node = _node_for_token(session, token)
    if node is None:
        raise Unauthorized("invalid bearer token")
    if node.revoked_at is not None:
        raise Forbidden(f"node {node.node_id!r} has been revoked")
    return node


AdminDep = Annotated[None, Depends(require_admin)]
NodeDep = Annotated[Node, Depends(require_node)]
ReaderDep = Annotated[Node | None, Depends(require_reader)]


# Ids in paths fit the database's INTEGER columns (a larger number is a 422, not a 500).
MAX_DB_ID = 2**31 - 1
RoundIdPath = Annotated[int, Path(ge=1, le=MAX_DB_ID, description="A round id.")]
VersionPath = Annotated[int, Path(ge=1, le=MAX_DB_ID, description="A model version number.")]
NodeIdPath = Annotated[
    str,
    Path(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN, description="A node id."),
]


def etag_matches(if_none_match: str | None, etag: str, *also: str) -> bool:
    """Whether an If-None-Match header matches the current ETag (RFC 9110 13.1.2: a
    comma-separated list, weak comparison, `*` matches anything). `also`: other
    spellings accepted for the same representation."""
    if if_none_match is None:
        return False
    wanted = {etag, *also}
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") in wanted:
            return True
    return False
