"""Body caps against real uvicorn processes: a chunked upload with no Content-Length
is cut off soon after the cap, answered 413, and stores nothing (coordinator update
uploads, and the node's JSON event batches)."""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import httpx
import pytest

from shared.devservers import ServiceProcess
from shared.serialization import sha256_hex
from tests.conftest import tiny_catalog
from tests.sec_support import (
    ADMIN,
    ADMIN_TOKEN,
    row_counts,
    seeded_delta,
    start_coordinator,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAP = 1024 * 1024
GIVE_UP_AFTER = 512 * 1024 * 1024  # what the client would send if nobody stopped it


def test_chunked_upload_over_the_cap_is_refused_while_streaming(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    coord = ServiceProcess(
        name="coordinator",
        module="coordinator",
        env={
            "COORDINATOR_DATABASE_URL": db_url,
            "COORDINATOR_ADMIN_TOKEN": ADMIN_TOKEN,
            "COORDINATOR_MAX_UPDATE_BYTES": str(CAP),
            "COORDINATOR_EMBEDDING_DIM": "8",
        },
        log_path=tmp_path / "coordinator.log",
    ).start()
    try:
        coord.wait_ready()
        admin = httpx.Client(base_url=coord.url, headers=ADMIN, timeout=30)
        admin.put("/v1/catalog", json=tiny_catalog(10)).raise_for_status()
        token = admin.post("/v1/nodes", json={"node_id": "eu-1", "region": "EU"}).json()["token"]
        before = row_counts(db_url)

        head = (
            "POST /v1/rounds/1/updates?num_examples=5&base_version=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{coord.port}\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"X-Content-SHA256: {'0' * 64}\r\n"
            "Content-Type: application/octet-stream\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        response, sent = _endless_chunked_upload(coord.port, head, b"\x00" * 65536)

        status_line = response.split(b"\r\n", 1)[0]
        assert b" 413 " in status_line, response[:300]
        assert b'"detail"' in response and b"limit" in response
        # Cut off within a few MiB of a 1 MiB cap (socket buffers), not after 512 MiB.
        assert sent < 32 * 1024 * 1024, sent
        assert row_counts(db_url) == before
        # The service is still fine afterwards.
        assert httpx.get(coord.url + "/readyz").status_code == 200
    finally:
        coord.stop()


def test_chunked_event_batch_over_the_cap_is_refused_while_streaming(tmp_path: Path) -> None:
    node = ServiceProcess(
        name="node",
        module="regional_node",
        env={
            "NODE_DATABASE_URL": f"sqlite:///{tmp_path / 'node.db'}",
            "NODE_ALLOW_ANONYMOUS": "true",
            "NODE_MAX_BODY_BYTES": str(CAP),
        },
        log_path=tmp_path / "node.log",
    ).start()
    try:
        node.wait_ready()
        head = (
            "POST /v1/events HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{node.port}\r\n"
            "Content-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        event = b'{"user_id":"u1","item_id":"R1","event_type":"view","timestamp":1700000000},'
        response, sent = _endless_chunked_upload(node.port, head, event * 800)
        status_line = response.split(b"\r\n", 1)[0]
        assert b" 413 " in status_line, response[:300]
        assert b'"detail"' in response and b"limit" in response
        assert sent < 32 * 1024 * 1024, sent
        status = httpx.get(node.url + "/v1/status")
        assert status.status_code == 200 and status.json()["event_count"] == 0
        # A declared Content-Length over the cap is refused before reading the body.
        big = httpx.post(
            node.url + "/v1/events",
            content=b"[" + b" " * (CAP + 10) + b"]",
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413 and "limit" in big.json()["detail"]
        ok = httpx.post(
            node.url + "/v1/events",
            json=[{"user_id": "u1", "item_id": "R1", "event_type": "view", "timestamp": 1}],
        )
        assert ok.status_code == 200, ok.text
    finally:
        node.stop()


def test_a_slow_upload_does_not_hold_up_other_requests(tmp_path: Path) -> None:
    """On SQLite the node-token check once opened the write transaction that lasted
    while the update's body streamed in: every other request waited for the uploader
    (and failed after the 60-s busy timeout)."""
    db_url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    coord = start_coordinator(db_url, tmp_path / "coordinator.log")
    try:
        admin = httpx.Client(base_url=coord.url, headers=ADMIN, timeout=30)
        admin.put("/v1/catalog", json=tiny_catalog(10)).raise_for_status()
        token = admin.post("/v1/nodes", json={"node_id": "eu-1", "region": "EU"}).json()["token"]
        body = seeded_delta(admin.get("/v1/models/1/weights").content, seed=1)
        head = (
            "POST /v1/rounds/1/updates?num_examples=5&base_version=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{coord.port}\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"X-Content-SHA256: {sha256_hex(body)}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", coord.port), timeout=30) as sock:
            sock.sendall(head.encode() + body[:100])  # ... and the rest later
            time.sleep(0.5)  # the upload is past its token check
            started = time.monotonic()
            registered = admin.post("/v1/nodes", json={"node_id": "us-1", "region": "US"})
            round_state = admin.get("/v1/rounds/1")
            waited = time.monotonic() - started
            sock.sendall(body[100:])
            answer = sock.recv(65536)
        assert registered.status_code == 201 and round_state.status_code == 200
        assert waited < 3, f"other requests waited {waited:.1f} s for the uploader"
        assert b" 200 " in answer.split(b"\r\n", 1)[0], answer[:300]
        assert admin.get("/v1/rounds/1").json()["updates_received"] == 1
    finally:
        coord.stop()


def _endless_chunked_upload(port: int, head: str, chunk: bytes) -> tuple[bytes, int]:
    """Send `head`, then `chunk` frames until the server answers or closes (or 512 MiB)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode())
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent = 0
    while sent < GIVE_UP_AFTER:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break  # the server answered before the upload ended
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            break  # the server stopped reading and closed the connection
        sent += len(chunk)
    response = b""
    while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
        data = sock.recv(65536)
        if not data:
            break
        response += data
    sock.close()
    return response, sent
