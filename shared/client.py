"""A small typed client for storefront backends calling their regional node.

    from shared.client import NodeClient, RecommendFilters

    with NodeClient("http://eu-node:8100", api_key="...") as node:
        node.send_events([{"user_id": "u-42", "item_id": "J00017", "event_type": "view",
                           "timestamp": "2026-11-20T10:15:00Z", "country": "DE"}])
        recs = node.recommend(user_id="u-42", k=10, filters=RecommendFilters(max_price=500))
        for item in recs.items:
            print(item.item_id, item.score)

`AsyncNodeClient` has the same methods as coroutines. Every non-2xx answer
raises `NodeApiError` carrying the status code and the service's JSON `detail`;
network failures surface as `httpx.TransportError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel

from shared.schemas import EventIn, EventsAccepted, NodeStatus, RecommendResponse

DEFAULT_BATCH_SIZE = 1000
ModelT = TypeVar("ModelT", bound=BaseModel)


class NodeApiError(Exception):
    """The node answered with an error status; `detail` is its JSON `detail` (or the text)."""

    def __init__(self, status_code: int, detail: Any, method: str, url: str) -> None:
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.url = url
        super().__init__(f"{method} {url} -> {status_code}: {detail}")


@dataclass(frozen=True)
class RecommendFilters:
    """Restrict recommendations to items with these attributes (all optional)."""

    category: str | None = None
    material: str | None = None
    gemstone: str | None = None
    min_price: float | None = None
    max_price: float | None = None


def recommend_params(
    *,
    user_id: str | None,
    k: int,
    session_items: Sequence[str],
    country: str | None,
    filters: RecommendFilters | None,
) -> dict[str, str | int | float]:
    params: dict[str, str | int | float] = {"k": k}
    if user_id is not None:
        params["user_id"] = user_id
    if isinstance(session_items, str):  # one id, or the comma-separated form of the API
        session_items = [s for s in session_items.split(",") if s.strip()]
    if session_items:
        params["session_items"] = ",".join(session_items)
    if country is not None:
        params["country"] = country
    if filters is not None:
        for name in ("category", "material", "gemstone", "min_price", "max_price"):
            value = getattr(filters, name)
            if value is not None:
                params[name] = value
    return params


def event_batches(
    events: Iterable[EventIn | Mapping[str, Any]], batch_size: int
) -> Iterator[list[dict[str, Any]]]:
    """Validate locally (a bad event fails before anything is sent) and split into batches."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    validated = [e if isinstance(e, EventIn) else EventIn.model_validate(e) for e in events]
    for start in range(0, len(validated), batch_size):
        yield [e.model_dump(mode="json") for e in validated[start : start + batch_size]]


def merge_accepted(results: Sequence[EventsAccepted]) -> EventsAccepted:
    unknown = sorted({i for r in results for i in r.unknown_item_ids})
    return EventsAccepted(
        received=sum(r.received for r in results),
        inserted=sum(r.inserted for r in results),
        duplicates=sum(r.duplicates for r in results),
        unknown_item_ids=unknown[:1000],
    )


def parse_response(response: httpx.Response, model: type[ModelT]) -> ModelT:
    if response.is_error:
        try:
            detail: Any = response.json().get("detail", response.text)
        except (ValueError, AttributeError):
            detail = response.text
        raise NodeApiError(
            response.status_code, detail, response.request.method, str(response.request.url)
        )
    return model.model_validate_json(response.content)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


class NodeClient:
    """Synchronous client for one regional node."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def recommend(
        self,
        *,
        user_id: str | None = None,
        k: int = 10,
        session_items: Sequence[str] = (),
        country: str | None = None,
        filters: RecommendFilters | None = None,
    ) -> RecommendResponse:
        params = recommend_params(
            user_id=user_id, k=k, session_items=session_items, country=country, filters=filters
        )
        return parse_response(self._http.get("/v1/recommend", params=params), RecommendResponse)

    def send_events(
        self,
        events: Iterable[EventIn | Mapping[str, Any]],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> EventsAccepted:
        """POST the events in batches (each batch is stored all or nothing; retries are safe)."""
        results = [
            parse_response(self._http.post("/v1/events", json=batch), EventsAccepted)
            for batch in event_batches(events, batch_size)
        ]
        return merge_accepted(results)

    def status(self) -> NodeStatus:
        return parse_response(self._http.get("/v1/status"), NodeStatus)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncNodeClient:
    """The same API as `NodeClient`, for asyncio storefront backends."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def recommend(
        self,
        *,
        user_id: str | None = None,
        k: int = 10,
        session_items: Sequence[str] = (),
        country: str | None = None,
        filters: RecommendFilters | None = None,
    ) -> RecommendResponse:
        params = recommend_params(
            user_id=user_id, k=k, session_items=session_items, country=country, filters=filters
        )
        response = await self._http.get("/v1/recommend", params=params)
        return parse_response(response, RecommendResponse)

    async def send_events(
        self,
        events: Iterable[EventIn | Mapping[str, Any]],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> EventsAccepted:
        results = []
        for batch in event_batches(events, batch_size):
            response = await self._http.post("/v1/events", json=batch)
            results.append(parse_response(response, EventsAccepted))
        return merge_accepted(results)

    async def status(self) -> NodeStatus:
        return parse_response(await self._http.get("/v1/status"), NodeStatus)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
