"""The coordinator's tables (SQLAlchemy 2 typed models). Schema changes go through Alembic."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column

from shared.db import NAMING_CONVENTION


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Node(Base):
    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    region: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_model_version: Mapped[int | None]


class CatalogRevision(Base):
    """One row per catalog upload: the catalog's version number and what changed."""

    __tablename__ = "catalog_revisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime]
    added: Mapped[int]
    updated: Mapped[int]
    deactivated: Mapped[int]
    total_items: Mapped[int]


class CatalogItemRow(Base):
    """`row` is the item's permanent row in the model's item table; it never changes."""

    __tablename__ = "catalog_items"

    row: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    item_id: Mapped[str] = mapped_column(String(128), unique=True)
    title: Mapped[str | None] = mapped_column(String(512))
    category: Mapped[str | None] = mapped_column(String(64))
    material: Mapped[str | None] = mapped_column(String(64))
    gemstone: Mapped[str | None] = mapped_column(String(64))
    style_tags: Mapped[list[str]] = mapped_column(JSON)
    price_usd: Mapped[float | None] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    revision: Mapped[int] = mapped_column(ForeignKey("catalog_revisions.id"))


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime]
    round_id: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), index=True)
    num_items: Mapped[int]


class ModelVersionChunk(Base):
    """A version's serialized weights, in order of `seq` (migration 0003).

    Written slice by slice as the new version is serialized, so the coordinator never
    holds the whole serialized model (nor the driver a copy of it as one parameter);
    read back slice by slice for downloads and loads. Slices are at most
    `WEIGHT_CHUNK_BYTES`, except versions moved here from before 0003 (one slice each).
    """

    __tablename__ = "model_version_chunks"

    version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ServerOptimizerState(Base):
    """The server optimizer's state after the round that made `version` (migration 0004).

    FedAdam's first and second moments (COORDINATOR_SERVER_OPTIMIZER=adam) as one
    safetensors file (`m.<name>`, `v.<name>`). A round on base version b continues
    from b's row (zeros when b has none, e.g. the initial model or one made before the
    optimizer was turned on), so promoting an older version also rolls the moments back.
    """

    __tablename__ = "server_optimizer_states"

    version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"), primary_key=True)
    optimizer: Mapped[str] = mapped_column(String(16))
    state: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class Round(Base):
    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    base_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime]
    deadline: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    result_version: Mapped[int | None]
    close_reason: Mapped[str | None] = mapped_column(String(64))


class Update(Base):
    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("round_id", "node_id", name="uq_updates_round_node"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"))
    base_version: Mapped[int]
    num_examples: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    encoding: Mapped[str] = mapped_column(String(32), default="dense")
    payload: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


# --- privacy: secure aggregation and regional insights (migration 0002_privacy) ---------


class SecAggRound(Base):
    """A round's secure-aggregation state: the sealed cohort and the nodes that dropped."""

    __tablename__ = "secagg_rounds"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    cohort: Mapped[list[str] | None] = mapped_column(JSON)  # None until sealed
    sealed_at: Mapped[datetime | None]
    dropped: Mapped[list[str] | None] = mapped_column(JSON)  # None until recovery starts
    recovery_deadline: Mapped[datetime | None]


class SecAggKey(Base):
    """A node's X25519 public key for one round (raw 32 bytes, base64)."""

    __tablename__ = "secagg_keys"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class SecAggReveal(Base):
    """A survivor's pairwise seed with a dropped node, revealed to unmask the sum."""

    __tablename__ = "secagg_reveals"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"), primary_key=True)
    dropped_node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seed_hex: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class RegionInsight(Base):
    """The latest aggregate statistics a node pushed (thresholded on the node)."""

    __tablename__ = "region_insights"

    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"), primary_key=True)
    region: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[datetime]
    report: Mapped[dict[str, Any]]
