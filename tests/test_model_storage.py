"""Model versions stored in slices (model_version_chunks), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch
from alembic import command
from sqlalchemy import create_engine, func, select, text

from coordinator.db import Database
from coordinator.models import ModelVersionChunk
from coordinator.models_registry import service
from shared.db import alembic_config
from shared.model import ModelConfig
from shared.serialization import bytes_to_state, sha256_hex, state_to_buffer


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "item_id.weight": torch.randn(700, 24, generator=g),  # 67,200 bytes
        "user_proj.weight": torch.randn(24, 24, generator=g),
        "user_proj.bias": torch.randn(24, generator=g),
        "steps": torch.tensor([7, 8, 9], dtype=torch.int64),
        "empty": torch.zeros(0),
    }


def test_version_written_in_slices_round_trips(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "WEIGHT_CHUNK_BYTES", 10_000)  # many slices for a small model
    db = Database(db_url)
    db.migrate()
    try:
        state = _state()
        expected = bytes(state_to_buffer(state, {"fedjewel_version": "1"}))
        config = ModelConfig(num_items=700, embedding_dim=24)
        with db.sessions() as session:
            consumed = {k: v.clone() for k, v in state.items()}
            row = service.create_version(
                session, consumed, config, metrics={}, round_id=None, consume_state=True
            )
            session.commit()
            assert consumed == {}  # every tensor left the dict once written
            assert row.size_bytes == len(expected) and row.sha256 == sha256_hex(expected)
        with db.sessions() as session:
            lengths = session.execute(
                select(func.length(ModelVersionChunk.data))
                .where(ModelVersionChunk.version == 1)
                .order_by(ModelVersionChunk.seq)
            ).scalars()
            sizes = list(lengths)
            assert len(sizes) == -(-len(expected) // 10_000)
            assert all(s == 10_000 for s in sizes[:-1]) and 0 < sizes[-1] <= 10_000
            # The same bytes the one-buffer writer makes: any safetensors reader loads them.
            assert service.weights_bytes(session, 1) == expected
            loaded, _ = service.load_state(session, 1)
            for name, tensor in state.items():
                assert torch.equal(loaded[name], tensor), name
            # Read back in reads smaller than a slice, as a streamed download does.
        streamed = b"".join(service.iter_weights(db.engine, 1, len(expected), chunk_bytes=4096))
        assert streamed == expected
        assert set(bytes_to_state(streamed)) == set(state)
    finally:
        db.dispose()


def test_migration_moves_stored_weights_into_slices_and_back(db_url: str) -> None:
    state = _state()
    blob = bytes(state_to_buffer(state, {"fedjewel_version": "1"}))
    cfg = alembic_config("coordinator", db_url)
    command.upgrade(cfg, "0002_privacy")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO model_versions (version, created_at, round_id, sha256, "
                    "size_bytes, weights, config, metrics, status, num_items) VALUES "
                    "(1, :ts, NULL, :sha, :size, :w, :cfg, '{}', 'active', 700)"
                ),
                {
                    "ts": datetime.now(UTC),
                    "sha": sha256_hex(blob),
                    "size": len(blob),
                    "w": blob,
                    "cfg": ModelConfig(num_items=700, embedding_dim=24).model_dump_json(),
                },
            )
        command.upgrade(cfg, "head")
        db = Database(db_url)
        try:
            with db.sessions() as session:
                assert service.weights_bytes(session, 1) == blob
                loaded, _ = service.load_state(session, 1)
                assert torch.equal(loaded["item_id.weight"], state["item_id.weight"])
        finally:
            db.dispose()
        command.downgrade(cfg, "0002_privacy")
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT weights FROM model_versions")).scalar_one()
        assert bytes(stored) == blob
    finally:
        engine.dispose()
