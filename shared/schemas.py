"""Wire schemas shared by the coordinator, the regional nodes and the CLI.

Only public product data, model metadata, counts and aggregate metrics are
described here: no schema in this module carries a user id across regions
except the node-local storefront API (`EventIn`, `RecommendRequest`), which
never leaves its region.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import JsonDict

from shared.privacy_schemas import PrivacyStatus

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
EventType = Literal["view", "click", "add_to_cart", "purchase"]

IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$"
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN)]


def storable_text(value: str) -> str:
    """A text as given, or ValueError when a database cannot store it: a NUL character
    (PostgreSQL text cannot hold one, SQLite can: both refuse it alike, as a 422) or a
    lone surrogate such as JSON's "\ud800" (not encodable as UTF-8)."""
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return value


# Free text stored as it is (a title, a tag): anything a database can store.
Text = Annotated[str, AfterValidator(storable_text)]

# A country code as events carry it (normalised first): letters, digits, '-'.
COUNTRY_PATTERN = r"^[A-Z0-9][A-Z0-9\-]*$"
_COUNTRY_RE = re.compile(COUNTRY_PATTERN)
COUNTRY_MAX_LENGTH = 8


def attribute_value(value: str) -> str | None:
    """A category, material or gemstone as the catalog stores it and filters compare it:
    surrounding blanks dropped, lower case; blank is missing (None)."""
    return value.strip().lower() or None


def normalize_country(value: str) -> str | None:
    """A country as storefronts write it -> the stored code, or None when blank.

    Upper-cased, dots dropped, blanks and '_' as '-' ("u.k." -> "UK", "gb eng" ->
    "GB-ENG"). ValueError when what is left is not letters, digits and '-' (a NUL
    character, say, which PostgreSQL text cannot hold) or is longer than 8.
    """
    code = "-".join(value.upper().replace(".", "").replace("_", " ").split()).strip("-")
    if not code:
        return None
    if len(code) > COUNTRY_MAX_LENGTH or not _COUNTRY_RE.match(code):
        raise ValueError(
            f"country {value!r} is not a code of letters, digits and '-' of at most "
            f"{COUNTRY_MAX_LENGTH} characters"
        )
    return code


