"""Secure aggregation on the coordinator (protocol in shared/secagg.py and docs/privacy.md).

Round life cycle with COORDINATOR_SECURE_AGGREGATION=true:

1. keys:    nodes post X25519 public keys; the cohort is sealed as soon as
            TARGET_UPDATES nodes have keys (or at the deadline with MIN_UPDATES).
2. masked:  cohort members submit masked fixed-point updates (encoding secagg-v1).
3. close:   all cohort members submitted -> the masks cancel in the sum.
4. recover: at the deadline with >= MIN_UPDATES submissions, the missing members
            are declared dropped (their later submissions are refused) and every
            survivor reveals its pairwise seeds with them; once all are revealed
            the coordinator removes those masks and closes the round.
5. redo:    too few submissions, or reveals missing by the recovery deadline ->
            the round closes without a version ("secagg_failed") and a new round
            opens on the same base version.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import datetime, timedelta

import torch
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.models import Node, Round, SecAggKey, SecAggReveal, SecAggRound, Update
from coordinator.models_registry.service import WeightCache, load_state
from coordinator.security import refuse_if_revoked
from coordinator.settings import CoordinatorSettings
from shared.errors import Conflict, Unprocessable
from shared.privacy_schemas import CohortMember, SecAggState
from shared.schemas import utcnow
from shared.secagg import (
    MODULUS,
    SECAGG_ENCODING,
    check_public_key,
    decode_fixed,
    remove_dropout_masks,
    sum_residues,
    within_survivors_range,
)
from shared.serialization import bytes_to_state

log = logging.getLogger("fedjewel.coordinator.secagg")

StateDict = dict[str, torch.Tensor]


def _aware(ts: datetime) -> datetime:
    from datetime import UTC

    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _require_enabled(settings: CoordinatorSettings) -> None:
    if not settings.secure_aggregation:
        raise Conflict("secure aggregation is off on this coordinator")


def _row(session: Session, round_id: int) -> SecAggRound:
    row = session.get(SecAggRound, round_id)
    if row is None:
        row = SecAggRound(
            round_id=round_id, cohort=None, sealed_at=None, dropped=None, recovery_deadline=None
        )
        session.add(row)
        session.flush()
    return row


def _open_round(session: Session, round_id: int) -> Round:
    r = session.get(Round, round_id)
    if r is None:
        from shared.errors import NotFound

        raise NotFound(f"no round {round_id}")
    return r


def _keys(session: Session, round_id: int) -> dict[str, str]:
    rows = session.execute(
        select(SecAggKey.node_id, SecAggKey.public_key)
        .where(SecAggKey.round_id == round_id)
        .order_by(SecAggKey.node_id)
    ).all()
    return {n: k for n, k in rows}


def _submitted(session: Session, round_id: int) -> set[str]:
    return set(session.scalars(select(Update.node_id).where(Update.round_id == round_id)))


def _revealed(session: Session, round_id: int) -> set[tuple[str, str]]:
    rows = session.execute(
        select(SecAggReveal.node_id, SecAggReveal.dropped_node_id).where(
            SecAggReveal.round_id == round_id
        )
    ).all()
    return {(a, b) for a, b in rows}


def _seal(row: SecAggRound, cohort: list[str], now: datetime) -> None:
    row.cohort = sorted(cohort)
    row.sealed_at = now
    log.info("secagg cohort of round %s sealed: %s", row.round_id, row.cohort)


def state_out(session: Session, round_id: int) -> SecAggState:
    r = _open_round(session, round_id)
    row = session.get(SecAggRound, round_id)
    keys = _keys(session, round_id)
    cohort = (row.cohort or []) if row is not None else []
    revealed = _revealed(session, round_id)
    return SecAggState(
        round_id=round_id,
        round_state="open" if r.state == "open" else "closed",
        sealed=bool(row is not None and row.cohort is not None),
        cohort=[CohortMember(node_id=n, public_key=keys[n]) for n in cohort if n in keys],
        keys_received=len(keys),
        submitted=sorted(_submitted(session, round_id)),
        dropped=list((row.dropped or []) if row is not None else []),
        revealed_by=sorted({a for a, _ in revealed}),
    )


def publish_key(
    session: Session, settings: CoordinatorSettings, node: Node, round_id: int, public_key: str
) -> SecAggState:
    """Store a node's public key for the round; seals the cohort at TARGET_UPDATES keys."""
    _require_enabled(settings)
    try:
        raw = base64.b64decode(public_key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Unprocessable("public_key must be base64") from exc
    try:
        check_public_key(raw)
    except ValueError as exc:
        raise Unprocessable(f"public_key is not a usable X25519 key: {exc}") from None
    r = session.get(Round, round_id, with_for_update=True, populate_existing=True)
    if r is None:
        _open_round(session, round_id)
        raise AssertionError  # unreachable: _open_round raised
    if r.state != "open":
        raise Conflict(f"round {round_id} is closed")
    refuse_if_revoked(session, node.node_id)
    row = _row(session, round_id)
    existing = session.get(SecAggKey, (round_id, node.node_id))
    if existing is not None:
        if existing.public_key != public_key:
            raise Conflict(f"node {node.node_id!r} already published a different key")
        session.rollback()
        return state_out(session, round_id)
    if row.cohort is not None:
        raise Conflict(f"the cohort of round {round_id} is sealed without {node.node_id!r}")
    session.add(
        SecAggKey(
            round_id=round_id, node_id=node.node_id, public_key=public_key, created_at=utcnow()
        )
    )
    session.flush()
    keys = _keys(session, round_id)
    if len(keys) >= settings.effective_target_updates:
        _seal(row, list(keys), utcnow())
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict("concurrent key upload; retry") from None
    return state_out(session, round_id)


def reveal_seeds(
    session: Session,
    settings: CoordinatorSettings,
    node: Node,
    round_id: int,
    seeds: dict[str, str],
) -> SecAggState:
    """A survivor reveals its pairwise seeds with exactly the dropped nodes (`seeds` as
    SeedRevealIn checked them: 64 hex characters each)."""
    _require_enabled(settings)
    if _open_round(session, round_id).state != "open":  # redone: seeds would serve nothing
        raise Conflict(f"round {round_id} is closed; no seeds are taken for it")
    row = session.get(SecAggRound, round_id)
    if row is None or row.cohort is None or not row.dropped:
        raise Conflict(f"round {round_id} is not recovering from a dropout")
    if node.node_id not in row.cohort or node.node_id in row.dropped:
        raise Conflict(f"node {node.node_id!r} is not a surviving member of the cohort")
    if set(seeds) != set(row.dropped):
        raise Unprocessable(f"reveal seeds for exactly the dropped nodes {row.dropped}")
    stored = sorted(_submitted(session, round_id) & set(row.dropped))
    if stored:  # their seeds would unmask a stored update: never take them
        raise Conflict(f"the updates of {stored} are stored; their seeds are not revealed")
    done = _revealed(session, round_id)
    for dropped, seed_hex in sorted(seeds.items()):
        if (node.node_id, dropped) in done:
            continue
        session.add(
            SecAggReveal(
                round_id=round_id,
                node_id=node.node_id,
                dropped_node_id=dropped,
                seed_hex=seed_hex.lower(),
                created_at=utcnow(),
            )
        )
    session.commit()
    return state_out(session, round_id)


def check_masked_update(
    session: Session,
    settings: CoordinatorSettings,
    cache: WeightCache,
    r: Round,
    node: Node,
    payload: bytes,
    encoding: str,
) -> None:
    """A masked update must come from a live cohort member and fit the base model's shapes."""
    if not settings.secure_aggregation:
        raise Unprocessable("secure aggregation is off on this coordinator; send dense updates")
    if encoding != SECAGG_ENCODING:
        raise Unprocessable(
            f"this coordinator requires secure aggregation: X-Update-Encoding {SECAGG_ENCODING}"
        )
    row = session.get(SecAggRound, r.id)
    if row is None or row.cohort is None:
        raise Conflict(f"the cohort of round {r.id} is not sealed yet")
    if node.node_id not in row.cohort:
        raise Conflict(f"node {node.node_id!r} is not in the cohort of round {r.id}")
    if row.dropped is not None:
        raise Conflict(f"round {r.id} already closed its submissions (dropout recovery)")
    try:
        masked = bytes_to_state(payload)
    except ValueError as exc:
        raise Unprocessable(f"update rejected: {exc}") from exc
    base_state, _ = load_state(session, r.base_version, cache)
    if set(masked) != set(base_state):
        raise Unprocessable("update rejected: parameter names differ from the base model")
    for name, ref in base_state.items():
        t = masked[name]
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != torch.int64:
            raise Unprocessable(
                f"update rejected: {name!r} must be int64 of shape {tuple(ref.shape)}"
            )
        if bool(((t < 0) | (t >= MODULUS)).any()):
            raise Unprocessable(f"update rejected: {name!r} has residues outside [0, 2**62)")


class MasksDoNotCancel(ValueError):
    """The survivors' sum, with the revealed masks removed, is not a sum of honest
    encodings: a survivor revealed a wrong seed (or masked with other seeds)."""


def secure_mean_delta(
    session: Session, round_id: int, base_state: StateDict
) -> tuple[StateDict, int, int]:
    """(sum of weighted deltas / total examples, total examples, updates) from masked payloads."""
    rows = session.execute(
        select(Update.id, Update.num_examples).where(Update.round_id == round_id)
    ).all()
    if not rows:
        raise ValueError("no updates to aggregate")

    def payloads():  # type: ignore[no-untyped-def]
        for update_id, _n in rows:
            data = session.scalar(select(Update.payload).where(Update.id == update_id))
            assert data is not None
            yield bytes_to_state(data)

    total = sum_residues(payloads())
    reveals = session.execute(
        select(SecAggReveal.node_id, SecAggReveal.dropped_node_id, SecAggReveal.seed_hex).where(
            SecAggReveal.round_id == round_id
        )
    ).all()
    total = remove_dropout_masks(total, [(a, b, bytes.fromhex(s)) for a, b, s in reveals])
    row = session.get(SecAggRound, round_id)
    cohort = len(row.cohort) if row is not None and row.cohort else len(rows)
    if not within_survivors_range(total, len(rows), cohort):
        raise MasksDoNotCancel(
            f"round {round_id}: the unmasked sum of {len(rows)} of {cohort} updates is out of "
            "their range: a revealed seed or a payload's masks are wrong"
        )
    n = sum(int(num) for _, num in rows)
    decoded = decode_fixed(total)
    delta = {k: (decoded[k] / n).to(base_state[k].dtype) for k in base_state}
    return delta, n, len(rows)


def redo_round(session: Session, settings: CoordinatorSettings, r: Round, now: datetime) -> None:
    """Close the secure round `r` without a result (`secagg_failed`) and open it again
    on the same base version."""
    from coordinator.rounds.service import open_round

    r.state = "closed"
    r.closed_at = now
    r.close_reason = "secagg_failed"
    open_round(session, settings, r.base_version)
    log.warning("secure round %s failed; redoing it on version %s", r.id, r.base_version)


def forget_revoked_node(
    session: Session, settings: CoordinatorSettings, r: Round, node_id: str, now: datetime
) -> None:
    """A node revoked while round `r` (locked, open) runs: before the seal its key is
    dropped; once it is in the sealed cohort its masks are in every peer's update and
    cannot be taken out without it, so the round is redone, unless it was already
    declared dropped: it stored no update, and the survivors' reveals remove its masks."""
    row = session.get(SecAggRound, r.id)
    if row is None or row.cohort is None:
        session.execute(
            delete(SecAggKey).where(SecAggKey.round_id == r.id, SecAggKey.node_id == node_id)
        )
    elif node_id in row.cohort and node_id not in (row.dropped or []):
        redo_round(session, settings, r, now)


def step_secure_round(
    session: Session,
    settings: CoordinatorSettings,
    cache: WeightCache,
    r: Round,
    now: datetime,
) -> int | None:
    """Advance the locked open round through seal / close / recover / redo."""
    from coordinator.rounds.service import _close_round

    row = _row(session, r.id)
    deadline_passed = now >= _aware(r.deadline)
    period = timedelta(seconds=settings.round_deadline_seconds)
    if row.cohort is None:
        keys = list(_keys(session, r.id))
        if len(keys) >= settings.effective_target_updates or (
            deadline_passed and len(keys) >= settings.min_updates
        ):
            _seal(row, keys, now)
            if deadline_passed:
                r.deadline = now + period
        elif deadline_passed:
            r.deadline = now + period
        session.commit()
        return None
    cohort = set(row.cohort)
    submitted = _submitted(session, r.id) & cohort
    if row.dropped is None:
        if submitted == cohort:
            version = _close_round(session, settings, cache, r, now)
            session.commit()
            return version
        if not deadline_passed:
            session.rollback()
            return None
        if len(submitted) >= settings.min_updates:
            row.dropped = sorted(cohort - submitted)
            row.recovery_deadline = now + period
            log.warning("round %s: nodes %s dropped; asking for seed reveals", r.id, row.dropped)
        else:
            redo_round(session, settings, r, now)
        session.commit()
        return None
    if len(submitted) < settings.min_updates or submitted | set(row.dropped) != cohort:
        # Masks of a member that is neither a survivor nor dropped (its update removed,
        # say) would stay in the sum: only a redo is safe.
        redo_round(session, settings, r, now)
        session.commit()
        return None
    needed = {(s, d) for s in submitted for d in row.dropped}
    if needed <= _revealed(session, r.id):
        version = _close_round(session, settings, cache, r, now)
        session.commit()
        return version
    if row.recovery_deadline is not None and now >= _aware(row.recovery_deadline):
        redo_round(session, settings, r, now)
        session.commit()
        return None
    session.rollback()
    return None
