"""Wire schemas of the privacy features: secure aggregation and the node's privacy status."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# A revealed pairwise seed: 32 bytes as 64 hex characters, nothing between them.
SEED_HEX_PATTERN = r"^[0-9a-fA-F]{64}$"


class PublicKeyIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"public_key": "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="}]
        }
    )

    public_key: str = Field(
        min_length=44, max_length=44, description="Raw 32-byte X25519 public key, base64."
    )


class CohortMember(BaseModel):
    node_id: str
    public_key: str


class SecAggState(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "round_id": 7,
                    "round_state": "open",
                    "sealed": True,
                    "cohort": [
                        {
                            "node_id": "eu-1",
                            "public_key": "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=",
                        },
                        {
                            "node_id": "na-1",
                            "public_key": "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
                        },
                    ],
                    "keys_received": 2,
                    "submitted": ["eu-1"],
                    "dropped": [],
                    "revealed_by": [],
                }
            ]
        }
    )

    round_id: int
    round_state: Literal["open", "closed"]
    sealed: bool = Field(description="True once the cohort is fixed; nodes mask against it.")
    cohort: list[CohortMember]
    keys_received: int
    submitted: list[str]
    dropped: list[str] = Field(description="Cohort members declared dropped (recovery).")
    revealed_by: list[str] = Field(description="Survivors that revealed their seeds.")


class SeedRevealIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"seeds": {"na-1": "0f" * 32}}]})

    seeds: dict[str, Annotated[str, Field(pattern=SEED_HEX_PATTERN)]] = Field(
        description="Dropped node id -> the 32-byte pairwise seed shared with it, as 64 hex "
        "characters (no separators)."
    )


class PrivacyStatus(BaseModel):
    dp_enabled: bool
    dp_algorithm: str | None = Field(
        default=None, description="fedavg (DP-FedAvg) or dpsgd (node-side DP-SGD)."
    )
    dp_epsilon: float | None = Field(description="Epsilon spent so far at dp_delta (RDP).")
    dp_delta: float | None
    dp_epsilon_budget: float | None
    dp_noise_multiplier: float | None
    dp_clip_norm: float | None = Field(description="L2 clip of one user's contribution.")
    dp_sampling_rate: float | None = Field(default=None, description="Poisson rate of users.")
    dp_releases: int = Field(description="Noisy updates released so far.")
    dp_steps: int = Field(
        default=0, description="Noisy steps the accountant composed (one a release for fedavg)."
    )
    training_refused: str | None = Field(description="Why the node does not train, if so.")
    secure_aggregation: bool
    insights_pushed_at: datetime | None
