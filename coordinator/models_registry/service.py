"""Immutable, numbered model versions with the sha256 of their serialized weights."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from coordinator.models import ModelVersion
from shared.db import read_only
from shared.errors import Conflict, NotFound, StoredDataCorrupted
from shared.model import ModelConfig
from shared.schemas import ModelVersionOut, utcnow
from shared.serialization import StateDict, sha256_hex, state_to_buffer, state_views


class WeightCache:
    """A few recently used versions' parsed weights (versions are immutable)."""

    def __init__(self, maxsize: int = 2) -> None:
        self._items: OrderedDict[int, StateDict] = OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def get(self, version: int) -> StateDict | None:
        with self._lock:
            state = self._items.get(version)
            if state is not None:
                self._items.move_to_end(version)
            return state

    def put(self, version: int, state: StateDict) -> None:
        with self._lock:
            self._items[version] = state
            self._items.move_to_end(version)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)


def to_out(v: ModelVersion) -> ModelVersionOut:
    return ModelVersionOut(
        version=v.version,
        created_at=v.created_at,
        round_id=v.round_id,
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        status=v.status,  # type: ignore[arg-type]
        config=dict(v.config),
        metrics={k: float(x) for k, x in (v.metrics or {}).items()},
        num_items=v.num_items,
    )


def get_version(session: Session, version: int) -> ModelVersion:
    row = session.get(ModelVersion, version)
    if row is None:
        raise NotFound(f"no model version {version}")
    return row


def active_version(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.status == "active")
        .order_by(ModelVersion.version.desc())
        .limit(1)
    ).first()


def list_versions(session: Session, limit: int = 100) -> list[ModelVersion]:
    return list(
        session.scalars(select(ModelVersion).order_by(ModelVersion.version.desc()).limit(limit))
    )


def weights_bytes(session: Session, version: int) -> bytes:
    data = session.scalar(select(ModelVersion.weights).where(ModelVersion.version == version))
    if data is None:
        raise NotFound(f"no model version {version}")
    return bytes(data)


WEIGHT_CHUNK_BYTES = 4 * 1024 * 1024


def iter_weights(
    source: Engine | Session, version: int, size: int, chunk_bytes: int = WEIGHT_CHUNK_BYTES
) -> Iterator[bytes]:
    """A version's weights in slices read with SQL `substr` (1-based), one short read each.

    With an Engine (a streamed download), every slice checks a connection out and back
    in, so no connection is held between chunks; versions are immutable, so slices read
    in separate transactions belong to the same blob. With a Session, the slices are
    read on the session's own connection (never a second checkout while holding one).
    """
    for start in range(0, size, chunk_bytes):
        stmt = select(
            func.substr(ModelVersion.weights, start + 1, min(chunk_bytes, size - start))
        ).where(ModelVersion.version == version)
        if isinstance(source, Session):
            chunk = source.scalar(stmt)
        else:
            with read_only(source).connect() as conn:
                chunk = conn.scalar(stmt)
        if chunk is None:
            raise RuntimeError(f"model version {version} vanished while streaming")
        yield bytes(chunk)


def load_state(
    session: Session, version: int, cache: WeightCache | None = None
) -> tuple[StateDict, ModelConfig]:
    """Parse a version's weights, verifying them against the stored sha256."""
    row = get_version(session, version)
    config = ModelConfig.model_validate(row.config)
    if cache is not None and (cached := cache.get(version)) is not None:
        return cached, config
    # Read in slices into one buffer and parse it in place: the model costs one copy.
    data = bytearray(row.size_bytes)
    position = 0
    for chunk in iter_weights(session, version, row.size_bytes):
        data[position : position + len(chunk)] = chunk
        position += len(chunk)
    if sha256_hex(data) != row.sha256:
        raise StoredDataCorrupted(
            f"model version {version}: stored weights do not match their sha256"
        )
    state = state_views(data)
    if cache is not None:
        cache.put(version, state)
    return state, config


def create_version(
    session: Session,
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    *,
    metrics: dict[str, Any],
    round_id: int | None,
    status: str = "active",
    consume_state: bool = False,
) -> ModelVersion:
    """Store a new version; an active one retires the previous active version. No commit."""
    number = int(session.scalar(select(func.coalesce(func.max(ModelVersion.version), 0))) or 0) + 1
    # One preallocated buffer: the model is copied once, not two or three times.
    data = state_to_buffer(state, metadata={"fedjewel_version": str(number)})
    if consume_state:
        state.clear()  # the caller is done with it: free the tensors before the insert
    if status == "active":
        session.execute(
            update(ModelVersion).where(ModelVersion.status == "active").values(status="retired")
        )
    row = ModelVersion(
        version=number,
        created_at=utcnow(),
        round_id=round_id,
        sha256=sha256_hex(data),
        size_bytes=len(data),
        weights=data,
        config=config.model_dump(),
        metrics=metrics,
        status=status,
        num_items=config.num_items,
    )
    session.add(row)
    session.flush()
    return row


def promote(session: Session, version: int) -> ModelVersion:
    """Make `version` the active one (promotion of a candidate, or a rollback). No commit."""
    row = get_version(session, version)
    if row.status == "active":
        raise Conflict(f"model version {version} is already active")
    session.execute(
        update(ModelVersion).where(ModelVersion.status == "active").values(status="retired")
    )
    row.status = "active"
    session.flush()
    return row
