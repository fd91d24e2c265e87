"""Exactly-once rounds and crash recovery: real coordinator processes on PostgreSQL.

The test plays the nodes itself (deterministic deltas over HTTP with real node
tokens), so it can kill the coordinator at exact moments and compare the
result with what FedAvg over the same updates gives.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import torch

from coordinator.aggregation import (
    WeightedMeanAccumulator,
    aggregate_weighted_mean,
    apply_delta,
    apply_delta_in_place,
)
from shared.devservers import ServiceProcess, wait_for
from shared.serialization import bytes_to_state
from tests.conftest import PG_URL_BASE, _pg_admin, _require_postgres, tiny_catalog
from tests.sec_support import (
    ADMIN,
    bearer,
    row_counts,
    seeded_delta,
    start_coordinator,
    submit,
)

pytestmark = [pytest.mark.postgres, pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def pg_urls() -> Iterator[tuple[str, str]]:
    """Two fresh PostgreSQL databases (a crashed run and an uninterrupted reference)."""
    _require_postgres()
    names = [f"fedjewel_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    with _pg_admin() as conn:
        for name in names:
            conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_URL_BASE}/{names[0]}", f"{PG_URL_BASE}/{names[1]}"
    finally:
        with _pg_admin() as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _coordinator(db_url: str, log: Path, *, port: int | None = None, **env: str) -> ServiceProcess:
    settings = {"min_updates": "3", "round_deadline_seconds": "600", **env}
    return start_coordinator(db_url, log, port=port, **settings)


def _setup(url: str, nodes: int) -> tuple[httpx.Client, list[dict[str, str]], bytes]:
    """Catalog + registered nodes; returns an admin client, node headers, version 1 weights."""
    admin = httpx.Client(base_url=url, headers=ADMIN, timeout=30)
    admin.put("/v1/catalog", json=tiny_catalog(30)).raise_for_status()
    tokens = []
    for i in range(nodes):
        r = admin.post("/v1/nodes", json={"node_id": f"n{i:02d}", "region": "EU"})
        r.raise_for_status()
        tokens.append(bearer(r.json()["token"]))
    weights = admin.get("/v1/models/1/weights")
    weights.raise_for_status()
    return admin, tokens, weights.content


def _expected(weights: bytes, deltas: list[tuple[bytes, int]]) -> dict[str, torch.Tensor]:
    """base + FedAvg computed the way the coordinator does (float32 running sum, in place)."""
    base = bytes_to_state(weights)
    acc = WeightedMeanAccumulator(dtype=None)
    for d, n in deltas:
        acc.add(bytes_to_state(d), n)
    lean = apply_delta_in_place(acc.take_result(), base)
    # ... which is FedAvg: the float64 reference agrees to float32 rounding.
    reference = apply_delta(
        base, aggregate_weighted_mean((bytes_to_state(d), n) for d, n in deltas)
    )
    assert all(torch.allclose(lean[k], reference[k], atol=1e-6) for k in reference)
    return lean


def _assert_version_is_fedavg(
    admin: httpx.Client, version: int, weights: bytes, deltas: list[tuple[bytes, int]]
) -> None:
    """The version's weights equal base + FedAvg(deltas), bit for bit."""
    r = admin.get(f"/v1/models/{version}/weights")
    r.raise_for_status()
    got = bytes_to_state(r.content)
    expected = _expected(weights, deltas)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def _latest(admin: httpx.Client) -> int:
    return int(admin.get("/v1/models/latest").json()["version"])


