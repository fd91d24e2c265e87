"""Secure aggregation: masking math, and the coordinator's protocol in-process (real DB)."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

import coordinator.rounds.service as rounds_service
from coordinator.app import create_app
from coordinator.models import SecAggRound
from coordinator.settings import CoordinatorSettings
from regional_node.secagg_agent import masked_payload
from shared.privacy_schemas import SecAggState
from shared.secagg import (
    MODULUS,
    SECAGG_ENCODING,
    add_mod,
    decode_fixed,
    encode_fixed,
    generate_keypair,
    mask_from_seed,
    mask_update,
    pairwise_seed,
    remove_dropout_masks,
    sum_residues,
    within_survivors_range,
)
from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes
from tests.conftest import tiny_catalog

ADMIN = "secagg-admin"


def test_fixed_point_round_trip_within_resolution() -> None:
    x = {"w": torch.tensor([0.0, 1.5, -2.25, 1e-9, -123456.789], dtype=torch.float64)}
    enc = encode_fixed(x)
    assert enc["w"].dtype == torch.int64 and bool((enc["w"] >= 0).all())
    assert bool((enc["w"] < MODULUS).all())
    back = decode_fixed(enc)["w"]
    assert torch.allclose(back, x["w"], atol=2**-24)
    with pytest.raises(ValueError, match="fixed-point range"):
        encode_fixed({"w": torch.tensor([2.0**40])})


def test_values_whose_sum_would_wrap_around_are_refused() -> None:
    """Three nodes at 5e10 per coordinate: each fits alone, their sum (1.5e11) does not,
    and once decoded as -1.25e11 with no error."""
    big = {"w": torch.tensor([5e10], dtype=torch.float64)}
    wrapped = decode_fixed(sum_residues([encode_fixed(big)] * 3))["w"]
    assert float(wrapped[0]) < 0  # what an unchecked sum gives
    with pytest.raises(ValueError, match="fixed-point range"):
        encode_fixed(big, summands=3)
    fits = decode_fixed(sum_residues([encode_fixed(big, summands=2)] * 2))["w"]
    assert float(fits[0]) == pytest.approx(1e11)


def test_pairwise_seeds_agree_and_masks_cancel_in_the_sum() -> None:
    nodes = ["a", "b", "c"]
    keys = {n: generate_keypair() for n in nodes}
    seed_ab = pairwise_seed(keys["a"][0], keys["b"][1], round_id=7, node_a="a", node_b="b")
    assert seed_ab == pairwise_seed(keys["b"][0], keys["a"][1], round_id=7, node_a="b", node_b="a")
    assert seed_ab != pairwise_seed(keys["a"][0], keys["b"][1], round_id=8, node_a="a", node_b="b")
    g = torch.Generator().manual_seed(0)
    updates = {n: {"w": torch.randn(4, 3, generator=g, dtype=torch.float64)} for n in nodes}
    masked = {}
    for n in nodes:
        seeds = {
            p: pairwise_seed(keys[n][0], keys[p][1], round_id=7, node_a=n, node_b=p)
            for p in nodes
            if p != n
        }
        masked[n] = mask_update(encode_fixed(updates[n]), n, seeds)
        # A single masked payload is uniform noise, far from the encoded update.
        assert not torch.equal(masked[n]["w"], encode_fixed(updates[n])["w"])
        assert float(decode_fixed(masked[n])["w"].abs().min()) > 1e3
    total = decode_fixed(sum_residues(masked.values()))["w"]
    assert torch.allclose(total, sum(u["w"] for u in updates.values()), atol=3 * 2**-24)

    # c drops: a and b reveal their seeds with c, and the sum of a and b comes out.
    reveals = [
        (s, "c", pairwise_seed(keys[s][0], keys["c"][1], round_id=7, node_a=s, node_b="c"))
        for s in ("a", "b")
    ]
    partial = remove_dropout_masks(sum_residues([masked["a"], masked["b"]]), reveals)
    expected = updates["a"]["w"] + updates["b"]["w"]
    assert torch.allclose(decode_fixed(partial)["w"], expected, atol=2 * 2**-24)


# --- the coordinator's protocol, in-process over HTTP --------------------------------------


def _coordinator(url: str, deadline: float) -> TestClient:
    settings = CoordinatorSettings(
        database_url=url,
        admin_token=ADMIN,
        min_updates=2,
        target_updates=3,
        round_deadline_seconds=deadline,
        round_check_seconds=0.1,
        embedding_dim=8,
        secure_aggregation=True,
    )
    return TestClient(create_app(settings))


def _setup(client: TestClient) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    tokens = {}
    for n in ("a", "b", "c"):
        r = client.post("/v1/nodes", json={"node_id": n, "region": n.upper()}, headers=admin)
        tokens[n] = r.json()["token"]
    assert client.put("/v1/catalog", json=tiny_catalog(), headers=admin).status_code == 200
    base = bytes_to_state(client.get("/v1/models/1/weights", headers=admin).content)
    return tokens, base


def _deltas(base: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return {
        n: {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
        for n in ("a", "b", "c")
    }


NUM = {"a": 10, "b": 20, "c": 30}


def _join(client: TestClient, tokens: dict[str, str]) -> dict[str, bytes]:
    private = {}
    for n, token in tokens.items():
        sk, pk = generate_keypair()
        private[n] = sk
        r = client.post(
            "/v1/rounds/1/secagg/keys",
            json={"public_key": base64.b64encode(pk).decode()},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
    state = SecAggState.model_validate(
        client.get("/v1/rounds/1/secagg", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    )
    assert state.sealed and [m.node_id for m in state.cohort] == ["a", "b", "c"]
    return private


def _submit(client: TestClient, n: str, token: str, delta: dict, private: bytes) -> int:  # type: ignore[type-arg]
    state = SecAggState.model_validate(
        client.get("/v1/rounds/1/secagg", headers={"Authorization": f"Bearer {token}"}).json()
    )
    payload = masked_payload(state_to_bytes(delta), NUM[n], n, 1, private, state)
    r = client.post(
        "/v1/rounds/1/updates",
        params={"num_examples": NUM[n], "base_version": 1},
        content=payload,
        headers={
            "Authorization": f"Bearer {token}",
            "X-Content-SHA256": sha256_hex(payload),
            "X-Update-Encoding": SECAGG_ENCODING,
        },
    )
    return r.status_code


def _wait_version(client: TestClient, version: int, timeout: float = 20) -> dict[str, torch.Tensor]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/models/{version}/weights", headers=admin)
        if r.status_code == 200:
            return bytes_to_state(r.content)
        time.sleep(0.1)
    raise AssertionError(f"version {version} never appeared")


def _fedavg(base: dict, deltas: dict, nodes: list[str]) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    n = sum(NUM[x] for x in nodes)
    return {k: base[k] + sum(deltas[x][k] * NUM[x] for x in nodes) / n for k in base}


def test_secure_round_aggregates_to_plain_fedavg(db_url: str) -> None:
    with _coordinator(db_url, deadline=60) as client:
        tokens, base = _setup(client)
        deltas = _deltas(base)
        private = _join(client, tokens)
        plain = state_to_bytes(deltas["a"])
        r = client.post(  # a plain update is refused when the coordinator requires masking
            "/v1/rounds/1/updates",
            params={"num_examples": 10, "base_version": 1},
            content=plain,
            headers={
                "Authorization": f"Bearer {tokens['a']}",
                "X-Content-SHA256": sha256_hex(plain),
            },
        )
        assert r.status_code == 422 and SECAGG_ENCODING in r.json()["detail"]
        for n in ("a", "b", "c"):
            assert _submit(client, n, tokens[n], deltas[n], private[n]) == 200
        new = _wait_version(client, 2)
        expected = _fedavg(base, deltas, ["a", "b", "c"])
        for k in base:
            assert torch.allclose(new[k], expected[k], atol=1e-6), k
        # What the coordinator stored per node is not the node's update.
        from sqlalchemy import create_engine, text

        engine = create_engine(db_url)
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT node_id, payload FROM updates")).all()
        engine.dispose()
        assert len(stored) == 3
        for node_id, payload in stored:
            masked = bytes_to_state(payload)
            honest = encode_fixed(
                {k: v.double() * NUM[node_id] for k, v in deltas[node_id].items()}
            )
            for k in base:
                assert masked[k].dtype == torch.int64
                assert float((masked[k] == honest[k]).double().mean()) < 0.01
            decoded = decode_fixed(masked)
            assert max(float(v.abs().max()) for v in decoded.values()) > 1e6


@dataclass
class DropoutRound:
    tokens: dict[str, str]
    base: dict[str, torch.Tensor]
    deltas: dict[str, dict[str, torch.Tensor]]
    private: dict[str, bytes]
    state: SecAggState  # once the coordinator declared c dropped


def _c_drops(client: TestClient, timeout: float = 15) -> DropoutRound:
    """Round 1 with cohort a, b, c: a and b submit, c never does; returns once the
    coordinator has declared the dropout (at the 2-s deadline)."""
    tokens, base = _setup(client)
    deltas = _deltas(base)
    private = _join(client, tokens)
    for n in ("a", "b"):
        assert _submit(client, n, tokens[n], deltas[n], private[n]) == 200
    admin = {"Authorization": f"Bearer {ADMIN}"}
    deadline = time.monotonic() + timeout
    while True:
        state = SecAggState.model_validate(client.get("/v1/rounds/1/secagg", headers=admin).json())
        if state.dropped or time.monotonic() > deadline:
            assert state.dropped == ["c"]
            return DropoutRound(tokens, base, deltas, private, state)
        time.sleep(0.1)


def _survivors_reveal_c(client: TestClient, dropout: DropoutRound) -> None:
    """a and b post their pairwise seeds with the dropped c."""
    cohort = {m.node_id: m.public_key for m in dropout.state.cohort}
    for s in ("a", "b"):
        seed = pairwise_seed(
            dropout.private[s], base64.b64decode(cohort["c"]), round_id=1, node_a=s, node_b="c"
        )
        r = client.post(
            "/v1/rounds/1/secagg/reveals",
            json={"seeds": {"c": seed.hex()}},
            headers={"Authorization": f"Bearer {dropout.tokens[s]}"},
        )
        assert r.status_code == 200, r.text


def test_dropped_node_is_recovered_by_seed_reveals(db_url: str) -> None:
    with _coordinator(db_url, deadline=2.0) as client:
        dropout = _c_drops(client)
        tokens, base, deltas, private = (
            dropout.tokens,
            dropout.base,
            dropout.deltas,
            dropout.private,
        )
        admin = {"Authorization": f"Bearer {ADMIN}"}
        # c comes back too late: refused, so its update can never be unmasked.
        assert _submit(client, "c", tokens["c"], deltas["c"], private["c"]) == 409
        # A seed not written as 64 hex characters is refused and stores nothing. Blanks
        # between the bytes (which bytes.fromhex takes) once overflowed PostgreSQL's
        # column (a 500) and were stored as they were on SQLite.
        seed = bytes(range(32))
        for bad in (" ".join(f"{b:02x}" for b in seed), seed.hex()[:-1], "zz" * 32, ""):
            r = client.post(
                "/v1/rounds/1/secagg/reveals",
                json={"seeds": {"c": bad}},
                headers={"Authorization": f"Bearer {tokens['a']}"},
            )
            assert r.status_code == 422 and r.json()["detail"], (bad, r.text)
        state = SecAggState.model_validate(client.get("/v1/rounds/1/secagg", headers=admin).json())
        assert state.revealed_by == []
        _survivors_reveal_c(client, dropout)
        new = _wait_version(client, 2)
        expected = _fedavg(base, deltas, ["a", "b"])
        for k in base:
            assert torch.allclose(new[k], expected[k], atol=1e-6), k
        meta = client.get("/v1/models/2", headers=admin).json()
        assert meta["metrics"]["num_updates"] == 2 and meta["metrics"]["num_examples"] == 30


def test_a_wrong_revealed_seed_makes_no_version_and_the_round_is_redone(
    tmp_path: Path,
) -> None:
    """a reveals a well-formed seed that is not its seed with c. The masks then do not
    cancel and the decoded sum is noise of up to 2**37: that was made the active version."""
    with _coordinator(f"sqlite:///{tmp_path / 'c.db'}", deadline=2.0) as client:
        dropout = _c_drops(client)
        cohort = {m.node_id: m.public_key for m in dropout.state.cohort}
        for s in ("a", "b"):
            seed = pairwise_seed(
                dropout.private[s], base64.b64decode(cohort["c"]), round_id=1, node_a=s, node_b="c"
            )
            told = bytes(b ^ 1 for b in seed) if s == "a" else seed  # a lies by one bit a byte
            r = client.post(
                "/v1/rounds/1/secagg/reveals",
                json={"seeds": {"c": told.hex()}},
                headers={"Authorization": f"Bearer {dropout.tokens[s]}"},
            )
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while client.get("/v1/rounds/1").json()["state"] == "open":
            assert time.monotonic() < deadline, "round 1 never closed"
            time.sleep(0.05)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert [m["version"] for m in client.get("/v1/models", headers=admin).json()] == [1]
        current = client.get("/v1/rounds/current").json()
        assert current["round_id"] == 2 and current["base_version"] == 1
        summary = client.get("/v1/dashboard/summary", headers=admin).json()
        closed = [x["close_reason"] for x in summary["rounds"] if x["round_id"] == 1]
        assert closed == ["secagg_failed"]


def test_within_survivors_range_tells_an_honest_sum_from_leftover_masks() -> None:
    """2 of a cohort of 3, each at the edge of its range: an honest sum passes; one mask
    left in it fails (a third of uniform residues fall outside 2/3 of the range)."""
    edge = {"w": torch.full((1000,), 2**61 / 3 * 0.999999 / 2**24)}
    honest = sum_residues([encode_fixed(edge, summands=3)] * 2)
    assert within_survivors_range(honest, survivors=2, cohort=3)
    leftover = add_mod(honest, mask_from_seed(bytes(32), {"w": (1000,)}))
    assert not within_survivors_range(leftover, survivors=2, cohort=3)
    assert within_survivors_range(leftover, survivors=3, cohort=3)  # the whole range


def test_an_upload_that_races_the_dropout_decision_is_refused(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c's upload passes its checks, then the round checker declares c dropped, then the
    upload would be stored. It once was (200): the survivors' revealed seeds with c then
    unmasked c's own update in the coordinator's database."""
    checked = rounds_service.check_masked_update

    def slow_check(session, settings, cache, r, node, payload, encoding):  # type: ignore[no-untyped-def]
        checked(session, settings, cache, r, node, payload, encoding)
        if node.node_id != "c":
            return
        session.commit()  # end this read (SQLite: its write lock) while c's upload "streams"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with session.get_bind().connect() as conn:
                row = conn.execute(
                    select(SecAggRound.dropped).where(SecAggRound.round_id == r.id)
                ).scalar()
            if row:
                return
            time.sleep(0.1)
        raise AssertionError("c was never declared dropped")

    monkeypatch.setattr(rounds_service, "check_masked_update", slow_check)
    with _coordinator(db_url, deadline=2.0) as client:
        tokens, base = _setup(client)
        deltas = _deltas(base)
        private = _join(client, tokens)
        assert _submit(client, "a", tokens["a"], deltas["a"], private["a"]) == 200
        assert _submit(client, "b", tokens["b"], deltas["b"], private["b"]) == 200
        assert _submit(client, "c", tokens["c"], deltas["c"], private["c"]) == 409
        admin = {"Authorization": f"Bearer {ADMIN}"}
        state = SecAggState.model_validate(client.get("/v1/rounds/1/secagg", headers=admin).json())
        assert state.dropped == ["c"] and state.submitted == ["a", "b"]


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (bytes(32), "usable X25519"),  # a low-order point: every exchange with it fails
        (bytes(31), "32-byte"),
    ],
    ids=["low-order point", "short"],
)
def test_a_key_no_peer_can_agree_a_seed_with_is_refused(
    tmp_path: Path, key: bytes, says: str
) -> None:
    """Once accepted, such a key sealed into the cohort and every honest node failed to
    mask, round after round."""
    with pytest.raises(ValueError):
        pairwise_seed(generate_keypair()[0], bytes(32), round_id=1, node_a="a", node_b="c")
    with _coordinator(f"sqlite:///{tmp_path / 'c.db'}", deadline=60) as client:
        tokens, _ = _setup(client)
        r = client.post(
            "/v1/rounds/1/secagg/keys",
            json={"public_key": base64.b64encode(key).decode()},
            headers={"Authorization": f"Bearer {tokens['c']}"},
        )
        assert r.status_code == 422 and says in r.json()["detail"], r.text
        state = client.get("/v1/rounds/1/secagg", headers={"Authorization": f"Bearer {ADMIN}"})
        assert state.json()["keys_received"] == 0
