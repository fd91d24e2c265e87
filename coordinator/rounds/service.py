"""Training rounds: open, collect updates (exactly once per node), close by aggregation.

Closing a round, storing the new version and opening the next round happen in
one transaction, under a row lock on the round (SQLite: `BEGIN IMMEDIATE`).
A crash at any point leaves either the old state or the new one; on restart the
closer finds the still-open round with its stored updates and closes it, and
aggregation is deterministic (updates in node-id order), so the result equals an
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from torch import Tensor

from coordinator.aggregation import (
    MAX_AGGREGATED_METRICS,
    AggregationStrategy,
    UpdateMismatchError,
    WeightedMeanAccumulator,
    all_finite,
    apply_delta,
    apply_delta_in_place,
    check_compatible,
    make_strategy,
    max_metrics,
    weighted_metrics,
)
from coordinator.catalog.service import catalog_size
from coordinator.models import ModelVersion, Node, Round, SecAggRound, Update
from coordinator.models_registry.service import (
    WeightCache,
    active_version,
    create_version,
    load_state,
    promote,
)
from coordinator.secagg.service import (
    MasksDoNotCancel,
    check_masked_update,
    redo_round,
    secure_mean_delta,
    step_secure_round,
)
from coordinator.security import refuse_if_revoked
from coordinator.server_optimizer import save_adam, server_step
from coordinator.settings import CoordinatorSettings
from shared.compression import SPARSE_ENCODINGS, SUPPORTED_ENCODINGS, decode_update
from shared.errors import Conflict, NotFound, Unprocessable
from shared.model import ModelConfig, grow_state, init_state
from shared.schemas import RoundOut, UpdateReceipt, utcnow
from shared.secagg import SECAGG_ENCODING
from shared.serialization import sha256_hex, state_views

log = logging.getLogger("fedjewel.coordinator.rounds")


def _aware(ts: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    from datetime import UTC

    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def open_round(session: Session, settings: CoordinatorSettings, base_version: int) -> Round:
    now = utcnow()
    r = Round(
        base_version=base_version,
        state="open",
        created_at=now,
        deadline=now + timedelta(seconds=settings.round_deadline_seconds),
        closed_at=None,
        result_version=None,
    )
    session.add(r)
    session.flush()
    log.info("round %s opened on version %s", r.id, base_version, extra={"round_id": r.id})
    return r


def bootstrap_model_if_needed(
    session: Session, settings: CoordinatorSettings, num_items: int
) -> ModelVersion | None:
    """Version 1 (a seeded initialization) and round 1, on the first catalog upload."""
    if session.scalar(select(func.count()).select_from(ModelVersion)):
        return None
    config = ModelConfig(
        num_items=num_items, embedding_dim=settings.embedding_dim, seed=settings.model_seed
    )
    v = create_version(
        session, init_state(config), config, metrics={}, round_id=None, status="active"
    )
    open_round(session, settings, v.version)
    return v


def current_round(session: Session) -> Round | None:
    return session.scalars(
        select(Round).where(Round.state == "open").order_by(Round.id.desc()).limit(1)
    ).first()


def get_round(session: Session, round_id: int) -> Round:
    r = session.get(Round, round_id)
    if r is None:
        raise NotFound(f"no round {round_id}")
    return r


def round_out(session: Session, r: Round, settings: CoordinatorSettings) -> RoundOut:
    participants = list(
        session.scalars(
            select(Update.node_id).where(Update.round_id == r.id).order_by(Update.node_id)
        )
    )
    return RoundOut(
        round_id=r.id,
        base_version=r.base_version,
        state="open" if r.state == "open" else "closed",
        created_at=_aware(r.created_at),
        deadline=_aware(r.deadline),
        closed_at=_aware(r.closed_at) if r.closed_at else None,
        result_version=r.result_version,
        updates_received=len(participants),
        min_updates=settings.min_updates,
        target_updates=settings.effective_target_updates,
        participants=participants,
        supported_encodings=list(SUPPORTED_ENCODINGS),
    )


def list_rounds(session: Session, limit: int = 100) -> list[Round]:
    return list(session.scalars(select(Round).order_by(Round.id.desc()).limit(limit)))


MAX_METRIC = 1e12  # |value| of one reported metric
MAX_METRIC_NAME = 64


def parse_metrics_header(raw: str | None) -> dict[str, float]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    # JSONDecodeError, an integer of over 4,300 digits, or nesting deeper than the parser's
    # recursion limit (a 3-KB header of brackets)
    except (ValueError, RecursionError) as exc:
        raise Unprocessable(f"X-Update-Metrics is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or len(data) > 64:
        raise Unprocessable("X-Update-Metrics must be a JSON object of at most 64 numbers")
    out: dict[str, float] = {}
    for k, v in data.items():
        # Bounded, so that the example-weighted sums at the close stay finite (an inf
        # cannot be stored as PostgreSQL JSON: every close of the round failed).
        if not isinstance(v, int | float) or isinstance(v, bool) or not abs(v) <= MAX_METRIC:
            raise Unprocessable(
                f"X-Update-Metrics[{k!r}] must be a finite number of magnitude at most "
                f"{MAX_METRIC:g}"
            )
        if len(k) > MAX_METRIC_NAME:  # cut short, two names could become one
            raise Unprocessable(
                f"X-Update-Metrics: the name {k[:20]!r}... is over {MAX_METRIC_NAME} characters"
            )
        out[k] = float(v)
    return out


def _receipt(u: Update, updates_received: int, duplicate: bool) -> UpdateReceipt:
    return UpdateReceipt(
        round_id=u.round_id,
        node_id=u.node_id,
        num_examples=u.num_examples,
        sha256=u.sha256,
        accepted_at=_aware(u.created_at),
        updates_received=updates_received,
        duplicate=duplicate,
    )


def _count_updates(session: Session, round_id: int) -> int:
    return int(
        session.scalar(select(func.count()).select_from(Update).where(Update.round_id == round_id))
        or 0
    )


def _existing_update(session: Session, round_id: int, node_id: str) -> Update | None:
    return session.scalars(
        select(Update).where(Update.round_id == round_id, Update.node_id == node_id)
    ).first()


def _replay_or_conflict(session: Session, existing: Update, sha: str) -> UpdateReceipt:
    if existing.sha256 == sha:
        return _receipt(existing, _count_updates(session, existing.round_id), duplicate=True)
    raise Conflict(
        f"node {existing.node_id!r} already submitted a different update to round "
        f"{existing.round_id}; a node counts once per round"
    )


def submit_update(
    session: Session,
    settings: CoordinatorSettings,
    cache: WeightCache,
    node: Node,
    *,
    round_id: int,
    base_version: int,
    num_examples: int,
    payload: bytes | bytearray,
    sha256_claimed: str | None,
    metrics: dict[str, float],
    encoding: str = "dense",
) -> UpdateReceipt:
    """Validate and store one node's delta. Stores nothing unless everything checks out."""
    r = get_round(session, round_id)
    sha = sha256_hex(payload)
    if sha256_claimed is not None and sha256_claimed.lower() != sha:
        raise Unprocessable(
            f"payload sha256 is {sha}, X-Content-SHA256 says {sha256_claimed}: body corrupted"
        )
    existing = _existing_update(session, round_id, node.node_id)
    if existing is not None:
        return _replay_or_conflict(session, existing, sha)
    if r.state != "open":
        raise Conflict(f"round {round_id} is closed; fetch /v1/rounds/current")
    if base_version != r.base_version:
        raise Conflict(
            f"stale base version {base_version}: round {round_id} trains on version "
            f"{r.base_version}"
        )
    if num_examples > settings.max_num_examples:
        raise Unprocessable(
            f"num_examples {num_examples} exceeds the limit of {settings.max_num_examples}"
        )
    if settings.secure_aggregation or encoding == SECAGG_ENCODING:
        check_masked_update(session, settings, cache, r, node, bytes(payload), encoding)
    else:
        if encoding not in SUPPORTED_ENCODINGS:
            raise Unprocessable(
                f"unsupported update encoding {encoding!r}; supported: {list(SUPPORTED_ENCODINGS)}"
            )
        try:
            base_state, _ = load_state(session, r.base_version, cache)
            # Stored as received (compressed); decoded again, one at a time, at the close.
            delta = decode_update(state_views(payload), base_state, encoding)
            check_compatible(delta, base_state)
            del delta
        except (ValueError, UpdateMismatchError) as exc:
            raise Unprocessable(f"update rejected: {exc}") from exc

    # Lock the round row, re-check it is open, then insert (unique per round and node).
    locked = session.get(Round, round_id, with_for_update=True, populate_existing=True)
    assert locked is not None
    # A concurrent retry of this node may have committed while we waited for the lock
    # (and the round may have closed since): it is still the same update, answer as such.
    existing = _existing_update(session, round_id, node.node_id)
    if existing is not None:
        receipt = _replay_or_conflict(session, existing, sha)
        session.rollback()
        return receipt
    if locked.state != "open":
        session.rollback()
        raise Conflict(f"round {round_id} closed while the update was uploading")
    refuse_if_revoked(session, node.node_id)  # revoked while the body streamed in
    if settings.secure_aggregation:
        # The round checker may have declared this node dropped while the upload was
        # validated; it did so holding the round lock we now hold, so this reads it.
        secure = session.get(SecAggRound, round_id, populate_existing=True)
        if secure is not None and secure.dropped is not None:
            session.rollback()
            raise Conflict(f"round {round_id} closed its submissions (dropout recovery)")
    u = Update(
        round_id=round_id,
        node_id=node.node_id,
        base_version=base_version,
        num_examples=num_examples,
        sha256=sha,
        size_bytes=len(payload),
        encoding=encoding,
        payload=payload,
        metrics=metrics,
        created_at=utcnow(),
    )
    session.add(u)
    node.last_seen_at = utcnow()
    try:
        session.commit()
    except IntegrityError:
        # A concurrent retry of the same node won the race: answer as it would have.
        session.rollback()
        existing = _existing_update(session, round_id, node.node_id)
        if existing is None:
            raise
        return _replay_or_conflict(session, existing, sha)
    log.info(
        "update accepted from %s for round %s (%d examples)",
        node.node_id,
        round_id,
        num_examples,
        extra={"round_id": round_id, "node_id": node.node_id},
    )
    return _receipt(u, _count_updates(session, round_id), duplicate=False)


