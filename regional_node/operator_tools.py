"""What operators get on top of the node's API: offline /docs and /metrics."""

from __future__ import annotations

from fastapi import FastAPI

from regional_node.observability import install_node_observability
from regional_node.participation import NodeRuntime
from shared.docs_offline import install_offline_docs


def install_operator_tools(app: FastAPI, runtime: NodeRuntime) -> None:
    """Call once in `create_app` (the app must be created with docs_url=None, redoc_url=None)."""
    install_offline_docs(app)
    install_node_observability(app, runtime)
