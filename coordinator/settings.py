"""Coordinator settings, read once from the environment (prefix `COORDINATOR_`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

AggregationStrategy = Literal["fedavg", "clipped", "trimmed_mean", "median", "krum"]


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COORDINATOR_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///./fedjewel-coordinator.db",
        description="SQLAlchemy URL; postgresql+psycopg://user@host/db in production.",
    )
    admin_token: str | None = Field(
        default=None, description="Bearer token for admin endpoints; unset disables them."
    )
    min_updates: int = Field(
        default=1, ge=1, description="Updates a round needs; at the deadline it closes with these."
    )
    target_updates: int | None = Field(
        default=None,
        ge=1,
        description="Updates that close a round at once (default: MIN_UPDATES).",
    )
    round_deadline_seconds: float = Field(default=300.0, gt=0)
    round_check_seconds: float = Field(default=0.5, gt=0)
    max_update_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    max_num_examples: int = Field(default=100_000_000, ge=1)
    aggregation: AggregationStrategy = "fedavg"
    embedding_dim: int = Field(default=48, ge=4, le=1024)
    model_seed: int = 0
    secure_aggregation: bool = Field(
        default=False,
        description="Accept only pairwise-masked updates (docs/privacy.md); the sum is unmasked.",
    )
    migrate_on_start: bool = True
    log_json: bool = False

    @model_validator(mode="after")
    def _target_at_least_min(self) -> CoordinatorSettings:
        if self.target_updates is not None and self.target_updates < self.min_updates:
            raise ValueError("TARGET_UPDATES must be >= MIN_UPDATES")
        return self

    @property
    def effective_target_updates(self) -> int:
        return self.target_updates or self.min_updates
