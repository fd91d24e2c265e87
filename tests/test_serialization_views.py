"""One-copy safetensors writing and zero-copy reading agree with safetensors itself."""

from __future__ import annotations

import pytest
import torch

from shared.serialization import (
    bytes_to_state,
    read_metadata,
    state_to_buffer,
    state_to_bytes,
    state_views,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(7, 3, generator=g),
        "steps": torch.arange(5),
        "half": torch.randn(3, generator=g).half(),
        "flag": torch.tensor(True),
        "empty": torch.zeros(0, 4),
    }


def test_buffer_writer_is_valid_safetensors_and_deterministic() -> None:
    s = _state()
    buf = state_to_buffer(s, {"fedjewel_version": "7"})
    loaded = bytes_to_state(bytes(buf))  # safetensors' own reader
    assert sorted(loaded) == sorted(s)
    assert all(torch.equal(loaded[k], s[k]) for k in s)
    assert read_metadata(bytes(buf)) == {"fedjewel_version": "7"}
    assert state_to_buffer(dict(reversed(list(s.items()))), {"fedjewel_version": "7"}) == buf


def test_views_read_what_safetensors_wrote_without_copying() -> None:
    s = _state()
    data = bytearray(state_to_bytes(s))
    views = state_views(data)
    assert all(torch.equal(views[k], s[k]) for k in s)
    views["emb"][0, 0] = 123.0  # the views share the buffer's memory
    assert float(state_views(data)["emb"][0, 0]) == 123.0


@pytest.mark.parametrize("cut", [1, 9, 100])
def test_views_refuse_truncated_payloads(cut: int) -> None:
    data = state_to_bytes(_state())
    with pytest.raises(ValueError, match="not a valid safetensors payload"):
        state_views(data[:-cut])
