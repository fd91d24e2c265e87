"""The regional node's app factory and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import torch
from fastapi import Body, FastAPI, Query
from fastapi.responses import JSONResponse, Response

from regional_node import service
from regional_node.deps import ApiKeyDep, RuntimeDep, SettingsDep, StoreDep
from regional_node.operator_tools import install_operator_tools
from regional_node.participation import NodeRuntime, Participant
from regional_node.recommender import Filters
from regional_node.settings import NodeSettings
from regional_node.store import EventStore
from shared.db import database_ready
from shared.errors import Unprocessable, error_responses, install_error_handlers
from shared.schemas import (
    IDENTIFIER_PATTERN,
    EventIn,
    EventsAccepted,
    NodeStatus,
    RecommendResponse,
    normalize_country,
)
from shared.streaming import BodySizeLimit

log = logging.getLogger("fedjewel.node")


def create_app(settings: NodeSettings | None = None, *, participate: bool = True) -> FastAPI:
    settings = settings or NodeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One request = one small matvec + topk: more threads only add contention with
        # the other requests (and the trainer, which has its own process).
        torch.set_num_threads(settings.serve_threads)
        store = EventStore(settings.database_url)
        await asyncio.to_thread(store.migrate)
        app.state.store = store
        participant: Participant | None = None
        task: asyncio.Task[None] | None = None
        if participate and settings.coordinator_url:
            participant = Participant(settings, store, app.state.runtime)
            app.state.participant = participant
            task = asyncio.create_task(participant.run_forever())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if participant is not None:
                await participant.aclose()
            store.dispose()

    app = FastAPI(
        title=f"fedjewel regional node ({settings.region})",
        version="0.1.0",
        summary="Private event store, local training and recommendations for one region.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.runtime = NodeRuntime()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_operator_tools(app, app.state.runtime)

    @app.post(
        "/v1/events",
        tags=["events"],
        summary="Record storefront behaviour events",
        description="A JSON batch of events. Events already stored (same user, item, type "
        "and timestamp) are ignored, so retries are safe. The batch is stored all or nothing. "
        "Item ids not in the catalog are reported back.",
        responses=error_responses(400, 401, 413, 422, 503),
    )
    def post_events(
        events: Annotated[list[EventIn], Body()],
        _: ApiKeyDep,
        store: StoreDep,
        runtime: RuntimeDep,
        s: SettingsDep,
    ) -> EventsAccepted:
        return service.ingest_events(store, runtime, s, events)

    @app.get(
        "/v1/recommend",
        tags=["recommend"],
        summary="Recommendations for a shopper",
        description=(
            "Top-k items from the latest global model, scored from the user's history in this "
            "region plus the optional session context. Purchased items are excluded. A "
            "brand-new user with a session (`session_items`) gets model-based "
            "recommendations; with no history at all the answer is regional popularity "
            "(`strategy: popularity`). Of a long session the newest 100 items count. "
            "Before the node has its first model a request with filters is answered 503."
        ),
        response_model=RecommendResponse,
        responses=error_responses(401, 422, 503),
    )
    async def get_recommend(
        _: ApiKeyDep,
        store: StoreDep,
        runtime: RuntimeDep,
        user_id: Annotated[str | None, Query(max_length=128, pattern=IDENTIFIER_PATTERN)] = None,
        k: Annotated[int, Query(ge=1, le=200)] = 10,
        country: Annotated[
            str | None,
            Query(max_length=32, description="Country code, normalised as events' are."),
        ] = None,
        session_items: Annotated[
            str | None,
            Query(max_length=8192, description="Comma-separated item ids seen this session."),
        ] = None,
        category: Annotated[str | None, Query(max_length=64)] = None,
        material: Annotated[str | None, Query(max_length=64)] = None,
        gemstone: Annotated[str | None, Query(max_length=64)] = None,
        max_price: Annotated[float | None, Query(ge=0, allow_inf_nan=False)] = None,
        min_price: Annotated[float | None, Query(ge=0, allow_inf_nan=False)] = None,
    ) -> Response:
        # On the event loop, not in the thread pool: the work is one indexed query and
        # sub-millisecond tensor ops (popularity refreshes in the background), and the
        # thread hop cost more than that. The answer is serialized as built: the schema
        # above documents it.
        if min_price is not None and max_price is not None and min_price > max_price:
            raise Unprocessable(f"min_price {min_price} is above max_price {max_price}")
        try:
            country = normalize_country(country) if country is not None else None
        except ValueError as exc:
            raise Unprocessable(str(exc)) from None
        session = [s.strip() for s in (session_items or "").split(",") if s.strip()]
        body = service.recommend_for(
            store,
            runtime,
            user_id=user_id,
            k=k,
            country=country,
            session_items=session[-100:],  # the newest
            filters=Filters(
                category=category,
                material=material,
                gemstone=gemstone,
                max_price=max_price,
                min_price=min_price,
            ),
        )
        return JSONResponse(body)

    @app.get(
        "/v1/status",
        tags=["status"],
        summary="Node state",
        description="The model version served, the last round joined, the number of stored "
        "events, and the participation loop's health (coordinator reachable, last error, "
        "retry back-off). Counts only: no user data.",
    )
    def get_status(s: SettingsDep, store: StoreDep, runtime: RuntimeDep) -> NodeStatus:
        return service.node_status(s, store, runtime)

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: the event store answers",
        description="200 once the node's own event database answers a query; 503 while it "
        "does not. Serving does not wait for the coordinator (popularity until a model "
        "arrives).",
        responses={
            200: {"content": {"application/json": {"example": {"status": "ready"}}}},
            **error_responses(503),
        },
    )
    def readyz(store: StoreDep) -> dict[str, str]:
        database_ready(store.engine)
        return {"status": "ready"}

    return app
