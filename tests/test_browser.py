"""A real headless Chromium against real service processes: the dashboard and offline /docs.

Chromium runs with every host name except 127.0.0.1 unresolvable, so a page that
needed a CDN would fail to render here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from shared.devservers import ServiceProcess, free_port
from tests.conftest import IN_CI
from tests.hand_made_rounds import ADMIN, ROUND_METRICS, bootstrap, run_rounds

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WAIT_S = 20.0


def _chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _ensure_chromium() -> tuple[str, str]:
    """Debian's chromium + chromium-driver; installed here when missing (as .ci/run does)."""
    found = _chromium_paths()
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
        ):
            subprocess.run(cmd, env=env, check=False, capture_output=True, timeout=600)
        found = _chromium_paths()
    if found is None:
        msg = "headless Chromium unavailable: apt-get install chromium chromium-driver"
        if IN_CI:
            pytest.fail(msg + " (CI=true: browser tests must run)")
        pytest.skip(msg)
    return found


@pytest.fixture(scope="module")
def browser(
    tmp_path_factory: pytest.TempPathFactory, launched: dict[str, ServiceProcess]
) -> Iterator[Any]:
    """Chromium starts while the service processes are still importing torch."""
    chromium, chromedriver = _ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1440,1200",
        # Offline proof: only loopback resolves.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    """A coordinator and a serve-only node, started at once (each spends seconds importing
    torch); not yet ready."""
    tmp = tmp_path_factory.mktemp("services")
    procs = {
        "coordinator": ServiceProcess(
            name="coordinator",
            module="coordinator",
            env={
                "COORDINATOR_DATABASE_URL": f"sqlite:///{tmp / 'coordinator.db'}",
                "COORDINATOR_ADMIN_TOKEN": ADMIN,
                "COORDINATOR_MIN_UPDATES": "1",
                "COORDINATOR_ROUND_CHECK_SECONDS": "0.1",
                "COORDINATOR_EMBEDDING_DIM": "8",
                "COORDINATOR_LOG_JSON": "true",
            },
            log_path=tmp / "coordinator.log",
        ),
        "node": ServiceProcess(
            name="eu-1",
            module="regional_node",
            env={
                "NODE_ID": "eu-1",
                "NODE_REGION": "EU",
                "NODE_DATABASE_URL": f"sqlite:///{tmp / 'node.db'}",
                "NODE_ALLOW_ANONYMOUS": "true",
                "NODE_LOG_JSON": "true",
            },
            log_path=tmp / "node.log",
        ),
    }
    try:
        for proc in procs.values():
            proc.start()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def services(launched: dict[str, ServiceProcess], browser: Any) -> dict[str, ServiceProcess]:
    """Both ready, and three rounds closed on the coordinator from hand-made updates."""
    for proc in launched.values():
        proc.wait_ready()
    with httpx.Client(base_url=launched["coordinator"].url, timeout=30) as client:
        (token,) = bootstrap(client)
        run_rounds(client, token, ROUND_METRICS)
    return launched


@pytest.fixture(scope="module")
def coordinator(services: dict[str, ServiceProcess]) -> ServiceProcess:
    return services["coordinator"]


def _wait(driver: Any, condition: Any, what: str) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        logs = driver.get_log("browser")
        raise AssertionError(f"timed out waiting for {what}; browser log: {logs}") from None


def _assert_same_origin_only(driver: Any, origin: str) -> None:
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    foreign = [r for r in resources if not r.startswith(origin)]
    assert not foreign, f"loaded from elsewhere: {foreign}"
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def _screenshot_dir(proc: ServiceProcess) -> Path:
    shots = Path(os.environ.get("FEDJEWEL_SCREENSHOT_DIR", proc.log_path.parent))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def _path_points(d: str) -> int:
    return len(re.findall(r"[ML]", d))


def test_dashboard_shows_rounds_chart_versions_and_nodes(
    browser: Any, coordinator: ServiceProcess
) -> None:
    browser.get(coordinator.url + "/dashboard")
    _wait(
        browser,
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"),
        "the dashboard to load its summary",
    )

    rows = browser.find_elements(By.CSS_SELECTOR, "#rounds tbody tr")
    texts = [r.text for r in rows]
    assert len(rows) == 4, texts  # rounds 1-3 closed, round 4 open
    assert texts[0].startswith("#4") and "open" in texts[0]
    for text, rid in zip(texts[1:], (3, 2, 1), strict=True):
        assert text.startswith(f"#{rid}") and "closed" in text and "eu-1" in text, text
        assert f"v{rid} → v{rid + 1}" in text and "target" in text, text

    loss = browser.find_element(By.CSS_SELECTOR, "#chart-loss path[data-series='train_loss']")
    assert _path_points(loss.get_attribute("d")) == 3
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-loss circle.point")) == 3
    for key in ("hr@10", "ndcg@10"):
        path = browser.find_element(By.CSS_SELECTOR, f"#chart-quality path[data-series='{key}']")
        assert _path_points(path.get_attribute("d")) == 3
    # Falling loss is drawn falling: SVG y grows downwards.
    ys = [
        float(c.get_attribute("cy"))
        for c in browser.find_elements(By.CSS_SELECTOR, "#chart-loss circle.point")
    ]
    assert ys == sorted(ys), ys

    versions = browser.find_elements(By.CSS_SELECTOR, "#versions tbody tr")
    assert [v.text.split()[0] for v in versions] == ["v4", "v3", "v2", "v1"]
    assert "active" in versions[0].text and "3.3000" in versions[0].text
    node_rows = browser.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")
    assert len(node_rows) == 1 and "eu-1" in node_rows[0].text
    assert "healthy" in node_rows[0].text and "v3" in node_rows[0].text
    assert browser.find_element(By.ID, "kpi-version").text == "4"
    # No /v1/insights on this coordinator: the regional-insights panel stays hidden.
    assert not browser.find_element(By.ID, "insights").is_displayed()

    assert browser.save_screenshot(str(_screenshot_dir(coordinator) / "dashboard.png"))
    _assert_same_origin_only(browser, coordinator.url)

    # The coordinator ran with COORDINATOR_LOG_JSON=true: JSON lines with round ids.
    lines = [ln for ln in coordinator.log_path.read_text().splitlines() if ln.startswith("{")]
    assert any('"round_id": 3' in ln and "closed" in ln for ln in lines), lines[-5:]


@pytest.mark.parametrize("service", ["coordinator", "node"])
def test_docs_render_every_operation_offline(
    browser: Any, service: str, services: dict[str, ServiceProcess]
) -> None:
    proc = services[service]
    spec = httpx.get(proc.url + "/openapi.json").json()
    expected = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    }
    browser.get(proc.url + "/docs")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"), "Swagger UI")
    rendered = {
        (
            op.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.strip(),
            op.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
        )
        for op in browser.find_elements(By.CSS_SELECTOR, ".opblock")
    }
    assert rendered == expected
    assert spec["info"]["title"] in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    assert browser.save_screenshot(str(_screenshot_dir(proc) / f"docs-{service}.png"))
    _assert_same_origin_only(browser, proc.url)


@contextlib.contextmanager
def _serve_in_thread(app: Any) -> Iterator[str]:
    """uvicorn in a thread of this process: for apps a test extends with its own routes."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "in-process coordinator did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def coordinator_with_insights(tmp_path: Path) -> Iterator[str]:
    """A coordinator holding real regional reports pushed by two nodes."""
    from datetime import datetime

    from regional_node.insights import compute_report
    from shared.schemas import CatalogItem
    from tests.conftest import tiny_catalog, tiny_events

    settings = CoordinatorSettings(database_url=f"sqlite:///{tmp_path / 'c.db'}", admin_token=ADMIN)
    app = create_app(settings)
    catalog = [CatalogItem.model_validate(c) for c in tiny_catalog()]
    with _serve_in_thread(app) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for node_id, region, material in (("eu-1", "EU", "silver"), ("na-1", "NA", "gold")):
            r = httpx.post(
                url + "/v1/nodes", json={"node_id": node_id, "region": region}, headers=admin
            )
            token = {"Authorization": f"Bearer {r.json()['token']}"}
            events = [
                (
                    str(e["user_id"]),
                    str(e["item_id"]),
                    str(e["event_type"]),
                    datetime.fromisoformat(str(e["timestamp"])).timestamp(),
                )
                for e in tiny_events(node_id, users=40, material=material, seed=1)
            ]
            report = compute_report(events, catalog, region=region, weeks=4, min_users=3)
            assert report is not None
            r = httpx.post(
                f"{url}/v1/insights/{node_id}",
                content=report.model_dump_json(),
                headers={**token, "Content-Type": "application/json"},
            )
            assert r.status_code == 204, r.text
        yield url


