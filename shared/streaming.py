"""Reading request bodies with a size cap enforced while they stream."""

from __future__ import annotations

from fastapi import Request

from shared.errors import PayloadTooLarge


async def read_body_capped(request: Request, max_bytes: int) -> bytes:
    """Read the body chunk by chunk, refusing with 413 as soon as it passes `max_bytes`.

    A declared Content-Length over the cap is refused before reading anything.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
    return bytes(buf)
