"""Coordinator settings, read once from the environment (prefix `COORDINATOR_`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

AggregationStrategy = Literal["fedavg", "fedavg_rows", "clipped", "trimmed_mean", "median", "krum"]
# COORDINATOR_AGGREGATION's default; simulate and the benchmarks aggregate the same way.
DEFAULT_AGGREGATION: AggregationStrategy = "fedavg"


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
    max_rounds: int | None = Field(
        default=None,
        ge=1,
        description="Open no round after this many (demos, experiments); unset = run forever. "
        "Raised or unset later, training resumes on the active version at the next start.",
    )
    round_check_seconds: float = Field(default=0.5, gt=0)
    max_update_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    max_num_examples: int = Field(default=100_000_000, ge=1)
    aggregation: AggregationStrategy = Field(
        default=DEFAULT_AGGREGATION,
        description=(
            "fedavg: plain sample-weighted mean, a top-k update counted only in the rows it "
            "sent (best measured with personalized serving, docs/evaluation.md); "
            "fedavg_rows: FedAvg per embedding row over the nodes that changed the row. Both "
            "stream; the robust rules hold all of a round's updates in memory."
        ),
    )
    server_optimizer: Literal["none", "adam"] = Field(
        default="none",
        description="adam: FedAdam on the round's aggregate, its moments stored per version "
        "(DP-FedSGD, docs/privacy.md); none: the aggregate is the step.",
    )
    server_lr: float = Field(
        default=0.01, gt=0, le=10, description="adam: the server learning rate."
    )
    server_adam_tau: float = Field(
        default=1e-8, gt=0, le=1, description="adam: tau, added to sqrt(v) (Reddi et al.)."
    )
    clip_norm: float | None = Field(
        default=None,
        gt=0,
        description="clipped: L2 bound per update (unset: the round's lower median norm).",
    )
    trim_fraction: float = Field(
        default=0.2, ge=0, lt=0.5, description="trimmed_mean: share dropped at each end."
    )
    krum_byzantine: int = Field(default=1, ge=0, description="krum: tolerated attackers f.")
    krum_selected: int | None = Field(
        default=None, ge=1, description="krum: updates averaged m (unset: k - f; 1 = Krum)."
    )
    aggregation_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        description="TEST ONLY: sleep inside the closing transaction (crash-recovery tests).",
    )
    embedding_dim: int = Field(default=48, ge=4, le=1024)
    model_seed: int = 0
    secure_aggregation: bool = Field(
        default=False,
        description="Accept only pairwise-masked updates (docs/privacy.md); the sum is unmasked, "
        "so aggregation is the plain sample-weighted mean (robust rules are refused).",
    )
    migrate_on_start: bool = True
    bootstrap_nodes: str = Field(
        default="",
        description="Pre-shared node credentials `node_id:region:secret,...`, registered at "
        "start-up; the node then uses NODE_TOKEN=<node_id>.<secret> (see README).",
        repr=False,
    )
    log_json: bool = False
    dashboard_public: bool = Field(
        default=True,
        description="Serve /v1/dashboard/summary without a token (ids, counts, metrics only); "
        "false requires the admin token.",
    )

    @model_validator(mode="after")
    def _target_at_least_min(self) -> CoordinatorSettings:
        if self.target_updates is not None and self.target_updates < self.min_updates:
            raise ValueError("TARGET_UPDATES must be >= MIN_UPDATES")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_sums_only(self) -> CoordinatorSettings:
        # Masked updates can only be summed: a rule that looks at single updates cannot run.
        if self.secure_aggregation and self.aggregation not in ("fedavg", "fedavg_rows"):
            raise ValueError(
                f"COORDINATOR_AGGREGATION={self.aggregation} needs individual updates; with "
                "COORDINATOR_SECURE_AGGREGATION only the sum is visible (use fedavg)"
            )
        return self

    @field_validator("bootstrap_nodes")
    @classmethod
    def _valid_bootstrap_nodes(cls, value: str) -> str:
        from coordinator.nodes.bootstrap import parse_bootstrap_nodes

        parse_bootstrap_nodes(value)
        return value

    @property
    def effective_target_updates(self) -> int:
        return self.target_updates or self.min_updates
