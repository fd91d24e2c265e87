"""Update encodings: how a node's weight delta is packed for the wire, and unpacked again.

Pure functions over `dict[str, Tensor]`, keyed by parameter name. An encoded
update is itself a state dict (it travels as safetensors), so every encoding
keeps the safetensors framing, the sha256 and the size cap of a dense update.

* ``dense``   float32 as trained (the reference).
* ``float16`` every floating tensor cast to float16 (0.5x).
* ``int8``    symmetric round-to-nearest quantization with one float32 scale per
  row (per tensor for 1-D): ``q = round(x / s)``, ``s = max|row| / 127`` (~0.25x).
* ``topk``    the largest-magnitude fraction of each tensor's entries as
  (int32 flat index, float16 value) pairs; everything else is zero.
* ``topk8``   the same largest-magnitude fraction, as a bitmap of the kept entries
  (1 bit per entry) and their values quantized to int8 with one float32 scale per
  tensor: ~1/32 + fraction/4 of dense (0.08x at the default 20 %).
* ``sign``    one bit per entry (its sign, packed 8 to a byte) and one float32
  scale per row, the row's mean |x|: ``x ~ sign(x) * mean|row|`` (~1/32 + 4/row
  width of dense). Adam's steps have nearly equal magnitudes, so the sign carries
  most of a local delta; error feedback carries the rest into the next round.

Lossy encodings are meant to be used with *error feedback*: the node keeps what
the encoding dropped (`residual`) and adds it to its next round's delta, so no
part of the update is lost for good, only delayed (`encode_with_feedback`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, get_args

import torch

StateDict = dict[str, torch.Tensor]
Encoding = Literal["dense", "float16", "int8", "topk", "topk8", "sign"]
SUPPORTED_ENCODINGS: tuple[str, ...] = get_args(Encoding)
LOSSY_ENCODINGS: frozenset[str] = frozenset({"float16", "int8", "topk", "topk8", "sign"})
# Encodings that send only some entries: a zero in the decoded update means "not sent",
# not "no change", so the mean counts such an update only in the rows it sent.
SPARSE_ENCODINGS: frozenset[str] = frozenset({"topk", "topk8"})

# Suffixes of the extra tensors an encoding adds next to (or instead of) a parameter.
SCALE_SUFFIX = "::scale"
INDEX_SUFFIX = "::idx"
VALUE_SUFFIX = "::val"
BITS_SUFFIX = "::bits"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
DEFAULT_TOPK_FRACTION = 0.01
# topk8 pays 1 bit per entry for its bitmap, so it keeps more entries for the same bytes.
DEFAULT_TOPK8_FRACTION = 0.2


def default_topk_fraction(encoding: str) -> float:
    """The kept fraction an encoding uses when none is configured."""
    return DEFAULT_TOPK8_FRACTION if encoding == "topk8" else DEFAULT_TOPK_FRACTION


def _check_encoding(encoding: str) -> None:
    if encoding not in SUPPORTED_ENCODINGS:
        raise ValueError(
            f"unsupported update encoding {encoding!r}; supported: {list(SUPPORTED_ENCODINGS)}"
        )


def topk_count(numel: int, fraction: float) -> int:
    """Entries kept of a tensor with `numel` entries: ceil(fraction * numel), at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError("topk fraction must be in (0, 1]")
    return min(numel, max(1, math.ceil(fraction * numel)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view: one row per first-dimension index (one row for 0-D/1-D tensors)."""
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8, 8 flags per byte, most significant bit first, zero-padded."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` flags, as bool."""
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS) != 0
    return bits.reshape(-1)[:count]


def _int8_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row scale (per-tensor for 0-D/1-D): max|x| / 127, as float32."""
    return (_rows(x).abs().amax(dim=1) / 127.0).to(torch.float32)  # (rows,)


def encode_update(
    delta: Mapping[str, torch.Tensor],
    encoding: str,
    *,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
) -> StateDict:
    """Pack a dense delta. Non-floating tensors pass through unchanged in every encoding."""
    _check_encoding(encoding)
    out: StateDict = {}
    for name, x in delta.items():
        if any(name.endswith(s) for s in (SCALE_SUFFIX, INDEX_SUFFIX, VALUE_SUFFIX, BITS_SUFFIX)):
            raise ValueError(f"parameter name {name!r} uses a reserved suffix")
        if encoding == "dense" or not x.is_floating_point():
            out[name] = x.contiguous()
        elif encoding == "float16":
            out[name] = x.to(torch.float16).contiguous()
        elif encoding == "int8":
            scale = _int8_scale(x)  # (rows,)
            rows = scale.shape[0]
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(x.to(torch.float32).reshape(rows, -1) / safe.unsqueeze(1))
            out[name] = q.clamp_(-127, 127).to(torch.int8).reshape(x.shape).contiguous()
            out[name + SCALE_SUFFIX] = scale.contiguous()
        elif encoding == "sign":
            matrix = _rows(x.to(torch.float32))
            out[name + BITS_SUFFIX] = pack_bits(matrix >= 0)
            out[name + SCALE_SUFFIX] = matrix.abs().mean(dim=1).contiguous()
        elif encoding == "topk8":
            flat = x.reshape(-1).to(torch.float32)
            k = topk_count(flat.numel(), topk_fraction)
            idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            kept = torch.zeros(flat.numel(), dtype=torch.bool)
            kept[idx] = True
            values = flat[idx]
            scale = (values.abs().amax() / 127.0).reshape(1)
            safe = scale if float(scale) > 0 else torch.ones(1)
            out[name + BITS_SUFFIX] = pack_bits(kept)
            out[name + VALUE_SUFFIX] = torch.round(values / safe).clamp_(-127, 127).to(torch.int8)
            out[name + SCALE_SUFFIX] = scale.to(torch.float32).contiguous()
        else:  # topk
            flat = x.reshape(-1)
            k = topk_count(flat.numel(), topk_fraction)
            idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            out[name + INDEX_SUFFIX] = idx.to(torch.int32).contiguous()
            out[name + VALUE_SUFFIX] = flat[idx].to(torch.float16).contiguous()
    return out


def decode_update(
    payload: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    encoding: str,
) -> StateDict:
    """Unpack to a dense delta with the reference's names, shapes and dtypes.

    Raises ValueError when the payload does not fit the reference (missing or
    extra tensors, wrong shapes or dtypes, indices out of range).
    """
    _check_encoding(encoding)
    out: StateDict = {}
    used: set[str] = set()

    def take(key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key not in payload:
            raise ValueError(f"{encoding} update: missing parameter {key!r}")
        t = payload[key]
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
        used.add(key)
        return t

    for name, ref in reference.items():
        if encoding == "dense" or not ref.is_floating_point():
            out[name] = take(name)  # shapes and dtypes are checked by check_compatible
        elif encoding == "float16":
            out[name] = _same_shape(name, take(name, torch.float16), ref).to(ref.dtype)
        elif encoding == "int8":
            q = _same_shape(name, take(name, torch.int8), ref)
            scale = take(name + SCALE_SUFFIX, torch.float32)
            rows = ref.shape[0] if ref.dim() >= 2 else 1
            if tuple(scale.shape) != (rows,):
                raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}, want {rows}")
            deq = q.to(torch.float32).reshape(rows, -1) * scale.unsqueeze(1)
            out[name] = deq.reshape(ref.shape).to(ref.dtype)
        elif encoding == "sign":
            bits = take(name + BITS_SUFFIX, torch.uint8)
            scale = take(name + SCALE_SUFFIX, torch.float32)
            rows = ref.shape[0] if ref.dim() >= 2 else 1
            n = ref.numel()
            if bits.dim() != 1 or bits.numel() != (n + 7) // 8:
                raise ValueError(f"sign bits of {name!r} have the wrong length")
            if tuple(scale.shape) != (rows,):
                raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}, want {rows}")
            signs = unpack_bits(bits, n).reshape(rows, -1).to(torch.float32) * 2 - 1
            out[name] = (signs * scale.unsqueeze(1)).reshape(ref.shape).to(ref.dtype)
        elif encoding == "topk8":
            bits = take(name + BITS_SUFFIX, torch.uint8)
            val = take(name + VALUE_SUFFIX, torch.int8)
            scale = take(name + SCALE_SUFFIX, torch.float32)
            n = ref.numel()
            if bits.dim() != 1 or bits.numel() != (n + 7) // 8:
                raise ValueError(f"topk8 bitmap of {name!r} has the wrong length")
            if tuple(scale.shape) != (1,):
                raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}, want (1,)")
            kept = unpack_bits(bits, n)
            if val.dim() != 1 or val.numel() != int(kept.sum()):
                raise ValueError(f"topk8 values of {name!r} do not match its bitmap")
            dense = torch.zeros(n, dtype=torch.float32)
            dense[kept] = val.to(torch.float32) * scale
            out[name] = dense.reshape(ref.shape).to(ref.dtype)
        else:  # topk
            idx = take(name + INDEX_SUFFIX, torch.int32)
            val = take(name + VALUE_SUFFIX, torch.float16)
            if idx.dim() != 1 or tuple(idx.shape) != tuple(val.shape):
                raise ValueError(f"indices and values of {name!r} differ in shape")
            n = ref.numel()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"an index of {name!r} is outside 0..{n - 1}")
            dense = torch.zeros(n, dtype=ref.dtype)
            dense[idx.to(torch.long)] = val.to(ref.dtype)
            out[name] = dense.reshape(ref.shape)
    extra = sorted(set(payload) - used)
    if extra:
        raise ValueError(f"{encoding} update has unexpected tensors {extra[:5]}")
    return out


def _same_shape(name: str, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"parameter {name!r} has shape {tuple(t.shape)}, want {tuple(ref.shape)}")
    return t


def encode_with_feedback(
    delta: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
    encoding: str,
    *,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
) -> tuple[StateDict, StateDict]:
    """Error feedback: encode `delta + residual`; the new residual is what the encoding lost.

    Returns (payload, new_residual), with `decode(payload) + new_residual == delta + residual`
    up to float rounding. A residual whose names or shapes no longer match (the
    model grew) is dropped rather than misapplied.
    """
    corrected: StateDict = {}
    for name, x in delta.items():
        r = residual.get(name) if residual is not None else None
        if r is not None and r.shape == x.shape and x.is_floating_point():
            corrected[name] = x + r
        else:
            corrected[name] = x
    payload = encode_update(corrected, encoding, topk_fraction=topk_fraction)
    sent = decode_update(payload, corrected, encoding)
    new_residual = {
        name: corrected[name] - sent[name]
        for name in corrected
        if corrected[name].is_floating_point()
    }
    return payload, new_residual
