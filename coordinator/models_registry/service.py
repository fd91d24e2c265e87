"""Immutable, numbered model versions with the sha256 of their serialized weights."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.orm import Session

from coordinator.models import ModelVersion, ModelVersionChunk
from shared.db import read_only
from shared.errors import Conflict, NotFound, StoredDataCorrupted
from shared.model import ModelConfig
from shared.schemas import ModelVersionOut, utcnow
from shared.serialization import (
    StateDict,
    iter_slices,
    iter_state_bytes,
    safetensors_header,
    sha256_hex,
    state_views,
)


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


WEIGHT_CHUNK_BYTES = 4 * 1024 * 1024


def _chunk_lengths(source: Engine | Session, version: int) -> list[tuple[int, int]]:
    """(seq, length) of a version's stored slices, in order."""
    stmt = (
        select(ModelVersionChunk.seq, func.length(ModelVersionChunk.data))
        .where(ModelVersionChunk.version == version)
        .order_by(ModelVersionChunk.seq)
    )
    if isinstance(source, Session):
        rows = source.execute(stmt).all()
    else:
        with read_only(source).connect() as conn:
            rows = conn.execute(stmt).all()
    return [(int(seq), int(length)) for seq, length in rows]


def iter_weights(
    source: Engine | Session, version: int, size: int, chunk_bytes: int = WEIGHT_CHUNK_BYTES
) -> Iterator[bytes]:
    """A version's weights, slice by slice, each read at most `chunk_bytes` at a time
    (SQL `substr`, 1-based: a slice moved from before migration 0003 may be large).

    With an Engine (a streamed download), every read checks a connection out and back
    in, so no connection is held between chunks; versions are immutable, so slices read
    in separate transactions belong to the same blob. With a Session, the slices are
    read on the session's own connection (never a second checkout while holding one).
    """
    lengths = _chunk_lengths(source, version)
    if sum(length for _, length in lengths) != size:
        raise RuntimeError(f"model version {version}: stored weights do not add up to its size")
    for seq, length in lengths:
        for start in range(0, length, chunk_bytes):
            stmt = select(
                func.substr(ModelVersionChunk.data, start + 1, min(chunk_bytes, length - start))
            ).where(ModelVersionChunk.version == version, ModelVersionChunk.seq == seq)
            if isinstance(source, Session):
                chunk = source.scalar(stmt)
            else:
                with read_only(source).connect() as conn:
                    chunk = conn.scalar(stmt)
            if chunk is None:
                raise RuntimeError(f"model version {version} vanished while streaming")
            yield bytes(chunk)


def weights_bytes(session: Session, version: int) -> bytes:
    row = get_version(session, version)
    return b"".join(iter_weights(session, version, row.size_bytes))


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
    """Store a new version; an active one retires the previous active version. No commit.

    The weights are serialized straight from `state` into slices of
    `WEIGHT_CHUNK_BYTES`, each inserted as its own row: neither this process nor the
    database driver ever holds the serialized model whole. With `consume_state`, each
    tensor leaves `state` (and memory) once its bytes are written.
    """
    number = int(session.scalar(select(func.coalesce(func.max(ModelVersion.version), 0))) or 0) + 1
    metadata = {"fedjewel_version": str(number)}
    digest = hashlib.sha256()
    for piece in iter_state_bytes(state, metadata):  # zero-copy views: hashing costs no memory
        digest.update(piece)
    if status == "active":
        session.execute(
            update(ModelVersion).where(ModelVersion.status == "active").values(status="retired")
        )
    row = ModelVersion(
        version=number,
        created_at=utcnow(),
        round_id=round_id,
        sha256=digest.hexdigest(),
        size_bytes=safetensors_header(state, metadata).size,
        config=config.model_dump(),
        metrics=metrics,
        status=status,
        num_items=config.num_items,
    )
    session.add(row)
    session.flush()
    pieces = iter_state_bytes(state, metadata, consume=consume_state)
    for seq, data in enumerate(iter_slices(pieces, WEIGHT_CHUNK_BYTES)):
        session.execute(insert(ModelVersionChunk).values(version=number, seq=seq, data=data))
        del data
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