def test_kill_9_keeps_stored_updates(pg_url: str, tmp_path: Path) -> None:
    procs: list[ServiceProcess] = []
    try:
        coord = _coordinator(pg_url, tmp_path / "coordinator.log")
        procs.append(coord)
        admin, nodes, weights = _setup(coord.url, 3)
        client = httpx.Client(base_url=coord.url, timeout=30)
        deltas = [(seeded_delta(weights, i), 10 * (i + 1)) for i in range(3)]
        first = []
        for headers, (delta, n) in zip(nodes[:2], deltas[:2], strict=True):
            r = submit(client, headers, delta, num_examples=n)
            assert r.status_code == 200, r.text
            first.append(r.json())

        coord.kill()  # SIGKILL: no shutdown hook runs
        coord = _coordinator(pg_url, tmp_path / "coordinator-2.log", port=coord.port)
        procs.append(coord)

        rnd = admin.get("/v1/rounds/current").json()
        assert (rnd["round_id"], rnd["updates_received"]) == (1, 2)
        assert rnd["participants"] == ["n00", "n01"]
        # A node that retries after the crash gets its first receipt back, counted once.
        again = submit(client, nodes[0], deltas[0][0], num_examples=deltas[0][1])
        assert again.status_code == 200
        assert again.json()["duplicate"] is True
        assert again.json()["accepted_at"] == first[0]["accepted_at"]
        r = submit(client, nodes[2], deltas[2][0], num_examples=deltas[2][1])
        assert r.status_code == 200, r.text

        wait_for(lambda: _latest(admin) == 2, 60, "round 1 to close", procs)
        v2 = admin.get("/v1/models/2").json()
        assert v2["metrics"]["num_updates"] == 3.0 and v2["metrics"]["num_examples"] == 60.0
        _assert_version_is_fedavg(admin, 2, weights, deltas)
    finally:
        for p in reversed(procs):
            p.stop()


def test_kill_9_during_aggregation_gives_exactly_one_version(
    pg_urls: tuple[str, str], tmp_path: Path
) -> None:
    crashed_db, reference_db = pg_urls
    procs: list[ServiceProcess] = []
    try:
        # COORDINATOR_AGGREGATION_DELAY_SECONDS is a test-only setting: the closer sleeps
        # after aggregating, inside the closing transaction, so the kill lands there.
        coord = _coordinator(crashed_db, tmp_path / "crashing.log", aggregation_delay_seconds="120")
        procs.append(coord)
        admin, nodes, weights = _setup(coord.url, 3)
        client = httpx.Client(base_url=coord.url, timeout=30)
        deltas = [(seeded_delta(weights, 100 + i), 7 + i) for i in range(3)]
        for headers, (delta, n) in zip(nodes, deltas, strict=True):
            assert submit(client, headers, delta, num_examples=n).status_code == 200
        wait_for(
            lambda: "delaying commit" in coord.tail_log(200),
            60,
            "the closer to be inside the closing transaction",
            procs,
        )
        coord.kill()
        counts = row_counts(crashed_db)
        assert counts["model_versions"] == 1 and counts["rounds"] == 1
        assert counts["updates"] == 3

        coord = _coordinator(crashed_db, tmp_path / "recovered.log", port=coord.port)
        procs.append(coord)
        wait_for(lambda: _latest(admin) == 2, 60, "the round to close after restart", procs)
        ref = _coordinator(reference_db, tmp_path / "reference.log")
        procs.append(ref)
        ref_admin, ref_nodes, ref_weights = _setup(ref.url, 3)
        assert ref_weights == weights
        ref_client = httpx.Client(base_url=ref.url, timeout=30)
        for headers, (delta, n) in zip(ref_nodes, deltas, strict=True):
            assert submit(ref_client, headers, delta, num_examples=n).status_code == 200
        wait_for(lambda: _latest(ref_admin) == 2, 60, "the reference round", procs)

        counts = row_counts(crashed_db)
        assert counts["model_versions"] == 2  # exactly one new version
        rounds = admin.get("/v1/rounds").json()
        # (A PostgreSQL sequence value used by the rolled-back close may leave a gap in
        # round ids; there is still exactly one closed round and one open one.)
        assert [r["state"] for r in rounds] == ["open", "closed"]
        assert rounds[1]["round_id"] == 1 and rounds[1]["result_version"] == 2
        assert rounds[0]["base_version"] == 2
        assert (
            admin.get("/v1/models/2").json()["sha256"]
            == (ref_admin.get("/v1/models/2").json()["sha256"])
        )
        _assert_version_is_fedavg(admin, 2, weights, deltas)
    finally:
        for p in reversed(procs):
            p.stop()