def _ready(session: Session, r: Round, settings: CoordinatorSettings, now: datetime) -> bool:
    count = _count_updates(session, r.id)
    if count >= settings.effective_target_updates:
        return True
    return now >= _aware(r.deadline) and count >= settings.min_updates


def try_close_current_round(
    session: Session, settings: CoordinatorSettings, cache: WeightCache
) -> int | None:
    """Close the open round if it is ready. Returns the new version number, if any."""
    r = current_round(session)
    if r is None:
        session.rollback()
        return None
    now = utcnow()
    r = session.get(Round, r.id, with_for_update=True, populate_existing=True)
    assert r is not None
    if r.state != "open":
        session.rollback()
        return None
    if settings.secure_aggregation:
        return step_secure_round(session, settings, cache, r, now)
    if not _ready(session, r, settings, now):
        if now >= _aware(r.deadline):
            # Not enough updates by the deadline: give the round another period.
            r.deadline = now + timedelta(seconds=settings.round_deadline_seconds)
            session.commit()
            log.info("round %s extended: quorum not reached", r.id, extra={"round_id": r.id})
        else:
            session.rollback()
        return None
    version = _close_round(session, settings, cache, r, now)
    if settings.aggregation_delay_seconds:
        # Test only: widen the window in which a crash hits an uncommitted close.
        log.info("round %s aggregated; delaying commit (test setting)", r.id)
        time.sleep(settings.aggregation_delay_seconds)
    session.commit()
    return version


