"""docker-compose.yml: static checks against the code, and the file itself run end to end."""

from __future__ import annotations

import importlib.util
import re
import secrets
import time
from pathlib import Path

import httpx
import pytest

from coordinator.nodes.bootstrap import parse_bootstrap_nodes
from coordinator.settings import CoordinatorSettings
from regional_node.settings import NodeSettings
from shared.client import NodeApiError, NodeClient, RecommendFilters
from tests.compose_harness import (
    ComposeError,
    ComposeHarness,
    ComposeService,
    interpolate,
    load_compose,
    parse_duration,
    start_order,
)
from tests.conftest import tiny_catalog, tiny_events
from tests.test_e2e import _assert_no_private_data

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
NODE_SERVICES = ("node-eu", "node-na", "node-me")


@pytest.fixture(scope="module")
def services() -> dict[str, ComposeService]:
    return load_compose(COMPOSE, {})


def _fedjewel_services(services: dict[str, ComposeService]) -> list[ComposeService]:
    return [s for s in services.values() if s.image == "fedjewel:latest"]


# --------------------------------------------------------------------------- harness units


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET}", env) == "x"
    assert interpolate("${MISSING}", env) == ""
    assert interpolate("${EMPTY:-d}", env) == "d"
    assert interpolate("${EMPTY-d}", env) == ""
    assert interpolate("${MISSING-d}", env) == "d"
    assert interpolate("a-${SET:-d}-$SET-$$HOME", env) == "a-x-x-$HOME"


def test_durations_and_start_order() -> None:
    assert parse_duration("5s", 0) == 5.0
    assert parse_duration("1m30s", 0) == 90.0
    assert parse_duration("250ms", 0) == 0.25
    assert parse_duration(None, 7.0) == 7.0
    with pytest.raises(ComposeError):
        parse_duration("5 seconds", 0)

    def svc(name: str, *deps: str) -> ComposeService:
        return ComposeService(
            name, None, None, (), {}, (), (), {d: "service_healthy" for d in deps}, None
        )

    assert start_order({"b": svc("b", "a"), "a": svc("a"), "c": svc("c", "b")}) == ["a", "b", "c"]
    with pytest.raises(ComposeError, match="cycle"):
        start_order({"a": svc("a", "b"), "b": svc("b", "a")})
    with pytest.raises(ComposeError, match="unknown"):
        start_order({"a": svc("a", "nope")})


def test_rewrites_map_container_names_ports_and_volumes(tmp_path: Path) -> None:
    h = ComposeHarness(COMPOSE, workdir=tmp_path, postgres_url="postgresql+psycopg://x@h/db1")
    coord = h.ports["coordinator"][8000]
    eu = h.ports["node-eu"][8100]
    assert h.rewrite("node-eu", "http://coordinator:8000") == f"http://127.0.0.1:{coord}"
    assert h.rewrite("node-eu", "--host 0.0.0.0 --port 8100") == f"--host 127.0.0.1 --port {eu}"
    assert h.rewrite("node-eu", "http://127.0.0.1:8100/readyz") == f"http://127.0.0.1:{eu}/readyz"
    assert h.rewrite_argv("node-eu", ("python", "--host", "0.0.0.0", "--port", "8100")) == [
        "python",
        "--host",
        "127.0.0.1",
        "--port",
        str(eu),
    ]
    assert h.rewrite("node-eu", "sqlite:////data/node.db") == (
        f"sqlite:///{tmp_path}/volumes/node-eu-data/node.db"
    )
    assert (
        h.rewrite("coordinator", "postgresql+psycopg://u:p@postgres:5432/coordinator")
        == "postgresql+psycopg://x@h/db1"
    )
    # Each node's volume is its own directory.
    assert h.rewrite("node-na", "/data/x") != h.rewrite("node-eu", "/data/x")


# --------------------------------------------------------------------------- static checks


def test_services_and_dependencies(services: dict[str, ComposeService]) -> None:
    assert set(services) == {"postgres", "coordinator", *NODE_SERVICES}
    assert start_order(services)[:2] == ["postgres", "coordinator"]
    assert services["coordinator"].depends_on == {"postgres": "service_healthy"}
    for name in NODE_SERVICES:
        assert services[name].depends_on == {"coordinator": "service_healthy"}
    for svc in services.values():
        for dep, condition in svc.depends_on.items():
            assert condition == "service_healthy"
            assert services[dep].healthcheck is not None, f"{svc.name} waits on {dep}"
    assert services["postgres"].healthcheck is not None
    assert services["postgres"].healthcheck.argv[-1].startswith("pg_isready")
    assert "/readyz" in " ".join(services["coordinator"].healthcheck.argv)  # type: ignore[union-attr]


def test_environment_names_are_settings_fields(services: dict[str, ComposeService]) -> None:
    fields = {
        "COORDINATOR_": set(CoordinatorSettings.model_fields),
        "NODE_": set(NodeSettings.model_fields),
    }
    for svc in _fedjewel_services(services):
        assert svc.environment, svc.name
        for key in svc.environment:
            prefix = next((p for p in fields if key.startswith(p)), None)
            assert prefix is not None, f"{svc.name}: {key} has no settings prefix"
            assert key.removeprefix(prefix).lower() in fields[prefix], f"{svc.name}: {key}"


def test_environment_values_are_valid_settings(services: dict[str, ComposeService]) -> None:
    coord = services["coordinator"].environment
    CoordinatorSettings(**{k.removeprefix("COORDINATOR_").lower(): v for k, v in coord.items()})
    for name in NODE_SERVICES:
        env = services[name].environment
        NodeSettings(**{k.removeprefix("NODE_").lower(): v for k, v in env.items()})


