"""The node's round loop against situations a live coordinator rarely produces on cue
(tests/fake_coordinator.py): each of these once left a node stuck, retrying, or
spending privacy budget on nothing."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from regional_node.client import CoordinatorError
from regional_node.participation import Participant
from regional_node.secagg_agent import MAX_DEADLINE_EXTENSIONS
from regional_node.service import node_status
from regional_node.trainer import TrainJob, run_train_job
from shared.privacy_schemas import CohortMember, SecAggState
from shared.schemas import EventIn
from shared.secagg import generate_keypair
from shared.training import TrainConfig
from tests.conftest import tiny_catalog, tiny_events
from tests.fake_coordinator import CONFIG, WEIGHTS, open_round, participant, secagg_state


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


EVENTS = tiny_events("eu", users=10, material="gold", seed=1, n_items=30)


def _steps(p: Participant, n: int) -> None:
    """n passes of the node's round loop, then the participant closed."""

    async def main() -> None:
        for _ in range(n):
            await p.step()
        await p.aclose()

    asyncio.run(main())


def _two_items_each(users: int) -> list[dict[str, object]]:
    return [
        {"user_id": f"u{u}", "item_id": item, "event_type": "view", "timestamp": 1000 + h}
        for u in range(users)
        for h, item in enumerate(["I001", f"I00{u + 2}"])
    ]


def test_a_killed_training_worker_is_replaced(tmp_path: Path) -> None:
    # The worker pool never recovers from a dead worker: every later round failed with
    # BrokenProcessPool until the node restarted.
    p, fake, store = participant(tmp_path, EVENTS)

    async def main() -> list[str]:
        await p.step()
        assert 1 in p.runtime.rounds_joined
        assert p._pool is not None
        for pid in list(p._pool._processes):  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)  # the OOM killer, say
        await asyncio.sleep(0.5)
        fake.round = open_round(2)
        errors = []
        for _ in range(3):  # the round loop's retries
            try:
                await p.step()
                break
            except Exception as exc:
                errors.append(type(exc).__name__)
        await p.aclose()
        return errors

    errors = asyncio.run(main())
    store.dispose()
    assert errors in ([], ["BrokenProcessPool"])
    assert 2 in p.runtime.rounds_joined and fake.calls.count("submit_update") == 2


def test_a_cohort_sealed_without_the_node_skips_the_round_quietly(tmp_path: Path) -> None:
    # A 409 on the key was raised out of the step: the round loop backed off and retried
    # the same round, publishing again each time.
    p, fake, store = participant(tmp_path, EVENTS, secure_aggregation=True)
    fake.publish_error = CoordinatorError(409, "the cohort of round 1 is sealed without 'node-1'")

    _steps(p, 3)
    status = node_status(p.settings, store, p.runtime)  # what /v1/status answers
    store.dispose()
    assert fake.calls.count("publish_secagg_key") == 1
    assert "submit_update" not in fake.calls
    assert p.runtime.rounds_skipped == {1} and p.runtime.last_round_joined is None
    assert status.last_round_skipped == 1 and status.last_round_joined is None
    assert status.last_round_skipped_reason == "the cohort of round 1 is sealed without 'node-1'"


@pytest.mark.parametrize("unknown_items", [False, True])
def test_a_node_with_nothing_to_train_publishes_no_key_and_joins_once_it_has(
    tmp_path: Path, unknown_items: bool
) -> None:
    # A key in the cohort promises an update; a node without examples published one
    # every poll and never submitted, so every round waited for its dropout. Events of
    # items the catalog does not hold give no example either. And the round must stay
    # the node's to join: the coordinator keeps it open until enough nodes sent.
    events = _two_items_each(3) if unknown_items else _two_items_each(1)[:1]
    if unknown_items:
        events = [{**e, "item_id": f"X{e['item_id']}"} for e in events]
    p, fake, store = participant(tmp_path, events, secure_aggregation=True)
    fake.secagg = fake.sealed_cohort
    runs: list[int] = []
    run_training = p._run_training

    async def counted(job):  # type: ignore[no-untyped-def]
        runs.append(1)
        return await run_training(job)

    p._run_training = counted  # type: ignore[method-assign]

    async def main() -> None:
        for _ in range(3):
            await p.step()
        assert "publish_secagg_key" not in fake.calls and "submit_update" not in fake.calls
        assert len(runs) == 1  # not retrained every poll while no event arrives
        if unknown_items:  # the catalog comes to hold the items: examples at last
            fake.catalog_items = [
                *fake.catalog_items,
                *({**fake.catalog_items[0], "item_id": i} for i in {e["item_id"] for e in events}),
            ]
            fake.catalog_version = 2
        else:
            store.add_events([EventIn.model_validate(e) for e in EVENTS])
        await p.step()
        await p.aclose()

    asyncio.run(main())
    store.dispose()
    assert fake.calls.count("publish_secagg_key") == 1 and fake.calls.count("submit_update") == 1
    assert p.runtime.rounds_joined == {1} and not p.runtime.rounds_skipped


