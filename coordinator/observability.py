"""The coordinator's own Prometheus metrics: rounds, updates, aggregation time."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.models import Round
from shared.observability import install_observability

UPDATES_ROUTE = "/v1/rounds/{round_id}/updates"

# Why an update was refused, by the status code the API answered with (see the endpoint).
REJECTION_REASONS = {
    401: "unauthorized",
    403: "forbidden",
    404: "no_such_round",
    409: "conflict",
    413: "too_large",
    422: "invalid",
}


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.rounds_closed = Counter(
            "fedjewel_rounds_closed_total",
            "Training rounds closed by aggregation, by why they closed (target or deadline).",
            ["reason"],
            registry=registry,
        )
        self.updates = Counter(
            "fedjewel_updates_total",
            "Weight updates submitted by nodes: accepted (including idempotent retries) or "
            "rejected, with the reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        self.aggregation_seconds = Histogram(
            "fedjewel_aggregation_duration_seconds",
            "Time to close a round: aggregate its updates, store the new version, open the next.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )

    def on_response(self, *, method: str, route: str, status: int, seconds: float) -> None:
        if method != "POST" or route != UPDATES_ROUTE:
            return
        if 200 <= status < 300:
            self.updates.labels(outcome="accepted", reason="ok").inc()
        else:
            reason = REJECTION_REASONS.get(status, f"http_{status}")
            self.updates.labels(outcome="rejected", reason=reason).inc()

    def round_closed(self, session: Session, version: int, seconds: float) -> None:
        """Record a close that produced `version` (its reason is read back from the round)."""
        reason = session.scalar(select(Round.close_reason).where(Round.result_version == version))
        self.rounds_closed.labels(reason=reason or "unknown").inc()
        self.aggregation_seconds.observe(seconds)


def install_coordinator_observability(app: FastAPI) -> CoordinatorMetrics:
    metrics = CoordinatorMetrics(CollectorRegistry(auto_describe=True))
    install_observability(
        app, service="coordinator", registry=metrics.registry, hooks=[metrics.on_response]
    )
    app.state.coordinator_metrics = metrics
    return metrics
