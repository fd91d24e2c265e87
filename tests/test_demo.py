"""`make demo` building blocks, and the demo itself in --quick mode (tiny market, 2 rounds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from shared.demo import popularity_hr10, stop_demo
from shared.training import UserSequence

ROOT = Path(__file__).resolve().parent.parent


def test_popularity_hr10_counts_hits_exactly() -> None:
    # Touch counts: item 0 -> 3, items 1 and 2 -> 2, items 3..11 -> 1, items 12..19 -> 0.
    train = {
        "a": UserSequence(items=[0, 1], types=[1, 1]),
        "b": UserSequence(items=[0, 2], types=[1, 1]),
        "c": UserSequence(items=list(range(12)), types=[1] * 12),
    }

    def hr(held_out: dict[str, int]) -> float:
        return popularity_hr10(train, held_out, num_rows=20)

    assert hr({"a": 2}) == 1.0  # 0 and 1 are the user's own items: nothing ranks above 2
    assert hr({"b": 13}) == 0.0  # item 1 and items 3..11 rank above: rank 10, a miss
    assert hr({"c": 13}) == 1.0  # everything touched is the user's own: ties do not count
    assert hr({"a": 2, "b": 13, "c": 13}) == pytest.approx(2 / 3)
    train["e"] = UserSequence(items=[0, 1, 2], types=[1, 1, 1])
    assert hr({"e": 13}) == 1.0  # items 3..11 rank above: rank 9, the last hit


def test_stop_refuses_pids_that_are_not_demo_services(tmp_path: Path) -> None:
    pids = {
        "admin_token": "x",
        "services": [
            {
                "name": "coordinator",
                "module": "coordinator",
                "pid": os.getpid(),
                "url": "",
                "log": "",
            }
        ],
    }
    (tmp_path / "pids.json").write_text(json.dumps(pids))
    assert stop_demo(tmp_path, Console(quiet=True)) == 0  # this pytest process is left alone
    assert not (tmp_path / "pids.json").exists()
    assert stop_demo(tmp_path, Console(quiet=True)) == 0


def test_stop_reads_a_service_that_never_started_and_says_when_it_cannot_read_the_list(
    tmp_path: Path,
) -> None:
    """A service with no pid (written when it never started) and a damaged file were a
    TypeError and a JSONDecodeError traceback."""
    never = {"name": "node-eu", "module": "regional_node", "pid": None, "url": "", "log": ""}
    (tmp_path / "pids.json").write_text(json.dumps({"admin_token": "x", "services": [never]}))
    assert stop_demo(tmp_path, Console(quiet=True)) == 0
    assert not (tmp_path / "pids.json").exists()
    (tmp_path / "pids.json").write_text('{"services": [')
    console = Console(record=True, width=200)
    assert stop_demo(tmp_path, console) == 0
    assert "cannot read" in console.export_text()
    assert (tmp_path / "pids.json").exists()  # left for whoever stops the services


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is as good as gone: it holds no port and runs nothing.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _sigint_as_from_a_terminal() -> None:
    # A test run started in the background of a non-interactive shell (`make test &`)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # the demo would rightly ignore Ctrl-C. The child gets the default disposition a
    # terminal's foreground job has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _demo(workdir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.demo", "--quick", "--workdir", str(workdir), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_sigint_as_from_a_terminal,
    )


def _service_pids(workdir: Path) -> list[int]:
    return [int(s["pid"]) for s in json.loads((workdir / "pids.json").read_text())["services"]]


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_demo_runs_leaves_services_up_and_stops(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = _demo(workdir)
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        for expected in (
            "round 1 closed: 3/3 nodes -> version 2",
            "round 2 closed: 3/3 nodes -> version 3",
            "Held-out HR@10 per region",
            "brand-new shopper",
            "strategy model",
            "Still running",
            "make demo-stop",
        ):
            assert expected in out, out
        png = workdir / "convergence.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert (workdir / "logs" / "coordinator.log").stat().st_size > 0

        state = json.loads((workdir / "pids.json").read_text())
        services = {s["name"]: s for s in state["services"]}
        assert sorted(services) == ["coordinator", "eu-1", "me-1", "na-1"]
        assert all(_alive(int(s["pid"])) for s in services.values())
        coord = services["coordinator"]["url"]
        assert httpx.get(coord + "/v1/models/latest").json()["version"] == 3
        # COORDINATOR_MAX_ROUNDS=2: no third round keeps the machine busy afterwards.
        assert httpx.get(coord + "/v1/rounds/current").status_code == 404
        assert httpx.get(services["eu-1"]["url"] + "/v1/status").json()["model_version"] == 3
    finally:
        if proc.poll() is None:
            proc.kill()
        pids = _service_pids(workdir) if (workdir / "pids.json").exists() else []
        stop = subprocess.run(
            [sys.executable, "-m", "shared.demo", "--stop", "--workdir", str(workdir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert stop.returncode == 0 and "stopped coordinator" in stop.stdout, stop.stdout
    assert pids and not any(_alive(p) for p in pids)
    assert not (workdir / "pids.json").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_during_the_demo_stops_every_service(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = _demo(workdir)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "pids.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout
            time.sleep(0.1)
        pids = _service_pids(workdir)
        assert len(pids) == 4
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 130, out
        assert "interrupted: stopping the services" in out
        assert not any(_alive(p) for p in pids)
        assert not (workdir / "pids.json").exists()
    finally:  # a failure here must not leave four services running
        if (workdir / "pids.json").exists():
            subprocess.run(
                [sys.executable, "-m", "shared.demo", "--stop", "--workdir", str(workdir)],
                cwd=ROOT,
                capture_output=True,
                timeout=60,
            )