def test_node_tokens_match_the_bootstrap_list() -> None:
    secrets_env = {f"{p}_NODE_SECRET": secrets.token_hex(12) for p in ("EU1", "NA1", "ME1")}
    services = load_compose(COMPOSE, secrets_env)
    bootstrap = {
        b.node_id: b
        for b in parse_bootstrap_nodes(
            services["coordinator"].environment["COORDINATOR_BOOTSTRAP_NODES"]
        )
    }
    node_ids = []
    for name in NODE_SERVICES:
        env = services[name].environment
        spec = bootstrap[env["NODE_ID"]]
        assert env["NODE_TOKEN"] == spec.token
        assert env["NODE_REGION"] == spec.region
        assert spec.secret in secrets_env.values()
        node_ids.append(env["NODE_ID"])
    assert sorted(node_ids) == sorted(bootstrap)


def test_each_node_has_its_own_volume_and_database(services: dict[str, ComposeService]) -> None:
    volumes = []
    for name in NODE_SERVICES:
        svc = services[name]
        ((source, target),) = svc.volumes
        volumes.append(source)
        assert svc.environment["NODE_DATABASE_URL"].startswith(f"sqlite:///{target}/")
        assert svc.environment["NODE_COORDINATOR_URL"] == "http://coordinator:8000"
    assert len(set(volumes)) == len(NODE_SERVICES)


def test_commands_reference_existing_modules(services: dict[str, ComposeService]) -> None:
    coord_cmd = " ".join(services["coordinator"].command)
    assert re.search(r"--migrate-only && python -m coordinator --host 0\.0\.0\.0", coord_cmd)
    for svc in _fedjewel_services(services):
        argv = " ".join(svc.command) + " " + " ".join(svc.healthcheck.argv)  # type: ignore[union-attr]
        modules = re.findall(r"python -m ([\w.]+)", argv)
        assert modules, svc.name
        for module in modules:
            assert importlib.util.find_spec(module) is not None, f"{svc.name}: {module}"


def test_build_context_holds_what_the_dockerfile_copies(
    services: dict[str, ComposeService],
) -> None:
    assert {s.build for s in _fedjewel_services(services)} == {"."}
    context = ROOT / (services["coordinator"].build or "")
    dockerfile = (context / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (context / source).exists(), f"Dockerfile copies missing {source}"
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in dockerfile
    assert {s.image for s in _fedjewel_services(services)} == {"fedjewel:latest"}


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.postgres
def test_compose_file_runs_end_to_end(pg_url: str, tmp_path: Path) -> None:
    admin, key = secrets.token_hex(16), secrets.token_hex(16)
    env = {
        "COORDINATOR_ADMIN_TOKEN": admin,
        "STOREFRONT_API_KEY": key,
        "EU1_NODE_SECRET": secrets.token_hex(12),
        "NODE_POLL_SECONDS": "0.5",
        "NODE_LOCAL_EPOCHS": "1",
        "NODE_MIN_USERS_FOR_METRICS": "5",
    }
    harness = ComposeHarness(COMPOSE, workdir=tmp_path, postgres_url=pg_url, env=env)
    try:
        harness.up(timeout=180)
        coord = httpx.Client(
            base_url=harness.url("coordinator"),
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        catalog = tiny_catalog()
        assert coord.put("/v1/catalog", json=catalog).status_code == 200
        materials = ("silver", "gold", "platinum")
        for i, (name, material) in enumerate(zip(NODE_SERVICES, materials, strict=True)):
            with NodeClient(harness.url(name), api_key=key) as node:
                events = tiny_events(name, users=40, material=material, seed=i)
                accepted = node.send_events(events, batch_size=500)
                assert accepted.inserted == len(events)
            with (
                NodeClient(harness.url(name), api_key="wrong") as bad,
                pytest.raises(NodeApiError) as err,
            ):
                bad.recommend(k=3)
            assert err.value.status_code == 401 and err.value.detail

        deadline = time.monotonic() + 240
        while coord.get("/v1/models/latest").json()["version"] < 3:
            assert time.monotonic() < deadline, "two rounds did not complete\n" + harness.logs()
            time.sleep(0.5)
        closed = [r for r in coord.get("/v1/rounds").json() if r["state"] == "closed"]
        assert len(closed) >= 2
        assert all(len(r["participants"]) == 3 for r in closed)
        nodes = coord.get("/v1/nodes").json()
        assert sorted(n["node_id"] for n in nodes) == ["eu-1", "me-1", "na-1"]
        assert all(n["last_seen_at"] is not None for n in nodes)

        by_id = {c["item_id"]: c for c in catalog}
        with NodeClient(harness.url("node-eu"), api_key=key) as node:
            deadline = time.monotonic() + 60
            while node.status().model_version is None or node.status().model_version < 3:
                assert time.monotonic() < deadline, harness.logs()
                time.sleep(0.5)
            recs = node.recommend(
                session_items=["I001", "I005"], k=5, filters=RecommendFilters(material="gold")
            )
        assert recs.strategy == "model" and recs.model_version is not None
        assert len(recs.items) == 5
        assert all(by_id[it.item_id]["material"] == "gold" for it in recs.items)
        # Each node's private store is a file on its own volume.
        for name in NODE_SERVICES:
            assert (tmp_path / "volumes" / f"{name}-data" / "node.db").exists()
    finally:
        harness.down()
    _assert_no_private_data(pg_url)
