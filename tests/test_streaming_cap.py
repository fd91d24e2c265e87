"""Body caps against real uvicorn processes: a chunked upload with no Content-Length
is cut off soon after the cap, answered 413, and stores nothing (coordinator update
uploads, and the node's JSON event batches)."""

from __future__ import annotations

import select
import socket
from pathlib import Path

import httpx
import pytest

from shared.devservers import ServiceProcess
from tests.conftest import tiny_catalog
from tests.sec_support import ADMIN, ADMIN_TOKEN, row_counts

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
