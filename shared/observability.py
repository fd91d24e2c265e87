"""Prometheus metrics and liveness for both services: one registry per app, no global state.

`install_observability(app, service=...)` gives the app a `CollectorRegistry`
(`app.state.metrics_registry`), an ASGI middleware that times every request by route
*template* (`/v1/rounds/{round_id}`, never the raw path) and method (an unknown one is
`OTHER`), so label cardinality stays bounded, a `GET /metrics` endpoint in the
Prometheus text format and `GET /healthz`. Service-specific metrics hook into the same
middleware through `ResponseHook`s (see `coordinator/observability.py`,
`regional_node/observability.py`), so endpoints stay free of metric code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Latency buckets from 1 ms to 60 s: recommendations are milliseconds, uploads seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNMATCHED_ROUTE = "<unmatched>"
# The server takes any token as a method (each answered 405): others share one label.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"


class ResponseHook(Protocol):
    def __call__(self, *, method: str, route: str, status: int, seconds: float) -> None: ...


def route_template(scope: Scope) -> str:
    """The matched route's path template, or a fixed label for unmatched paths (404s)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str) and path:
        return path
    return UNMATCHED_ROUTE


class RequestMetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: streaming bodies pass through untouched)."""

    def __init__(self, app: ASGIApp, *, histogram: Histogram, hooks: list[ResponseHook]) -> None:
        self.app = app
        self.histogram = histogram
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - start
            method = str(scope.get("method", ""))
            if method not in KNOWN_METHODS:
                method = OTHER_METHOD
            route = route_template(scope)
            self.histogram.labels(method=method, route=route, status=str(status)).observe(seconds)
            for hook in self.hooks:
                hook(method=method, route=route, status=status, seconds=seconds)


def install_observability(
    app: FastAPI,
    *,
    service: str,
    registry: CollectorRegistry | None = None,
    hooks: Sequence[ResponseHook] = (),
) -> CollectorRegistry:
    """Add request metrics and `GET /metrics` to `app`.

    Pass the `registry` that already holds the service's own metrics, and `hooks` that
    derive service metrics from responses (called after every request).
    """
    registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
    histogram = Histogram(
        "fedjewel_http_request_duration_seconds",
        "HTTP request latency by route template, method and status code.",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetricsMiddleware, histogram=histogram, hooks=list(hooks))

    @app.get(
        "/metrics",
        tags=["observability"],
        summary="Prometheus metrics",
        description=(
            f"The {service}'s metrics in the Prometheus text exposition format: request "
            "latency by route template, method and status, plus the service's own counters, "
            "gauges and histograms (all prefixed `fedjewel_`). Unauthenticated, like "
            "`/healthz`: it holds counts and timings, no ids of users."
        ),
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text format.",
                "content": {
                    "text/plain": {
                        "example": "# TYPE fedjewel_http_request_duration_seconds histogram\n"
                        'fedjewel_http_request_duration_seconds_count{method="GET",'
                        'route="/healthz",status="200"} 3.0\n'
                    }
                },
            }
        },
    )
    def metrics(request: Request) -> Response:
        reg: CollectorRegistry = request.app.state.metrics_registry
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/healthz",
        tags=["health"],
        summary="Liveness: the process is up",
        description="Always 200 while the process serves HTTP; no database access. "
        "`/readyz` says whether the service can do its work.",
        responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
    )
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return registry


def sample_value(
    registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None
) -> float:
    """A sample's current value (0.0 when absent): for tests and the demo's progress display."""
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)
