"""The coordinator's database: one engine per process, sessions per request."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_session_factory, upgrade_to_head


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)

    def migrate(self) -> None:
        upgrade_to_head("coordinator", self.url)

    def dispose(self) -> None:
        self.engine.dispose()
