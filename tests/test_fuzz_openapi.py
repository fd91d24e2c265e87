"""Schemathesis fuzzing of both services from their own OpenAPI documents.

Every operation gets a bounded number of generated requests (valid and
invalid). The services must never answer 5xx, and every answer (status code,
content type, headers, body) must match what the OpenAPI document declares.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from regional_node.app import create_app as create_node_app
from regional_node.recommender import build_serving_model
from regional_node.settings import NodeSettings
from shared.model import ModelConfig, init_state
from shared.schemas import CatalogItem, CatalogOut
from tests.conftest import tiny_catalog, tiny_events
from tests.sec_support import ADMIN, ADMIN_TOKEN

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
FUZZ = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same requests on every run: a failure is reproducible
    suppress_health_check=list(HealthCheck),
)


# The schemas are read from the apps when the module is imported; the fixtures below
# start the same app objects (lifespan: migrations, state) for the module's tests.
_TMP = Path(tempfile.mkdtemp(prefix="fedjewel-fuzz-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
COORDINATOR_APP = create_app(
    CoordinatorSettings(
        database_url=f"sqlite:///{_TMP / 'coordinator.db'}",
        admin_token=ADMIN_TOKEN,
        min_updates=100,  # rounds stay open: the fuzzer cannot end them
        embedding_dim=4,
        max_update_bytes=256 * 1024,
    )
)
NODE_APP = create_node_app(
    NodeSettings(
        id="eu-1", region="EU", database_url=f"sqlite:///{_TMP / 'node.db'}", api_keys="fuzz-key"
    ),
    participate=False,
)
NODE_KEY = {"X-API-Key": "fuzz-key"}
coordinator = schemathesis.openapi.from_asgi("/openapi.json", COORDINATOR_APP)
node = schemathesis.openapi.from_asgi("/openapi.json", NODE_APP)


@pytest.fixture(scope="module")
def node_token() -> Iterator[dict[str, str]]:
    with TestClient(COORDINATOR_APP) as client:
        client.put("/v1/catalog", json=tiny_catalog(10), headers=ADMIN).raise_for_status()
        r = client.post("/v1/nodes", json={"node_id": "eu-1", "region": "EU"}, headers=ADMIN)
        yield {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.fixture(scope="module")
def node_started() -> Iterator[None]:
    with TestClient(NODE_APP) as client:
        events = tiny_events("eu", users=5, material="gold", seed=0)
        client.post("/v1/events", json=events, headers=NODE_KEY).raise_for_status()
        # A node serving a model: filters and the model path are fuzzed too. (Before its
        # first model a filtered request is a documented 503, tests/test_api_node.py.)
        items = [CatalogItem.model_validate(d) for d in tiny_catalog(10)]
        config = ModelConfig(num_items=len(items), embedding_dim=4)
        runtime = NODE_APP.state.runtime
        runtime.catalog = CatalogOut(catalog_version=1, items=items)
        runtime.serving = build_serving_model(1, "0" * 64, config, init_state(config), items)
        yield


@coordinator.parametrize()
@FUZZ
def test_fuzz_coordinator(case, node_token: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    # Node-only endpoints get the node's token, everything else the admin token.
    headers = node_token if case.path.endswith("/updates") else ADMIN
    if case.query and "wait" in case.query:
        # A long poll may rightly take its whole `wait` (up to 30 s), past the client's
        # read timeout: keep it short (the 422s of bad values are still tested).
        with contextlib.suppress(TypeError, ValueError):
            case.query["wait"] = min(float(case.query["wait"]), 0.5)
    case.call_and_validate(headers=headers, checks=CHECKS)


@node.parametrize()
@FUZZ
def test_fuzz_node(case, node_started: None) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(headers=NODE_KEY, checks=CHECKS)
