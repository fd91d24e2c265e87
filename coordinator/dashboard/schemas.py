"""The dashboard's JSON: public, read-only operational data (no tokens, no hashes, no users)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.schemas import ModelStatus, RoundState

NodeHealth = Literal["healthy", "stale", "never_seen", "revoked"]


class DashboardVersion(BaseModel):
    version: int
    status: ModelStatus
    created_at: datetime
    round_id: int | None = Field(description="The round that produced it (none for version 1).")
    num_items: int
    size_bytes: int
    metrics: dict[str, float] = Field(
        description="Example-weighted means of the nodes' reports: `train_loss`, `hr@10` "
        "(held-out HR@10 of the round's base model), `ndcg@10`, `num_examples` ..."
    )


class DashboardRound(BaseModel):
    round_id: int
    state: RoundState
    base_version: int
    result_version: int | None
    created_at: datetime
    closed_at: datetime | None
    duration_seconds: float | None = Field(description="closed_at - created_at; open: none.")
    close_reason: str | None = Field(
        description="target, deadline, superseded, not_finite (no version: the aggregate "
        "overflowed; the round is redone) or (secure aggregation) secagg_failed."
    )
    participants: list[str]
    num_examples: int = Field(description="Training examples behind the round's updates.")


class DashboardNode(BaseModel):
    node_id: str
    region: str
    last_seen_at: datetime | None
    seconds_since_seen: float | None
    last_model_version: int | None = Field(description="Newest version the node downloaded.")
    health: NodeHealth


class DashboardSummary(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "generated_at": "2026-11-25T22:30:00Z",
                    "active_version": 3,
                    "current_round_id": 3,
                    "stale_after_seconds": 600.0,
                    "versions": [
                        {
                            "version": 3,
                            "status": "active",
                            "created_at": "2026-11-25T22:29:50Z",
                            "round_id": 2,
                            "num_items": 2500,
                            "size_bytes": 512345,
                            "metrics": {"train_loss": 3.91, "hr@10": 0.21, "num_updates": 3},
                        }
                    ],
                    "rounds": [
                        {
                            "round_id": 2,
                            "state": "closed",
                            "base_version": 2,
                            "result_version": 3,
                            "created_at": "2026-11-25T22:29:20Z",
                            "closed_at": "2026-11-25T22:29:50Z",
                            "duration_seconds": 30.0,
                            "close_reason": "target",
                            "participants": ["eu-1", "me-1", "na-1"],
                            "num_examples": 5400,
                        }
                    ],
                    "nodes": [
                        {
                            "node_id": "eu-1",
                            "region": "EU",
                            "last_seen_at": "2026-11-25T22:29:52Z",
                            "seconds_since_seen": 8.0,
                            "last_model_version": 3,
                            "health": "healthy",
                        }
                    ],
                }
            ]
        }
    )

    generated_at: datetime
    active_version: int | None
    current_round_id: int | None
    stale_after_seconds: float = Field(
        description="A node not seen for longer than this is shown as stale."
    )
    versions: list[DashboardVersion] = Field(description="Newest first.")
    rounds: list[DashboardRound] = Field(description="Newest first.")
    nodes: list[DashboardNode]
