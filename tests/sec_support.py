"""Helpers of the security and fault-tolerance tests (not a test module)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import httpx
import torch
from sqlalchemy import create_engine, text

from shared.devservers import ServiceProcess
from shared.serialization import bytes_to_state, sha256_hex, state_to_bytes

ADMIN_TOKEN = "sec-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def seeded_delta(weights: bytes, seed: int, scale: float = 0.01) -> bytes:
    """A deterministic update with the base version's names, shapes and dtypes."""
    g = torch.Generator().manual_seed(seed)
    state = bytes_to_state(weights)
    return state_to_bytes(
        {k: (torch.randn(v.shape, generator=g) * scale).to(v.dtype) for k, v in state.items()}
    )


def submit(
    client: httpx.Client,
    token_headers: Mapping[str, str],
    payload: bytes,
    *,
    round_id: int = 1,
    base_version: int = 1,
    num_examples: int = 10,
    sha256: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    headers = {**token_headers, "X-Content-SHA256": sha256 or sha256_hex(payload)}
    headers.update(extra_headers or {})
    return client.post(
        f"/v1/rounds/{round_id}/updates",
        params={"num_examples": num_examples, "base_version": base_version},
        content=payload,
        headers=headers,
    )


def row_counts(db_url: str) -> dict[str, int]:
    """Rows of the coordinator tables a rejected request must not touch."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {
                t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in ("updates", "model_versions", "rounds", "nodes")
            }
    finally:
        engine.dispose()


def start_coordinator(
    db_url: str, log: Path, *, port: int | None = None, **env: str
) -> ServiceProcess:
    """`python -m coordinator` on a loopback port (optionally a given one: restarts);
    keyword arguments become COORDINATOR_<NAME> settings."""
    settings = {
        "COORDINATOR_DATABASE_URL": db_url,
        "COORDINATOR_ADMIN_TOKEN": ADMIN_TOKEN,
        "COORDINATOR_ROUND_CHECK_SECONDS": "0.2",
        "COORDINATOR_EMBEDDING_DIM": "8",
        **{f"COORDINATOR_{k.upper()}": v for k, v in env.items()},
    }
    proc = ServiceProcess(name=log.stem, module="coordinator", env=settings, log_path=log)
    if port is not None:
        proc.port = port
    proc.start()
    proc.wait_ready()
    return proc