def test_regional_insights_panel_appears_when_the_endpoint_exists(
    browser: Any, coordinator_with_insights: str
) -> None:
    browser.get(coordinator_with_insights + "/dashboard")
    panel = _wait(
        browser,
        lambda d: (
            d.find_element(By.ID, "insights").is_displayed() and d.find_element(By.ID, "insights")
        ),
        "the regional insights panel",
    )
    headers = [h.text for h in panel.find_elements(By.CSS_SELECTOR, "th")]
    assert headers == ["region", "kind", "dimension", "value", "share", "trend"]
    rows = [r.text for r in panel.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert {r.split()[0] for r in rows} == {"EU", "NA"}
    # Each region's own taste comes out on top of its material highlights.
    assert any(r.startswith("EU") and "silver" in r for r in rows), rows
    assert any(r.startswith("NA") and "gold" in r for r in rows), rows
    # No rounds yet: the empty states say what to do.
    assert "upload a catalog" in browser.find_element(By.ID, "rounds").text
    _assert_same_origin_only(browser, coordinator_with_insights)


def test_private_dashboard_asks_for_the_admin_token(browser: Any, tmp_path: Path) -> None:
    settings = CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}", admin_token=ADMIN, dashboard_public=False
    )
    with _serve_in_thread(create_app(settings)) as url:
        browser.get(url + "/dashboard")
        form = _wait(browser, lambda d: d.find_element(By.ID, "auth").is_displayed(), "the prompt")
        assert form and not browser.find_element(By.ID, "main").is_displayed()
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.CSS_SELECTOR, "#auth-form button").click()
        _wait(browser, lambda d: d.find_element(By.ID, "auth-error").text, "the refusal")
        assert "invalid bearer token" in browser.find_element(By.ID, "auth-error").text
        token = browser.find_element(By.ID, "token")
        token.clear()
        token.send_keys(ADMIN)
        browser.find_element(By.CSS_SELECTOR, "#auth-form button").click()
        _wait(browser, lambda d: d.find_element(By.ID, "main").is_displayed(), "the dashboard")
        assert not browser.find_element(By.ID, "auth").is_displayed()
        assert "no rounds yet" in browser.find_element(By.ID, "rounds").text
