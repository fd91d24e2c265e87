"""Update encodings: exact round trips, byte sizes, error feedback and payload validation."""

from __future__ import annotations

import pytest
import torch

from shared.compression import (
    decode_update,
    encode_update,
    encode_with_feedback,
    topk_count,
)
from shared.serialization import state_to_bytes


def _delta() -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [0.1, -0.3, 0.2]]),
        "b": torch.tensor([0.5, -2.0]),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }


def test_dense_round_trip_is_identity() -> None:
    d = _delta()
    out = decode_update(encode_update(d, "dense"), d, "dense")
    assert all(torch.equal(out[k], d[k]) for k in d)


def test_float16_is_a_cast() -> None:
    d = _delta()
    payload = encode_update(d, "float16")
    assert payload["w"].dtype == torch.float16 and payload["steps"].dtype == torch.int64
    out = decode_update(payload, d, "float16")
    assert torch.equal(out["w"], d["w"].half().float())
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["steps"], d["steps"])


def test_int8_per_row_scale_and_round_to_nearest() -> None:
    d = _delta()
    payload = encode_update(d, "int8")
    # Row 0: scale 1/127; 1.0 -> 127, -0.5 -> -63.5 -> -64 (half to even), 0.25 -> 31.75 -> 32.
    assert payload["w"][0].tolist() == [127, -64, 32]
    assert payload["w"][1].tolist() == [0, 0, 0]  # an all-zero row has scale 0
    assert payload["w::scale"].tolist() == pytest.approx([1 / 127, 0.0, 0.3 / 127])
    assert payload["b"].tolist() == [32, -127]  # one scale for a 1-D tensor: 2/127
    out = decode_update(payload, d, "int8")
    expected_row0 = torch.tensor([127.0, -64.0, 32.0]) * torch.tensor(1.0 / 127)
    assert torch.equal(out["w"][0], expected_row0)
    assert torch.equal(out["w"][1], torch.zeros(3))
    assert (out["w"] - d["w"]).abs().max() <= 0.5 * (1.0 / 127) + 1e-7


def test_topk_keeps_the_largest_magnitudes() -> None:
    d = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, 0.3])}
    payload = encode_update(d, "topk", topk_fraction=0.25)  # ceil(0.25 * 8) = 2 entries
    assert payload["w::idx"].tolist() == [1, 3]
    assert payload["w::val"].tolist() == [-5.0, 3.0]
    out = decode_update(payload, d, "topk")
    assert out["w"].tolist() == [0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]


def test_topk_count_bounds() -> None:
    assert topk_count(1000, 0.01) == 10
    assert topk_count(5, 0.01) == 1
    assert topk_count(5, 1.0) == 5
    with pytest.raises(ValueError):
        topk_count(5, 0.0)


def test_error_feedback_loses_nothing() -> None:
    d = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0])}
    _, residual = encode_with_feedback(d, None, "topk", topk_fraction=0.25)
    assert residual["w"].tolist() == pytest.approx([0.1, 0.0, 0.2, 3.0])
    # Next round: the delayed entries come back on top of the new delta.
    d2 = {"w": torch.tensor([0.0, 0.0, 0.0, 0.5])}
    payload2, residual2 = encode_with_feedback(d2, residual, "topk", topk_fraction=0.25)
    sent2 = decode_update(payload2, d2, "topk")
    assert sent2["w"].tolist() == pytest.approx([0.0, 0.0, 0.0, 3.5], abs=1e-3)
    assert (sent2["w"] + residual2["w"]).tolist() == pytest.approx([0.1, 0.0, 0.2, 3.5])


def test_error_feedback_drops_a_residual_of_another_shape() -> None:
    d = {"w": torch.ones(4)}
    _, residual = encode_with_feedback(d, {"w": torch.ones(3)}, "float16")
    assert torch.equal(residual["w"], torch.zeros(4))


