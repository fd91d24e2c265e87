"""The OpenAPI documents of both services are complete, and `/docs` needs no CDN."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coordinator.app import create_app as create_coordinator
from coordinator.deps import AdminDep
from coordinator.settings import CoordinatorSettings
from regional_node.app import create_app as create_node
from regional_node.settings import NodeSettings

Operation = tuple[str, str, dict[str, Any]]
METHODS = {"get", "put", "post", "delete", "patch"}


def _coordinator(tmp_path: Path) -> FastAPI:
    return create_coordinator(
        CoordinatorSettings(database_url=f"sqlite:///{tmp_path / 'c.db'}", admin_token="t")
    )


def _node(tmp_path: Path) -> FastAPI:
    settings = NodeSettings(database_url=f"sqlite:///{tmp_path / 'n.db'}", allow_anonymous=True)
    return create_node(settings, participate=False)


@pytest.fixture(params=["coordinator", "node"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> FastAPI:
    return _coordinator(tmp_path) if request.param == "coordinator" else _node(tmp_path)


def _operations(spec: dict[str, Any]) -> list[Operation]:
    return [
        (method.upper(), path, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    if schema.get("type") == "array" and "items" in schema and "examples" not in schema:
        return _resolve(spec, schema["items"])
    return schema


def _has_example(spec: dict[str, Any], media: dict[str, Any]) -> bool:
    if "example" in media or "examples" in media:
        return True
    schema = _resolve(spec, media.get("schema", {}))
    return bool(schema.get("examples") or schema.get("example"))


def _security_schemes(spec: dict[str, Any], op: dict[str, Any]) -> set[str]:
    schemes = spec.get("components", {}).get("securitySchemes", {})
    return {schemes[name]["type"] for req in op.get("security", []) for name in req}


# Operations whose path id must be the caller's own node: another id is a 403, never a 404.
OWN_ID_OPERATIONS = {"post_insights_v1_insights__node_id__post"}


def expected_error_codes(spec: dict[str, Any], op: dict[str, Any]) -> set[str]:
    """The error answers an operation can give, judged from its own declared inputs."""
    codes: set[str] = set()
    params = op.get("parameters", [])
    body = op.get("requestBody")
    types = _security_schemes(spec, op)
    if types:
        codes.add("401")  # missing or wrong credentials
    if "http" in types:
        codes.add("403")  # coordinator: a node token where the admin token is needed, or revoked
    if any(p["in"] == "path" for p in params):
        codes.add("422")  # not a valid id
        if op.get("operationId") not in OWN_ID_OPERATIONS:
            codes.add("404")  # no such resource
    if params or body:
        codes.add("422")
    if body and "application/octet-stream" in body.get("content", {}):
        codes.add("413")  # streamed binary bodies are capped
    return codes


def test_every_operation_is_tagged_summarized_described_with_examples(app: FastAPI) -> None:
    spec = app.openapi()
    ops = _operations(spec)
    assert len(ops) >= 5
    problems: list[str] = []
    for method, path, op in ops:
        name = f"{method} {path}"
        for key in ("tags", "summary", "description"):
            if not op.get(key):
                problems.append(f"{name}: no {key}")
        if len(op.get("description", "")) < 30:
            problems.append(f"{name}: description too short to help anyone")
        ok = next((op["responses"][c] for c in op["responses"] if c.startswith("2")), None)
        if ok is None:
            problems.append(f"{name}: no 2xx response")
        else:
            for media_type, media in ok.get("content", {}).items():
                if media_type == "application/json" and not _has_example(spec, media):
                    problems.append(f"{name}: 2xx response has no example")
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None and not _has_example(spec, body):
            problems.append(f"{name}: JSON request body has no example")
    assert not problems, "\n".join(problems)


def test_every_operation_declares_its_error_responses(app: FastAPI) -> None:
    spec = app.openapi()
    problems: list[str] = []
    for method, path, op in _operations(spec):
        declared = {c for c in op["responses"] if c.startswith(("4", "5"))}
        missing = expected_error_codes(spec, op) - declared
        if missing:
            problems.append(f"{method} {path}: undeclared {sorted(missing)}")
        for code in declared:
            if code == "422" and "ErrorBody" not in str(op["responses"][code]):
                # FastAPI's default 422 schema is not what the services answer with.
                problems.append(f"{method} {path}: 422 not documented with ErrorBody")
            if not op["responses"][code].get("description"):
                problems.append(f"{method} {path}: {code} has no description")
    assert not problems, "\n".join(problems)


def test_the_rule_catches_an_undocumented_endpoint(tmp_path: Path) -> None:
    """The walker above is not vacuous: a bare authenticated endpoint fails it."""
    app = _coordinator(tmp_path)

    @app.post("/v1/bare/{thing_id}")
    def bare(thing_id: int, _: AdminDep) -> dict[str, int]:
        return {"thing_id": thing_id}

    spec = app.openapi()
    op = spec["paths"]["/v1/bare/{thing_id}"]["post"]
    declared = {c for c in op["responses"] if c.startswith("4")}
    assert expected_error_codes(spec, op) - declared == {"401", "403", "404"}
    assert not op.get("description")


EXTERNAL_URL = re.compile(r"""(?:src|href)\s*=\s*["']?(https?:)?//""", re.IGNORECASE)


def test_docs_page_and_its_assets_are_served_locally(app: FastAPI) -> None:
    with TestClient(app) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        html = page.text
        assert not EXTERNAL_URL.search(html), "the /docs page references another host"
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert {a.rsplit("/", 1)[-1] for a in assets} >= {
            "swagger-ui-bundle.js",
            "swagger-ui.css",
            "favicon-32x32.png",
        }
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 500, asset
        assert '"validatorUrl": null' in html  # never posts the schema to the online validator
        assert client.get("/redoc").status_code == 404  # CDN-only UI switched off
        assert client.get("/docs/oauth2-redirect").status_code == 200
        assert client.get("/openapi.json").json()["paths"]
