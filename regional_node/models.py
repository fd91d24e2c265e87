"""The node's private tables. Nothing here ever leaves the region."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.db import NAMING_CONVENTION


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True)}


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("user_id", "item_id", "event_type", "ts", name="uq_events_natural_key"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    item_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(16))
    ts: Mapped[datetime]
    country: Mapped[str | None] = mapped_column(String(8))


class Participation(Base):
    """Rounds this node submitted to, so a restart does not train the same round twice."""

    __tablename__ = "participation"

    round_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    base_version: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    num_examples: Mapped[int] = mapped_column(BigInteger)
    submitted_at: Mapped[datetime]


class PrivacyLedger(Base):
    """One row per differentially private release (a noisy update), for the accountant."""

    __tablename__ = "privacy_ledger"

    round_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sampling_rate: Mapped[float] = mapped_column(Float)
    # Subsampled Gaussian mechanisms this release composed (1 for DP-FedAvg; a round of
    # node-side DP-SGD is one per step).
    steps: Mapped[int] = mapped_column(Integer, server_default="1")
    released_at: Mapped[datetime]


class ServedSnapshot(Base):
    """The global version the node last served and the catalog it served it on (one row),
    so a node restarted while the coordinator is unreachable serves them at once instead
    of unfiltered popularity. Public data only: the coordinator's weights and catalog."""

    __tablename__ = "served_snapshot"

    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    config: Mapped[str] = mapped_column(Text)  # ModelConfig as JSON
    weights: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors, as downloaded
    catalog: Mapped[bytes] = mapped_column(LargeBinary)  # CatalogOut as JSON
    catalog_etag: Mapped[str | None] = mapped_column(String(256))
    saved_at: Mapped[datetime]


class NodeSecret(Base):
    """Random secrets the node makes for itself and never sends anywhere (for example the
    key of its insights noise: `regional_node/insights.py`)."""

    __tablename__ = "node_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
