"""Weight (de)serialization: safetensors bytes keyed by parameter name, plus sha256."""

from __future__ import annotations

import hashlib
import json

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


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` block of a safetensors payload (empty when absent)."""
    if len(data) < 8:
        raise ValueError("not a valid safetensors payload: shorter than its header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise ValueError("not a valid safetensors payload: bad header length")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a valid safetensors payload: {exc}") from exc
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def num_parameters(state: StateDict) -> int:
    return sum(int(t.numel()) for t in state.values())
