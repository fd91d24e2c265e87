"""What operators get on top of the API: the dashboard, offline /docs and /metrics."""

from __future__ import annotations

from fastapi import FastAPI

from coordinator.dashboard.endpoints import install_dashboard
from coordinator.observability import install_coordinator_observability
from shared.docs_offline import install_offline_docs


def install_operator_tools(app: FastAPI) -> None:
    """Call once in `create_app` (the app must be created with docs_url=None, redoc_url=None)."""
    install_dashboard(app)
    install_offline_docs(app)
    install_coordinator_observability(app)