def _as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC, and the API says so."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class ErrorBody(BaseModel):
    """Every 4xx answer of both services has this shape."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "invalid bearer token"}]})

    detail: str | list[dict[str, object]] = Field(description="What was wrong with the request.")


CATALOG_ITEM_EXAMPLE: JsonDict = {
    "item_id": "R-1001",
    "title": "Solitaire ring",
    "category": "ring",
    "material": "platinum",
    "gemstone": "diamond",
    "style_tags": ["classic", "bridal"],
    "price_usd": 2450.0,
}


class CatalogItem(BaseModel):
    """One product. Only `item_id` is required: real catalogs are incomplete."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [CATALOG_ITEM_EXAMPLE]}
    )

    item_id: Identifier
    title: Text | None = Field(default=None, max_length=512)
    category: Text | None = Field(default=None, max_length=64)
    material: Text | None = Field(default=None, max_length=64)
    gemstone: Text | None = Field(default=None, max_length=64)
    style_tags: list[Annotated[Text, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    price_usd: float | None = Field(default=None, ge=0, le=10_000_000)

    @field_validator("title", mode="before")
    @classmethod
    def _blank_is_missing(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("category", "material", "gemstone", mode="before")
    @classmethod
    def _attribute(cls, value: object) -> object:
        return attribute_value(value) if isinstance(value, str) else value

    @field_validator("style_tags")
    @classmethod
    def _norm_tags(cls, value: list[str]) -> list[str]:
        seen: list[str] = []
        for tag in value:
            t = tag.strip().lower()
            if t and t not in seen:
                seen.append(t)
        return seen


def as_utc(value: datetime, what: str = "timestamp") -> datetime:
    """Aware UTC (naive = UTC). ValueError when the instant is out of range in UTC
    (0001-01-01T00:00:00+01:00 is before year 1 there)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{what} out of range in UTC") from None


# How far past the receiving node's clock an event may be dated: a storefront clock a
# little ahead is accepted; one event dated years ahead would move the regional
# insights' window past every real event.
MAX_EVENT_FUTURE = timedelta(days=1)


def future_timestamp_problem(value: datetime, now: datetime | None = None) -> str | None:
    """Why an event time cannot be stored (too far in the future), or None."""
    limit = (now or datetime.now(UTC)) + MAX_EVENT_FUTURE
    if value > limit:
        return (
            f"timestamp {value.isoformat()} is in the future (more than a day after "
            f"{limit - MAX_EVENT_FUTURE:%Y-%m-%dT%H:%M:%SZ}, the node's clock)"
        )
    return None


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
    timestamp: datetime = Field(
        description="ISO 8601 (naive = UTC) or Unix seconds; at most a day past the node's clock."
    )
    country: str | None = Field(
        default=None,
        max_length=COUNTRY_MAX_LENGTH,
        pattern=COUNTRY_PATTERN,
        description="ISO-style country code; 'u.k.' is stored as 'UK', 'gb eng' as 'GB-ENG'.",
    )

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        value = as_utc(value)
        problem = future_timestamp_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("country", mode="before")
    @classmethod
    def _country(cls, value: object) -> object:
        return normalize_country(value) if isinstance(value, str) else value


class NodeRegistration(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"node_id": "eu-1", "region": "EU"}]},
    )

    node_id: Identifier
    region: Identifier


class NodeCredentials(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "node_id": "eu-1",
                    "region": "EU",
                    "token": "eu-1.Zq3v9mJ4cXy1kP0wT2rB8sN6dF5gH7jL0aE3uI9oW1Q",
                }
            ]
        }
    )

    node_id: str
    region: str
    token: str = Field(description="Shown once. The coordinator keeps only its hash.")


class NodeInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "node_id": "eu-1",
                    "region": "EU",
                    "created_at": "2026-11-20T09:00:00Z",
                    "last_seen_at": "2026-11-25T22:29:52Z",
                    "revoked": False,
                    "last_model_version": 3,
                }
            ]
        }
    )

    node_id: str
    region: str
    created_at: UtcDatetime
    last_seen_at: UtcDatetime | None
    revoked: bool
    last_model_version: int | None = None


class CatalogInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": 2500,
                    "active_items": 2480,
                    "catalog_version": 2,
                    "added": 40,
                    "updated": 12,
                    "deactivated": 20,
                }
            ]
        }
    )

    items: int
    active_items: int
    catalog_version: int
    added: int = 0
    updated: int = 0
    deactivated: int = 0


class CatalogOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "catalog_version": 2,
                    "items": [CATALOG_ITEM_EXAMPLE],
                    "inactive_item_ids": ["R-0999"],
                }
            ]
        }
    )

    catalog_version: int
    items: list[CatalogItem]
    inactive_item_ids: list[str] = Field(
        default_factory=list,
        description="Items no longer sold; they keep their model rows but are never recommended.",
    )


ModelStatus = Literal["candidate", "active", "retired"]


class ModelVersionOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": 3,
                    "created_at": "2026-11-25T22:29:50Z",
                    "round_id": 2,
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "size_bytes": 512345,
                    "status": "active",
                    "config": {"num_items": 2500, "embedding_dim": 48, "seed": 0},
                    "metrics": {
                        "train_loss": 3.91,
                        "hr@10": 0.21,
                        "ndcg@10": 0.11,
                        "num_examples": 5400.0,
                        "num_updates": 3.0,
                    },
                    "num_items": 2500,
                }
            ]
        }
    )

    version: int
    created_at: UtcDatetime
    round_id: int | None
    sha256: str
    size_bytes: int
    status: ModelStatus
    config: dict[str, object]
    metrics: dict[str, float]
    num_items: int


RoundState = Literal["open", "closed"]


class RoundOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "round_id": 3,
                    "base_version": 3,
                    "state": "open",
                    "created_at": "2026-11-25T22:29:50Z",
                    "deadline": "2026-11-25T22:34:50Z",
                    "closed_at": None,
                    "result_version": None,
                    "updates_received": 1,
                    "min_updates": 3,
                    "target_updates": 3,
                    "participants": ["eu-1"],
                }
            ]
        }
    )

    round_id: int
    base_version: int
    state: RoundState
    created_at: UtcDatetime
    deadline: UtcDatetime
    closed_at: UtcDatetime | None
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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "round_id": 3,
                    "node_id": "eu-1",
                    "num_examples": 1800,
                    "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
                    "accepted_at": "2026-11-25T22:30:12Z",
                    "updates_received": 2,
                    "duplicate": False,
                }
            ]
        }
    )

    round_id: int
    node_id: str
    num_examples: int
    sha256: str
    accepted_at: UtcDatetime
    updates_received: int
    duplicate: bool = Field(
        default=False, description="True when this exact update had already been accepted."
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u-42",
                    "model_version": 3,
                    "strategy": "model",
                    "items": [
                        {"item_id": "R-1001", "score": 7.25},
                        {"item_id": "N-2040", "score": 6.9},
                    ],
                }
            ]
        }
    )

    user_id: str | None
    model_version: int | None
    strategy: Literal["model", "popularity"]
    items: list[RecommendedItem]


class NodeStatus(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "node_id": "eu-1",
                    "region": "EU",
                    "model_version": 3,
                    "model_personalized": True,
                    "model_fine_tuned": True,
                    "last_round_joined": 2,
                    "event_count": 184220,
                    "coordinator_reachable": True,
                    "last_error": None,
                    "training": False,
                    "consecutive_failures": 0,
                    "next_retry_seconds": None,
                }
            ]
        }
    )

    node_id: str
    region: str
    model_version: int | None
    model_personalized: bool = Field(
        default=False,
        description="The served weights are model_version fine-tuned on this region's events "
        "(NODE_PERSONALIZE); false: the global version as published.",
    )
    model_fine_tuned: bool = Field(
        default=False,
        description="Personalized by the node's own fine-tune job (NODE_PERSONALIZE_EPOCHS, "
        "between rounds); false with model_personalized: the model this node trained in its "
        "last round, served until that job has run.",
    )
    last_round_joined: int | None
    last_round_skipped: int | None = Field(
        default=None,
        description="The newest open round this node left without sending an update "
        "(secure aggregation: its key was refused because the cohort was sealed without "
        "it or the round closed, or the masking gave up: the round closed or was redone, "
        "or the cohort did not seal in time); such a round is not retried.",
    )
    last_round_skipped_reason: str | None = Field(
        default=None, description="Why last_round_skipped was left."
    )
    event_count: int
    coordinator_reachable: bool
    last_error: str | None
    training: bool
    consecutive_failures: int
    next_retry_seconds: float | None
    privacy: PrivacyStatus | None = None


class EventsAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"received": 3, "inserted": 2, "duplicates": 1, "unknown_item_ids": []}]
        }
    )

    received: int
    inserted: int
    duplicates: int
    unknown_item_ids: list[str] = Field(
        default_factory=list,
        description="Item ids not in the node's copy of the catalog; stored, used once known.",
    )


def utcnow() -> datetime:
    return datetime.now(UTC)