def test_sizes_against_dense() -> None:
    g = torch.Generator().manual_seed(0)
    d = {"emb": torch.randn(5000, 32, generator=g), "bias": torch.randn(32, generator=g)}
    dense = len(state_to_bytes(encode_update(d, "dense")))
    ratio = {
        enc: len(state_to_bytes(encode_update(d, enc, topk_fraction=0.01))) / dense
        for enc in ("float16", "int8", "topk")
    }
    assert 0.49 < ratio["float16"] < 0.51
    assert 0.28 < ratio["int8"] < 0.29  # 1 byte per entry + a float32 scale per 32-wide row
    assert ratio["topk"] < 0.1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"w::idx": torch.tensor([9], dtype=torch.int32), "w::val": torch.ones(1).half()},
            "outside",
        ),
        ({"w::idx": torch.tensor([1], dtype=torch.int32)}, "missing parameter"),
        (
            {
                "w::idx": torch.tensor([1], dtype=torch.int32),
                "w::val": torch.ones(1).half(),
                "x": torch.ones(1),
            },
            "unexpected",
        ),
        ({"w::idx": torch.tensor([1]), "w::val": torch.ones(1).half()}, "dtype"),
    ],
)
def test_decode_rejects_malformed_topk(payload: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_update(payload, {"w": torch.zeros(4)}, "topk")


def test_decode_rejects_wrong_shapes_and_unknown_encodings() -> None:
    ref = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="shape"):
        decode_update({"w": torch.zeros(3, 2).half()}, ref, "float16")
    with pytest.raises(ValueError, match="scale"):
        decode_update(
            {"w": torch.zeros(2, 3, dtype=torch.int8), "w::scale": torch.ones(3)}, ref, "int8"
        )
    with pytest.raises(ValueError, match="unsupported"):
        decode_update({"w": torch.zeros(2, 3)}, ref, "zstd")


def test_pack_bits_round_trip() -> None:
    from shared.compression import pack_bits, unpack_bits

    flags = torch.tensor([True, False, True, True, False, False, False, True, True, False])
    packed = pack_bits(flags)
    assert packed.tolist() == [0b10110001, 0b10000000]
    assert torch.equal(unpack_bits(packed, 10), flags)


def test_sign_is_sign_times_row_mean_magnitude() -> None:
    d = {
        "w": torch.tensor([[1.0, -3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        "b": torch.tensor([0.5, -1.5]),
    }
    payload = encode_update(d, "sign")
    assert payload["w::scale"].tolist() == [1.5, 0.0]
    assert payload["b::scale"].tolist() == [1.0]
    out = decode_update(payload, d, "sign")
    assert out["w"].tolist() == [[1.5, -1.5, 1.5, 1.5], [0.0, 0.0, 0.0, 0.0]]
    assert out["b"].tolist() == [1.0, -1.0]
    # Error feedback keeps the difference for the next round.
    _, residual = encode_with_feedback(d, None, "sign")
    assert residual["w"][0].tolist() == [-0.5, -1.5, 0.5, -1.5]


def test_sign_is_about_a_sixteenth_of_dense_for_32_wide_rows() -> None:
    d = {"emb": torch.randn(5000, 32, generator=torch.Generator().manual_seed(0))}
    dense = len(state_to_bytes(d))
    assert len(state_to_bytes(encode_update(d, "sign"))) / dense < 0.07


def test_topk8_keeps_the_largest_magnitudes_as_bitmap_and_int8() -> None:
    d = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, 0.3])}
    payload = encode_update(d, "topk8", topk_fraction=0.25)  # 2 of 8 entries
    assert payload["w::bits"].tolist() == [0b01010000]  # entries 1 and 3
    assert payload["w::val"].dtype == torch.int8 and payload["w::val"].tolist() == [-127, 76]
    assert payload["w::scale"].tolist() == pytest.approx([5.0 / 127])
    out = decode_update(payload, d, "topk8")["w"].tolist()
    assert out == pytest.approx([0.0, -5.0, 0.0, 76 * 5.0 / 127, 0.0, 0.0, 0.0, 0.0])
    # Error feedback keeps what was dropped or rounded away.
    sent, residual = encode_with_feedback(d, None, "topk8", topk_fraction=0.25)
    total = decode_update(sent, d, "topk8")["w"] + residual["w"]
    assert torch.allclose(total, d["w"])


def test_topk8_size_and_malformed_payloads() -> None:
    g = torch.Generator().manual_seed(0)
    d = {"emb": torch.randn(5000, 32, generator=g), "bias": torch.randn(32, generator=g)}
    dense = len(state_to_bytes(encode_update(d, "dense")))
    ratio = len(state_to_bytes(encode_update(d, "topk8", topk_fraction=0.2))) / dense
    assert 0.08 < ratio < 0.085  # 1/32 for the bitmap + 0.2 x 1/4 for the values
    ref = {"w": torch.zeros(16)}
    good = encode_update({"w": torch.arange(16.0)}, "topk8", topk_fraction=0.25)
    with pytest.raises(ValueError, match="do not match its bitmap"):
        decode_update({**good, "w::val": good["w::val"][:-1]}, ref, "topk8")
    with pytest.raises(ValueError, match="wrong length"):
        decode_update({**good, "w::bits": good["w::bits"][:1]}, ref, "topk8")
    with pytest.raises(ValueError, match="dtype"):
        decode_update({**good, "w::val": good["w::val"].float()}, ref, "topk8")
