"""Weight (de)serialization: safetensors bytes keyed by parameter name, plus sha256."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

StateDict = dict[str, torch.Tensor]


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def state_to_bytes(state: StateDict, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize a state dict. Keys are sorted by safetensors, so equal states give equal bytes."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    return _st_save(tensors, metadata=metadata)


def bytes_to_state(data: bytes | bytearray) -> StateDict:
    """Parse safetensors bytes. Raises ValueError on anything that is not a valid file."""
    try:
        return _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"not a valid safetensors payload: {exc}") from exc


def _read_header(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """A safetensors payload's JSON header and where its data section starts."""
    view = memoryview(data).cast("B")
    if len(view) < 8:
        raise ValueError("not a valid safetensors payload: shorter than its header")
    header_len = int.from_bytes(view[:8], "little")
    if header_len <= 0 or 8 + header_len > len(view):
        raise ValueError("not a valid safetensors payload: bad header length")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a valid safetensors payload: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("not a valid safetensors payload: header is not an object")
    return header, 8 + header_len


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` block of a safetensors payload (empty when absent)."""
    header, _ = _read_header(data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("not a valid safetensors payload: __metadata__ is not an object")
    return {str(k): str(v) for k, v in meta.items()}


def num_parameters(state: StateDict) -> int:
    return sum(int(t.numel()) for t in state.values())


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_MAX_ELEMENTS = 2**40  # no tensor a coordinator or node keeps comes near it
_MAX_DIMS = 8


def state_views(data: bytes | bytearray | memoryview) -> StateDict:
    """Parse safetensors without copying: every tensor is a view into `data`.

    For large payloads (an update of a 100 MB model): `bytes_to_state` copies the
    whole body once more. The views are read-only when `data` is `bytes`; never
    modify them in place. Validates like safetensors: a JSON header, known
    dtypes, and tensors that tile the data section exactly, in order.
    """
    import warnings

    view = memoryview(data).cast("B")
    header, base = _read_header(view)
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(x) for x in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid safetensors payload: bad entry {name!r}") from exc
        numel = span = 1
        for dim in shape:
            numel *= dim
            span *= max(dim, 1)  # what torch sizes even an empty tensor's storage by
            # A huge size beside a 0 passed the size check and raised TypeError or
            # RuntimeError (overflow) in torch: a 500 instead of a 422.
            if dim < 0 or span > _MAX_ELEMENTS or len(shape) > _MAX_DIMS:
                raise ValueError(f"not a valid safetensors payload: bad shape of {name!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize:
            raise ValueError(f"not a valid safetensors payload: size of {name!r} mismatches")
        entries.append((begin, end, str(name), dtype, shape, numel))
    entries.sort()
    position = 0
    for begin, end, name, *_ in entries:
        if begin != position:
            raise ValueError(f"not a valid safetensors payload: {name!r} overlaps or leaves a gap")
        position = end
    if base + position != len(view):
        raise ValueError("not a valid safetensors payload: data section has the wrong size")
    out: StateDict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-writable buffer: we never write
        for begin, _end, name, dtype, shape, numel in entries:
            if numel == 0:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(view, dtype=dtype, count=numel, offset=base + begin)
            out[name] = flat.reshape(shape)
    return out


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy().data


@dataclass(frozen=True)
class SafetensorsLayout:
    """Where everything goes in a serialized state: the header bytes, then tensors in order."""

    prefix: bytes  # 8-byte length + JSON header (padded)
    order: list[str]
    size: int  # of the whole serialization


def safetensors_header(
    state: StateDict, metadata: dict[str, str] | None = None
) -> SafetensorsLayout:
    """The safetensors header of `state` and the order its tensors follow it in.

    Tensors are ordered by element size, then name, so equal states give equal bytes
    and every tensor stays aligned; the header is padded to a multiple of 8.
    """
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * ((-len(encoded)) % 8)  # tensors start 8-byte aligned
    prefix = len(encoded).to_bytes(8, "little") + encoded
    return SafetensorsLayout(prefix=prefix, order=order, size=len(prefix) + offset)


def iter_state_bytes(
    state: StateDict, metadata: dict[str, str] | None = None, *, consume: bool = False
) -> Iterator[memoryview]:
    """The safetensors serialization of `state` as a sequence of zero-copy pieces.

    The header first, then each tensor's bytes (the same bytes `state_to_buffer`
    writes). With `consume`, each tensor is removed from `state` once its piece has
    been handed out and the consumer moved on, so a caller that writes pieces
    away (to a database, a socket) holds one model less by the end.
    """
    layout = safetensors_header(state, metadata)
    yield memoryview(layout.prefix)
    for name in layout.order:
        t = state.pop(name) if consume else state[name]
        t = t.detach().contiguous().cpu()
        if t.numel():
            yield _tensor_bytes(t)
        del t


def state_to_buffer(state: StateDict, metadata: dict[str, str] | None = None) -> bytearray:
    """Serialize to safetensors in one preallocated buffer: the model is copied once.

    `state_to_bytes` (safetensors' own writer) holds a bytes copy of every tensor
    *and* the joined output at once: 2-3x the model in memory. The layout here is
    valid safetensors (any reader loads it); tensors are ordered by element size,
    then name, so equal states give equal bytes and every tensor stays aligned.
    """
    buf = bytearray(safetensors_header(state, metadata).size)
    position = 0
    for piece in iter_state_bytes(state, metadata):
        buf[position : position + len(piece)] = piece
        position += len(piece)
    return buf


def iter_slices(pieces: Iterable[memoryview], slice_bytes: int) -> Iterator[bytes]:
    """Re-cut a stream of pieces into slices of exactly `slice_bytes` (the last may be
    shorter): one slice-sized copy at a time, never the whole."""
    buf = bytearray()
    for piece in pieces:
        start = 0
        while start < len(piece):
            take = min(slice_bytes - len(buf), len(piece) - start)
            buf += piece[start : start + take]
            start += take
            if len(buf) == slice_bytes:
                yield bytes(buf)
                buf.clear()
        del piece
    if buf:
        yield bytes(buf)