def test_a_masking_that_gives_up_spends_no_privacy_budget(tmp_path: Path) -> None:
    # The ledger row was written before masking: a cohort that never sealed cost
    # epsilon 4.75 of the 8 budget for an update that was never sent.
    p, fake, store = participant(
        tmp_path, EVENTS, secure_aggregation=True, dp_enabled=True, secagg_wait_seconds=0.2
    )
    fake.round = open_round(deadline_in=-1)  # past: only the 0.2 s wait is left

    _steps(p, 1)
    assert p.accountant is not None
    assert p.accountant.releases() == [] and "submit_update" not in fake.calls
    assert p.runtime.rounds_skipped == {1}
    store.dispose()


def test_the_node_waits_for_the_cohort_until_the_round_deadline(tmp_path: Path) -> None:
    # The coordinator seals a short cohort at the round's deadline; the node gave up
    # after NODE_SECAGG_WAIT_SECONDS whatever the deadline, so with one node down and
    # a deadline longer than that wait, every round was redone.
    p, fake, store = participant(
        tmp_path, EVENTS, secure_aggregation=True, dp_enabled=True, secagg_wait_seconds=0.2
    )
    fake.round = open_round(deadline_in=1.5)
    sealed_at = time.monotonic() + 1.5
    fake.secagg = lambda: fake.sealed_cohort() if time.monotonic() > sealed_at else secagg_state()

    _steps(p, 1)
    assert p.accountant is not None
    assert fake.calls.count("submit_update") == 1 and len(p.accountant.releases()) == 1
    assert p.runtime.rounds_joined == {1} and p.runtime.dp_epsilon is not None
    store.dispose()


@pytest.mark.parametrize("reread_fails_once", [False, True])
def test_the_node_follows_a_deadline_the_coordinator_pushed_back(
    tmp_path: Path, reread_fails_once: bool
) -> None:
    # An unsealed round with too few keys at its deadline gets a later one; the node gave
    # up at the first deadline while its key stayed, so a peer's later key sealed a
    # cohort with this node in it and no update from it: the round was redone. A failed
    # re-read of the round is polled again, not a failed step.
    p, fake, store = participant(tmp_path, EVENTS, secure_aggregation=True, secagg_wait_seconds=0.2)
    fake.round = open_round(deadline_in=0.1)  # passed by the time training is done
    first: list[float] = []
    if reread_fails_once:
        current_round = fake.current_round

        async def flaky(**kwargs):  # type: ignore[no-untyped-def]
            if first and not getattr(flaky, "failed", False):  # the re-read while masking
                flaky.failed = True  # type: ignore[attr-defined]
                raise httpx.ConnectError("coordinator restarting")
            return await current_round(**kwargs)

        fake.current_round = flaky  # type: ignore[method-assign]

    def state() -> SecAggState:
        first.append(time.monotonic())
        if len(first) == 1:  # deadline passed with one key: the coordinator pushed it back
            fake.round = open_round(deadline_in=2.0)
        return fake.sealed_cohort() if first[-1] > first[0] + 1.0 else secagg_state()

    fake.secagg = state
    _steps(p, 1)
    store.dispose()
    assert fake.calls.count("submit_update") == 1
    assert p.runtime.rounds_joined == {1} and not p.runtime.rounds_skipped
    assert getattr(fake.current_round, "failed", reread_fails_once) == reread_fails_once


