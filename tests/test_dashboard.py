"""The dashboard's summary API and page (in-process; the browser test is test_browser.py)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.dashboard.service import node_health
from coordinator.settings import CoordinatorSettings
from tests.hand_made_rounds import ADMIN, ROUND_METRICS, admin_headers, bootstrap, run_rounds


def _settings(tmp_path: Path, **extra: object) -> CoordinatorSettings:
    return CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        admin_token=ADMIN,
        embedding_dim=8,
        round_check_seconds=0.05,
        round_deadline_seconds=60,
        **extra,  # type: ignore[arg-type]
    )


def test_node_health_rules() -> None:
    now = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
    seen = now - timedelta(seconds=120)
    assert node_health(revoked=False, last_seen_at=seen, now=now, stale_after=120) == "healthy"
    assert node_health(revoked=False, last_seen_at=seen, now=now, stale_after=119.9) == "stale"
    assert node_health(revoked=False, last_seen_at=None, now=now, stale_after=120) == "never_seen"
    assert node_health(revoked=True, last_seen_at=now, now=now, stale_after=120) == "revoked"


def test_summary_after_rounds(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path))) as client:
        empty = client.get("/v1/dashboard/summary").json()
        assert empty["versions"] == [] and empty["rounds"] == [] and empty["nodes"] == []

        token, _other = bootstrap(client, node_ids=("eu-1", "na-1"))
        run_rounds(client, token, ROUND_METRICS[:2])
        assert client.post("/v1/nodes/na-1/revoke", headers=admin_headers()).status_code == 200
        summary = client.get("/v1/dashboard/summary").json()

    assert summary["active_version"] == 3 and summary["current_round_id"] == 3
    assert summary["stale_after_seconds"] == 120
    assert [v["version"] for v in summary["versions"]] == [3, 2, 1]
    assert [v["status"] for v in summary["versions"]] == ["active", "retired", "retired"]
    assert summary["versions"][0]["round_id"] == 2
    assert summary["versions"][0]["metrics"]["train_loss"] == ROUND_METRICS[1]["train_loss"]
    assert summary["versions"][0]["metrics"]["hr@10"] == ROUND_METRICS[1]["hr@10"]

    rounds = {r["round_id"]: r for r in summary["rounds"]}
    assert [r["round_id"] for r in summary["rounds"]] == [3, 2, 1]
    assert rounds[3]["state"] == "open" and rounds[3]["duration_seconds"] is None
    for rid in (1, 2):
        r = rounds[rid]
        assert r["state"] == "closed" and r["close_reason"] == "target"
        assert r["participants"] == ["eu-1"] and r["num_examples"] == 100
        assert r["result_version"] == rid + 1
        closed = datetime.fromisoformat(r["closed_at"])
        created = datetime.fromisoformat(r["created_at"])
        assert abs(r["duration_seconds"] - (closed - created).total_seconds()) < 1e-6

    nodes = {n["node_id"]: n for n in summary["nodes"]}
    # eu-1 downloaded versions 1 and 2 to build its deltas, and submitted updates.
    assert nodes["eu-1"]["health"] == "healthy" and nodes["eu-1"]["last_model_version"] == 2
    assert nodes["eu-1"]["seconds_since_seen"] < 60
    assert nodes["na-1"]["health"] == "revoked" and nodes["na-1"]["last_seen_at"] is None
    text = str(summary)
    assert "token" not in text.lower() and "hash" not in text.lower()


def test_private_dashboard_needs_the_admin_token(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path, dashboard_public=False))) as client:
        (node_token,) = bootstrap(client)
        assert client.get("/v1/dashboard/summary").status_code == 401
        r = client.get("/v1/dashboard/summary", headers=admin_headers(node_token))
        assert r.status_code == 403
        ok = client.get("/v1/dashboard/summary", headers=admin_headers())
        assert ok.status_code == 200 and ok.json()["active_version"] == 1
        assert client.get("/dashboard").status_code == 200  # the page itself asks for it


def test_page_is_self_contained(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path))) as client:
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        assert refs, "the page links its script and stylesheet"
        for ref in refs:
            assert "//" not in ref, f"{ref} leaves the coordinator"
            assert client.get("/" + ref).status_code == 200, ref
        script = client.get("/dashboard/static/dashboard.js").text
        assert "v1/insights" in script  # the regional-insights hook
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", script)