def _closed_rounds(session: Session) -> int:
    """Rounds closed by aggregation (ids may have gaps after a rolled-back close)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Round)
            .where(Round.state == "closed", Round.result_version.is_not(None))
        )
        or 0
    )


def strategy_from_settings(settings: CoordinatorSettings) -> AggregationStrategy:
    return make_strategy(
        settings.aggregation,
        clip_norm=settings.clip_norm,
        trim_fraction=settings.trim_fraction,
        krum_byzantine=settings.krum_byzantine,
        krum_selected=settings.krum_selected,
    )


PAYLOAD_SLICE_BYTES = 1024 * 1024  # small slices: the driver holds each one twice (hex + bytes)


def read_update_payload(
    session: Session, update_id: int, size: int, buffer: bytearray
) -> memoryview:
    """An update's payload, read in `substr()` slices into the front of `buffer`.

    Fetching a large bytea whole costs the driver's copy of the wire data on top of
    the Python bytes (on PostgreSQL's text protocol, hex: twice the size again).
    """
    view = memoryview(buffer)[:size]
    for start in range(0, size, PAYLOAD_SLICE_BYTES):
        length = min(PAYLOAD_SLICE_BYTES, size - start)
        chunk = session.scalar(
            select(func.substr(Update.payload, start + 1, length)).where(Update.id == update_id)
        )
        if chunk is None or len(chunk) != length:
            raise RuntimeError(f"update {update_id}: stored payload is shorter than its size")
        view[start : start + length] = chunk
    return view


def _finite(state: dict[str, Tensor]) -> bool:
    return all(all_finite(t) for t in state.values() if t.is_floating_point())


def _end_without_version(
    session: Session, settings: CoordinatorSettings, r: Round, now: datetime, count: int
) -> None:
    """Close the round with no result and redo it on its base version.

    Finite updates can still sum past float32 (n_k x delta_k with huge claimed counts).
    Such a version would be served everywhere and score every held-out item as a hit;
    refusing it at every retry would leave the round stuck.
    """
    r.state = "closed"
    r.closed_at = now
    r.close_reason = "not_finite"
    open_round(session, settings, r.base_version)
    log.error(
        "round %s: the aggregate of %d updates is not finite; no version made, redoing the "
        "round on version %s",
        r.id,
        count,
        r.base_version,
        extra={"round_id": r.id},
    )


def _close_round(
    session: Session,
    settings: CoordinatorSettings,
    cache: WeightCache,
    r: Round,
    now: datetime,
) -> int | None:
    """Aggregate the round into a new active version (its number), or end the round
    without one when the aggregate is not finite, or with secure aggregation when the
    masks left after the dropouts' reveals do not cancel (None)."""
    base_state, config = load_state(session, r.base_version, cache)
    rows = session.execute(
        select(
            Update.id,
            Update.node_id,
            Update.num_examples,
            Update.metrics,
            Update.encoding,
            Update.size_bytes,
        )
        .where(Update.round_id == r.id)
        .order_by(Update.node_id)
    ).all()
    if settings.secure_aggregation:
        # Only the sum is ever decoded: individual payloads stay masked.
        try:
            delta, total_examples, count = secure_mean_delta(session, r.id, base_state)
        except MasksDoNotCancel as exc:  # no version out of a garbage sum: redo the round
            log.error("%s; redoing it", exc, extra={"round_id": r.id})
            redo_round(session, settings, r, now)
            return None
        new_state = apply_delta(base_state, delta)
    elif settings.aggregation in ("fedavg", "fedavg_rows"):
        # Streaming FedAvg: one payload at a time, read in slices into one buffer
        # allocated once, summed in float32 (one model of memory, not two).
        acc = WeightedMeanAccumulator(dtype=None, rowwise=settings.aggregation == "fedavg_rows")
        buffer = bytearray(max((int(row.size_bytes) for row in rows), default=0))
        for update_id, _node_id, num_examples, _metrics, encoding, size in rows:
            payload = read_update_payload(session, update_id, int(size), buffer)
            delta = decode_update(state_views(payload), base_state, encoding or "dense")
            acc.add(delta, int(num_examples), sparse=encoding in SPARSE_ENCODINGS)
            del delta, payload
        del buffer
        total_examples, count = acc.total_examples, acc.count
        mean = acc.take_result()
        if not _finite(mean):
            _end_without_version(session, settings, r, now, count)
            return None
        # The mean becomes the new state in place: no second model-sized buffer.
        new_state = apply_delta_in_place(mean, base_state)
    else:
        strategy = strategy_from_settings(settings)

        def updates() -> Iterator[tuple[dict[str, Tensor], int]]:
            for update_id, _node_id, num_examples, _metrics, encoding, size in rows:
                # A fresh buffer per update: robust strategies keep every update.
                payload = read_update_payload(session, update_id, int(size), bytearray(int(size)))
                yield (
                    decode_update(state_views(payload), base_state, encoding or "dense"),
                    int(num_examples),
                )

        log.info(
            "aggregating round %s: %d updates with %s",
            r.id,
            len(rows),
            strategy.name,
            extra={"round_id": r.id},
        )
        delta = strategy.aggregate(updates() if strategy.streaming else list(updates()))
        total_examples, count = sum(int(row.num_examples) for row in rows), len(rows)
        new_state = apply_delta(base_state, delta)
    adam = None
    if settings.server_optimizer == "adam":
        new_state, adam = server_step(session, settings, r.base_version, base_state, new_state)
    if not _finite(new_state):
        _end_without_version(session, settings, r, now, count)
        return None
    new_state, new_config = grow_state(new_state, config, catalog_size(session))
    metrics: dict[str, float] = weighted_metrics((m or {}, int(n)) for _, _, n, m, _, _ in rows)
    # A privacy loss is as large as the worst node's, not an average.
    metrics.update(max_metrics((m or {} for _, _, _, m, _, _ in rows), MAX_AGGREGATED_METRICS))
    metrics["num_examples"] = float(total_examples)
    metrics["num_updates"] = float(count)
    v = create_version(
        session,
        new_state,
        new_config,
        metrics=metrics,
        round_id=r.id,
        status="active",
        consume_state=True,
    )
    if adam is not None:
        save_adam(session, v.version, adam, now)
    r.state = "closed"
    r.closed_at = now
    r.result_version = v.version
    r.close_reason = "target" if count >= settings.effective_target_updates else "deadline"
    if _rounds_left(session, settings):
        open_round(session, settings, v.version)
    log.info(
        "round %s closed with %d updates -> version %s",
        r.id,
        count,
        v.version,
        extra={"round_id": r.id},
    )
    return v.version


def _rounds_left(session: Session, settings: CoordinatorSettings) -> bool:
    return settings.max_rounds is None or _closed_rounds(session) < settings.max_rounds


def resume_rounds(session: Session, settings: CoordinatorSettings) -> Round | None:
    """Open a round on the active version when none is open and COORDINATOR_MAX_ROUNDS
    allows one more: at start-up, after the limit was raised or unset (until 2026-11-27
    a federation that had reached it never trained again)."""
    _one_round_opener(session)  # a promote that opens a round at the same time waits
    # The version first: the first catalog's bootstrap commits version 1 with round 1,
    # so a later statement that sees the version sees that round too.
    v = active_version(session)
    if v is None:  # no catalog yet: the first upload opens round 1
        session.rollback()
        return None
    if current_round(session) is not None or not _rounds_left(session, settings):
        session.rollback()
        return None
    r = open_round(session, settings, v.version)
    session.commit()
    log.info("no round was open; opened round %s on version %s", r.id, v.version)
    return r


# pg_advisory_xact_lock key of promotes and resumes (any constant no other lock uses).
_PROMOTE_LOCK = 0x70726F6D  # "prom"


def _one_round_opener(session: Session) -> None:
    """PostgreSQL: one promote or resume at a time (each checks "no open round" and may
    open one; two at once left two rounds open, or two versions active)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_PROMOTE_LOCK)))


def promote_version(session: Session, settings: CoordinatorSettings, version: int) -> ModelVersion:
    """Make a version active and rebase the open round on it, in one transaction."""
    # Two promotes at once (no open round to lock, say): each retired the versions active
    # when it started and both left theirs active. One at a time.
    _one_round_opener(session)
    # A close in progress holds the open round's row lock until it commits its new active
    # version and next round; wait for it, or (PostgreSQL) this promote would retire the
    # versions active before that commit and leave the close's version active beside ours.
    session.scalars(select(Round.id).where(Round.state == "open").with_for_update()).all()
    row = promote(session, version)
    r = current_round(session)
    if r is not None and r.base_version != version:
        r.state = "closed"
        r.closed_at = utcnow()
        r.close_reason = "superseded"
        open_round(session, settings, version)  # a full round period, not the old one's
    elif r is None and _rounds_left(session, settings):
        open_round(session, settings, version)
    session.commit()
    return row


__all__ = [
    "active_version",
    "bootstrap_model_if_needed",
    "current_round",
    "promote_version",
    "resume_rounds",
    "submit_update",
    "try_close_current_round",
]
