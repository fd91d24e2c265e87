"""The node's request logic (endpoints stay thin)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from regional_node.participation import NodeRuntime
from regional_node.recommender import Filters, candidate_mask, recommend
from regional_node.settings import NodeSettings
from regional_node.store import EventStore
from shared.errors import PayloadTooLarge, ServiceUnavailable
from shared.privacy_schemas import PrivacyStatus
from shared.schemas import EventIn, EventsAccepted, NodeStatus


def ingest_events(
    store: EventStore, runtime: NodeRuntime, settings: NodeSettings, events: Sequence[EventIn]
) -> EventsAccepted:
    if len(events) > settings.max_events_per_batch:
        raise PayloadTooLarge(
            f"batch of {len(events)} events exceeds the limit of {settings.max_events_per_batch}"
        )
    unknown: list[str] = []
    catalog = runtime.catalog
    if catalog is not None:
        known = {it.item_id for it in catalog.items}
        unknown = sorted({e.item_id for e in events if e.item_id not in known})
    inserted = store.add_events(events)
    return EventsAccepted(
        received=len(events),
        inserted=inserted,
        duplicates=len(events) - inserted,
        unknown_item_ids=unknown[:1000],
    )


def recommend_for(
    store: EventStore,
    runtime: NodeRuntime,
    *,
    user_id: str | None,
    k: int,
    country: str | None,
    session_items: Sequence[str],
    filters: Filters,
) -> dict[str, Any]:
    """The `RecommendResponse` as a plain dict (the endpoint serializes it as it is:
    building and re-validating the pydantic model cost more than the scoring)."""
    serving = runtime.serving  # one version for the whole request
    history: list[tuple[str, str]] = []
    purchased: set[str] = set()
    if user_id is not None:
        history, purchased, last_country = store.recommend_context(user_id)
        if country is None:
            country = last_country
    history += [(item, "view") for item in session_items]
    exclude = sorted(purchased | set(session_items))
    if serving is not None and any(item in serving.row_of for item, _ in history):
        items = recommend(serving, history, country, k, filters, exclude)
        return {
            "user_id": user_id,
            "model_version": serving.version,
            "strategy": "model",
            "items": [{"item_id": i, "score": s} for i, s in items],
        }
    # No history yet (or none the model knows): regional popularity, still honouring
    # filters and exclusions.
    excluded = set(exclude)
    allowed: set[str] | frozenset[str] | None = None
    fill: Sequence[str] = ()  # catalog order, to fill up to k when popularity runs short
    if serving is not None:
        mask = candidate_mask(serving, filters, exclude)
        allowed = {serving.item_ids[i] for i in mask.nonzero().flatten().tolist()}
        fill = serving.item_ids
    elif filters != Filters():
        # Before the first model (a node started while the coordinator is unreachable)
        # the node knows no item's attributes: filtered answers would be unfiltered.
        raise ServiceUnavailable(
            "no model and catalog loaded yet, so filters cannot be applied; retry once the "
            "node has reached the coordinator (GET /v1/status: model_version)"
        )
    elif (active := runtime.active_catalog_ids()) is not None:
        # A catalog but no model yet: only its active items (events may name items it
        # does not hold; until 2026-11-27 those were served too).
        fill, allowed = active
    ranked = store.popularity()
    picks: list[dict[str, Any]] = []
    for item_id, score in ranked:
        if item_id in excluded or (allowed is not None and item_id not in allowed):
            continue
        picks.append({"item_id": item_id, "score": score})
        if len(picks) == k:
            break
    if len(picks) < k and allowed is not None:
        # A new region with little data: fill with catalog items the filters allow.
        chosen = {p["item_id"] for p in picks}
        for item_id in fill:
            if item_id in allowed and item_id not in chosen and item_id not in excluded:
                picks.append({"item_id": item_id, "score": 0.0})
                if len(picks) == k:
                    break
    return {
        "user_id": user_id,
        "model_version": serving.version if serving else None,
        "strategy": "popularity",
        "items": picks,
    }


def node_status(settings: NodeSettings, store: EventStore, runtime: NodeRuntime) -> NodeStatus:
    skipped_round, skipped_why = runtime.last_round_skipped or (None, None)
    return NodeStatus(
        node_id=settings.id,
        region=settings.region,
        model_version=runtime.serving.version if runtime.serving else None,
        model_personalized=bool(runtime.serving and runtime.serving.personalized),
        model_fine_tuned=bool(runtime.serving and runtime.serving.fine_tuned),
        last_round_joined=runtime.last_round_joined,
        last_round_skipped=skipped_round,
        last_round_skipped_reason=skipped_why,
        event_count=store.count(),
        coordinator_reachable=runtime.coordinator_reachable,
        last_error=runtime.last_error,
        training=runtime.training,
        consecutive_failures=runtime.consecutive_failures,
        next_retry_seconds=runtime.next_retry_seconds,
        privacy=privacy_status(settings, runtime),
    )


def privacy_status(settings: NodeSettings, runtime: NodeRuntime) -> PrivacyStatus:
    dp = settings.dp_enabled
    sgd = settings.dp_algorithm == "dpsgd"
    return PrivacyStatus(
        dp_enabled=dp,
        dp_algorithm=settings.dp_algorithm if dp else None,
        dp_epsilon=(runtime.dp_epsilon or 0.0) if dp else None,
        dp_delta=settings.dp_delta if dp else None,
        dp_epsilon_budget=settings.dp_epsilon_budget if dp else None,
        dp_noise_multiplier=settings.dp_noise_multiplier if dp else None,
        dp_clip_norm=(settings.dp_sgd_clip_norm if sgd else settings.dp_clip_norm) if dp else None,
        dp_sampling_rate=settings.dp_sampling_rate if dp else None,
        dp_releases=runtime.dp_releases,
        dp_steps=runtime.dp_steps,
        training_refused=runtime.training_refused,
        secure_aggregation=settings.secure_aggregation,
        insights_pushed_at=runtime.insights_pushed_at,
    )
