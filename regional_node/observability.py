"""The regional node's own Prometheus metrics: model version served, recommendation latency."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Gauge, Histogram

from regional_node.participation import NodeRuntime
from shared.observability import LATENCY_BUCKETS, install_observability

RECOMMEND_ROUTE = "/v1/recommend"


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry, runtime: NodeRuntime) -> None:
        self.registry = registry
        self.model_version = Gauge(
            "fedjewel_node_model_version_served",
            "Global model version this node serves recommendations from (0 = none yet).",
            registry=registry,
        )
        # Read at scrape time: the participation loop swaps `runtime.serving` atomically.
        self.model_version.set_function(
            lambda: float(runtime.serving.version) if runtime.serving is not None else 0.0
        )
        self.recommend_seconds = Histogram(
            "fedjewel_node_recommend_duration_seconds",
            "Latency of GET /v1/recommend, by status code.",
            ["status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def on_response(self, *, method: str, route: str, status: int, seconds: float) -> None:
        if method == "GET" and route == RECOMMEND_ROUTE:
            self.recommend_seconds.labels(status=str(status)).observe(seconds)


def install_node_observability(app: FastAPI, runtime: NodeRuntime) -> NodeMetrics:
    metrics = NodeMetrics(CollectorRegistry(auto_describe=True), runtime)
    install_observability(
        app, service="regional node", registry=metrics.registry, hooks=[metrics.on_response]
    )
    app.state.node_metrics = metrics
    return metrics
