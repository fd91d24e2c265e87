"""Wire schemas shared by the coordinator, the regional nodes and the CLI.

Only public product data, model metadata, counts and aggregate metrics are
described here: no schema in this module carries a user id across regions
except the node-local storefront API (`EventIn`, `RecommendRequest`), which
never leaves its region.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
EventType = Literal["view", "click", "add_to_cart", "purchase"]

Identifier = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$"),
]


class ErrorBody(BaseModel):
    """Every 4xx answer of both services has this shape."""

    detail: str | list[dict[str, object]] = Field(description="What was wrong with the request.")


class CatalogItem(BaseModel):
    """One product. Only `item_id` is required: real catalogs are incomplete."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "item_id": "R-1001",
                    "title": "Solitaire ring",
                    "category": "ring",
                    "material": "platinum",
                    "gemstone": "diamond",
                    "style_tags": ["classic", "bridal"],
                    "price_usd": 2450.0,
                }
            ]
        },
    )

    item_id: Identifier
    title: str | None = Field(default=None, max_length=512)
    category: str | None = Field(default=None, max_length=64)
    material: str | None = Field(default=None, max_length=64)
    gemstone: str | None = Field(default=None, max_length=64)
    style_tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    price_usd: float | None = Field(default=None, ge=0, le=10_000_000)

    @field_validator("category", "material", "gemstone", "title", mode="before")
    @classmethod
    def _blank_is_missing(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("category", "material", "gemstone")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value else value

    @field_validator("style_tags")
    @classmethod
    def _norm_tags(cls, value: list[str]) -> list[str]:
        seen: list[str] = []
        for tag in value:
            t = tag.strip().lower()
            if t and t not in seen:
                seen.append(t)
        return seen


class EventIn(BaseModel):
    """One behaviour event, as a storefront backend posts it to its regional node."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u-42",
                    "item_id": "R-1001",
                    "event_type": "view",
                    "timestamp": "2026-11-20T10:15:00Z",
                    "country": "DE",
                }
            ]
        },
    )

    user_id: Identifier
    item_id: Identifier
    event_type: EventType
    timestamp: datetime
    country: str | None = Field(default=None, max_length=8)

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    @field_validator("country", mode="before")
    @classmethod
    def _country(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().upper()
            return value or None
        return value


class NodeRegistration(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"node_id": "eu-1", "region": "EU"}]},
    )

    node_id: Identifier
    region: Identifier


class NodeCredentials(BaseModel):
    node_id: str
    region: str
    token: str = Field(description="Shown once. The coordinator keeps only its hash.")


class NodeInfo(BaseModel):
    node_id: str
    region: str
    created_at: datetime
    last_seen_at: datetime | None
    revoked: bool
    last_model_version: int | None = None


class CatalogInfo(BaseModel):
    items: int
    active_items: int
    catalog_version: int
    added: int = 0
    updated: int = 0
    deactivated: int = 0


class CatalogOut(BaseModel):
    catalog_version: int
    items: list[CatalogItem]
    inactive_item_ids: list[str] = Field(
        default_factory=list,
        description="Items no longer sold; they keep their model rows but are never recommended.",
    )


ModelStatus = Literal["candidate", "active", "retired"]


class ModelVersionOut(BaseModel):
    version: int
    created_at: datetime
    round_id: int | None
    sha256: str
    size_bytes: int
    status: ModelStatus
    config: dict[str, object]
    metrics: dict[str, float]
    num_items: int


RoundState = Literal["open", "closed"]


class RoundOut(BaseModel):
    round_id: int
    base_version: int
    state: RoundState
    created_at: datetime
    deadline: datetime
    closed_at: datetime | None
    result_version: int | None
    updates_received: int
    min_updates: int
    target_updates: int
    participants: list[str] = Field(default_factory=list)
    supported_encodings: list[str] = Field(
        default_factory=lambda: ["dense"],
        description="Update encodings the coordinator decodes (X-Update-Encoding).",
    )


class UpdateReceipt(BaseModel):
    round_id: int
    node_id: str
    num_examples: int
    sha256: str
    accepted_at: datetime
    updates_received: int
    duplicate: bool = Field(
        default=False, description="True when this exact update had already been accepted."
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    user_id: str | None
    model_version: int | None
    strategy: Literal["model", "popularity"]
    items: list[RecommendedItem]


class NodeStatus(BaseModel):
    node_id: str
    region: str
    model_version: int | None
    last_round_joined: int | None
    event_count: int
    coordinator_reachable: bool
    last_error: str | None
    training: bool
    consecutive_failures: int
    next_retry_seconds: float | None


class EventsAccepted(BaseModel):
    received: int
    inserted: int
    duplicates: int
    unknown_item_ids: list[str] = Field(
        default_factory=list,
        description="Item ids not in the node's copy of the catalog; stored, used once known.",
    )


def utcnow() -> datetime:
    return datetime.now(UTC)