def test_concurrent_submissions_from_many_nodes(pg_url: str, tmp_path: Path) -> None:
    """12 nodes each send the same update twice at once: 12 rows, one version."""
    procs: list[ServiceProcess] = []
    try:
        coord = _coordinator(pg_url, tmp_path / "coordinator.log", min_updates="12")
        procs.append(coord)
        admin, nodes, weights = _setup(coord.url, 12)
        deltas = [(seeded_delta(weights, 200 + i), 5 + i) for i in range(12)]
        results: list[tuple[int, int, dict[str, object]]] = []
        lock = threading.Lock()
        start = threading.Barrier(24)

        def send(i: int) -> None:
            with httpx.Client(base_url=coord.url, timeout=60) as client:
                start.wait()
                r = submit(client, nodes[i], deltas[i][0], num_examples=deltas[i][1])
                with lock:
                    results.append((i, r.status_code, r.json()))

        threads = [threading.Thread(target=send, args=(i % 12,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results) == 24
        assert all(status == 200 for _, status, _ in results), results
        for i in range(12):
            mine = [body for j, _, body in results if j == i]
            assert sorted(bool(b["duplicate"]) for b in mine) == [False, True], mine
            assert mine[0]["accepted_at"] == mine[1]["accepted_at"]

        wait_for(lambda: _latest(admin) == 2, 60, "the round to close", procs)
        counts = row_counts(pg_url)
        assert counts["updates"] == 12 and counts["model_versions"] == 2
        closed = admin.get("/v1/rounds/1").json()
        assert closed["state"] == "closed" and len(closed["participants"]) == 12
        _assert_version_is_fedavg(admin, 2, weights, deltas)
        # A different second update of the same node and round is refused.
        client = httpx.Client(base_url=coord.url, timeout=30)
        r = submit(client, nodes[0], seeded_delta(weights, 999), num_examples=5)
        assert r.status_code == 409
    finally:
        for p in reversed(procs):
            p.stop()


def test_a_promote_during_a_round_close_leaves_one_active_version(
    pg_url: str, tmp_path: Path
) -> None:
    """The promote waits for the close it raced with and then supersedes its result.

    It once retired only what was active before the close committed: the close's version
    and the promoted one were both active, and the open round trained on the other one.
    """
    coord = _coordinator(pg_url, tmp_path / "coordinator.log", aggregation_delay_seconds="3")
    try:
        admin, nodes, weights = _setup(coord.url, 3)
        client = httpx.Client(base_url=coord.url, timeout=30)
        for i, headers in enumerate(nodes):
            assert submit(client, headers, seeded_delta(weights, i)).status_code == 200
        wait_for(lambda: _latest(admin) == 2, 60, "round 1 to close", [coord])
        weights_2 = admin.get("/v1/models/2/weights").content
        round_2 = admin.get("/v1/rounds/current").json()["round_id"]
        for i, headers in enumerate(nodes):
            r = submit(
                client, headers, seeded_delta(weights_2, 10 + i), round_id=round_2, base_version=2
            )
            assert r.status_code == 200, r.text
        wait_for(
            lambda: coord.tail_log(200).count("delaying commit") >= 2,
            60,
            "the closer to be inside round 2's closing transaction",
            [coord],
        )
        assert admin.post("/v1/models/1/promote").status_code == 200
        statuses = {m["version"]: m["status"] for m in admin.get("/v1/models").json()}
        assert statuses == {1: "active", 2: "retired", 3: "retired"}, statuses
        assert _latest(admin) == 1
        rounds = admin.get("/v1/rounds").json()
        assert [(r["state"], r["base_version"]) for r in rounds][:2] == [
            ("open", 1),
            ("closed", 3),
        ], rounds
    finally:
        coord.stop()


def test_the_round_a_promote_opens_gets_a_full_round_period(pg_url: str, tmp_path: Path) -> None:
    """Not the span of the round it supersedes, which quorum extensions may have grown."""
    coord = _coordinator(
        pg_url, tmp_path / "coordinator.log", min_updates="1", round_deadline_seconds="2"
    )
    try:
        admin, nodes, weights = _setup(coord.url, 1)
        client = httpx.Client(base_url=coord.url, timeout=30)
        assert submit(client, nodes[0], seeded_delta(weights, 0)).status_code == 200
        wait_for(lambda: _latest(admin) == 2, 60, "round 1 to close", [coord])
        wait_for(
            lambda: coord.tail_log(200).count("round 2 extended") >= 2,
            60,
            "round 2 to be extended twice (no updates)",
            [coord],
        )
        assert admin.post("/v1/models/1/promote").status_code == 200
        current = admin.get("/v1/rounds/current").json()
        assert current["base_version"] == 1
        span = datetime.fromisoformat(current["deadline"]) - datetime.fromisoformat(
            current["created_at"]
        )
        assert span.total_seconds() == pytest.approx(2, abs=0.5), current
    finally:
        coord.stop()


def test_concurrent_catalog_uploads_all_land(pg_url: str, tmp_path: Path) -> None:
    """Four admins upload new items at once, three times: every upload is answered 200
    and every item gets its own row (two uploads once numbered theirs alike: 500s)."""
    coord = _coordinator(pg_url, tmp_path / "coordinator.log")
    try:
        admin = httpx.Client(base_url=coord.url, headers=ADMIN, timeout=60)
        statuses: list[int] = []

        def upload(tag: str, barrier: threading.Barrier) -> None:
            items = [{"item_id": f"{tag}-{i:03d}"} for i in range(20)]
            barrier.wait()
            statuses.append(admin.put("/v1/catalog", json=items).status_code)

        for batch in range(3):
            barrier = threading.Barrier(4)
            threads = [
                threading.Thread(target=upload, args=(f"B{batch}T{t}", barrier)) for t in range(4)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert statuses == [200] * 12
        catalog = admin.get("/v1/catalog").json()
        assert len({item["item_id"] for item in catalog["items"]}) == 240
        assert [m["version"] for m in admin.get("/v1/models").json()] == [1]
    finally:
        coord.stop()


def test_two_promotes_at_once_leave_one_active_version(pg_url: str) -> None:
    # With no open round to lock (after COORDINATOR_MAX_ROUNDS, say), two concurrent
    # promotes each retired the versions active when they started, and both left theirs
    # active (1 race in 30 here before the advisory lock).
    from sqlalchemy import select

    from coordinator.db import Database
    from coordinator.models import ModelVersion
    from coordinator.models_registry.service import create_version
    from coordinator.rounds.service import promote_version
    from coordinator.settings import CoordinatorSettings
    from shared.model import ModelConfig, init_state

    db = Database(pg_url)
    db.migrate()
    settings = CoordinatorSettings(database_url=pg_url, admin_token="x", max_rounds=1)
    config = ModelConfig(num_items=5, embedding_dim=4)
    with db.sessions() as s:
        for status in ("active", "retired", "retired"):
            create_version(s, init_state(config), config, metrics={}, round_id=None, status=status)
        s.commit()
    doubles = 0
    for _ in range(40):
        with db.sessions() as s:
            for row in s.scalars(select(ModelVersion)):
                row.status = "active" if row.version == 1 else "retired"
            s.commit()

        def promote(version: int) -> None:
            with db.sessions() as s:
                promote_version(s, settings, version)

        threads = [threading.Thread(target=promote, args=(v,)) for v in (2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with db.sessions() as s:
            active = s.scalars(select(ModelVersion.version).where(ModelVersion.status == "active"))
            doubles += len(list(active)) != 1
    db.dispose()
    assert doubles == 0


def test_a_resume_beside_a_promote_leaves_one_open_round(pg_url: str) -> None:
    # The round closer's resume checked "no open round" without the promotes' lock: a
    # promote opening a round at the same moment (its transaction not yet committed)
    # and the resume each opened one, leaving two rounds open.
    import time

    from sqlalchemy import func, select

    from coordinator.db import Database
    from coordinator.models import Round
    from coordinator.models_registry.service import create_version
    from coordinator.rounds.service import _PROMOTE_LOCK, open_round, resume_rounds
    from coordinator.settings import CoordinatorSettings
    from shared.model import ModelConfig, init_state

    db = Database(pg_url)
    db.migrate()
    settings = CoordinatorSettings(database_url=pg_url, admin_token="x")
    config = ModelConfig(num_items=5, embedding_dim=4)
    with db.sessions() as s:
        create_version(s, init_state(config), config, metrics={}, round_id=None, status="active")
        s.commit()
    resumed: list[object] = []
    with db.sessions() as promote:  # a promote in flight: holds the lock, opens a round
        promote.execute(select(func.pg_advisory_xact_lock(_PROMOTE_LOCK)))
        open_round(promote, settings, 1)
        promote.flush()

        def resume() -> None:
            with db.sessions() as s:
                resumed.append(resume_rounds(s, settings))

        thread = threading.Thread(target=resume)
        thread.start()
        time.sleep(0.5)
        promote.commit()
    thread.join()
    with db.sessions() as s:
        open_rounds = list(s.scalars(select(Round.id).where(Round.state == "open")))
    db.dispose()
    assert resumed == [None] and len(open_rounds) == 1