def test_a_deadline_pushed_back_for_ever_is_followed_only_so_far(tmp_path: Path) -> None:
    # With too few nodes alive the coordinator moves an unsealed round's deadline for
    # ever; the node must get back to its loop (catalog, serving, status) at some point.
    p, fake, store = participant(tmp_path, EVENTS, secure_aggregation=True, secagg_wait_seconds=0.1)
    fake.round = open_round(deadline_in=0.1)
    pushes: list[int] = []

    def state() -> SecAggState:
        if fake.round.deadline < datetime.now(UTC):  # passed: the coordinator moves it
            fake.round = open_round(deadline_in=0.2)
            pushes.append(1)
        return secagg_state()  # never sealed

    fake.secagg = state
    _steps(p, 1)
    store.dispose()
    assert "submit_update" not in fake.calls and p.runtime.rounds_skipped == {1}
    assert p.runtime.last_round_skipped is not None
    assert "not sealed in time" in p.runtime.last_round_skipped[1]
    assert len(pushes) >= MAX_DEADLINE_EXTENSIONS


def test_too_few_users_for_a_metric_keep_their_last_items_for_training(tmp_path: Path) -> None:
    # The held-out items were withheld even when too few users were held out for the
    # metric to be sent: three users with two items each trained on nothing.
    _, _, store = participant(tmp_path, _two_items_each(3))
    job = TrainJob(
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        catalog=tiny_catalog(30),
        base_weights=WEIGHTS,
        model_config=CONFIG.model_dump(),
        train_config=TrainConfig(epochs=1),
        holdout_eval=True,
        min_users_for_metrics=20,
    )
    few = run_train_job(job)
    assert few is not None and few.num_examples == 3 and "hr@10" not in few.metrics
    many = run_train_job(dataclasses.replace(job, min_users_for_metrics=3))
    assert many is None  # held out for a metric: nothing left to train on
    store.dispose()


def test_seed_reveals_are_answered_while_the_node_fine_tunes(tmp_path: Path) -> None:
    # A DP node fine-tunes (NODE_DP_PERSONALIZE_EPOCHS) while its secure round is still
    # open; reveals were answered only between steps, so a dropped peer's round waited
    # for the whole fine-tune, and was redone when that outlasted its recovery period.
    p, fake, store = participant(tmp_path, EVENTS, secure_aggregation=True, dp_enabled=True)
    _, peer_key = generate_keypair()
    fake.round = open_round(deadline_in=0.5)

    def state() -> SecAggState:  # sealed with a peer, which drops once node-1 submitted
        peer = CohortMember(node_id="node-2", public_key=b64(peer_key))
        cohort = [*fake.sealed_cohort().cohort, peer]
        if "submit_update" not in fake.calls:
            return secagg_state(sealed=True, cohort=cohort)
        return secagg_state(sealed=True, cohort=cohort, submitted=["node-1"], dropped=["node-2"])

    fake.secagg = state

    async def main() -> None:
        await p.step()  # trains, masks, submits round 1
        assert fake.calls.count("submit_update") == 1 and "reveal" not in fake.calls
        watch = asyncio.create_task(p._round_wanting_this_node())  # the fine-tune's watch
        await asyncio.sleep(0.3)
        watch.cancel()
        await p.aclose()

    asyncio.run(main())
    store.dispose()
    assert "reveal" in fake.calls


def test_the_fine_tunes_round_watch_outlives_a_failed_reveal(tmp_path: Path) -> None:
    # One coordinator error while answering reveals ended the watch: for the rest of the
    # fine-tune the node neither answered reveals nor stopped for a new round.
    p, fake, store = participant(tmp_path, EVENTS, secure_aggregation=True)
    failures = [httpx.ConnectError("coordinator restarting")]
    state = fake.secagg

    def flaky() -> SecAggState:
        if failures:
            raise failures.pop()
        return state()

    async def main() -> None:
        p._round_seen = 1
        p.runtime.rounds_joined.add(1)
        p.secagg._keys[1] = None  # type: ignore[union-attr,assignment]  # a round it is in
        fake.secagg = flaky
        watch = asyncio.create_task(p._round_wanting_this_node())
        await asyncio.sleep(0.2)
        fake.round = open_round(2)
        found = await asyncio.wait_for(watch, 5)
        assert found.round_id == 2 and not failures
        await p.aclose()

    asyncio.run(main())
    store.dispose()
