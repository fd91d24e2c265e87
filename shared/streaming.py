"""Reading request bodies with a size cap enforced while they stream."""

from __future__ import annotations

import json

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import PayloadTooLarge


async def read_body_capped(request: Request, max_bytes: int) -> bytearray:
    """Read the body chunk by chunk, refusing with 413 as soon as it passes `max_bytes`.

    A declared Content-Length over the cap is refused before reading anything.
    The body is copied exactly once, into one buffer: with a Content-Length the
    buffer is allocated at its final size up front (a 100 MB update costs 100 MB,
    not the 2-3x of growing a bytearray and copying it into `bytes`).
    """
    declared = request.headers.get("content-length")
    expected = int(declared) if declared is not None and declared.isdigit() else None
    if expected is not None and expected > max_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    if expected is None:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > max_bytes:
                raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
        return buf
    buf = bytearray(expected)
    view = memoryview(buf)
    filled = 0
    async for chunk in request.stream():
        end = filled + len(chunk)
        if end > expected:
            raise PayloadTooLarge(f"body is longer than its Content-Length of {expected} bytes")
        view[filled:end] = chunk
        filled = end
    view.release()
    if filled != expected:
        del buf[filled:]  # the client sent less than it declared: keep what came
    return buf


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, while streaming.

    FastAPI reads a JSON body whole before validating it, so without this a client can
    make the server buffer any amount. A declared Content-Length over the cap is
    refused before reading; a chunked body is counted as it arrives and cut off as
    soon as it passes the cap. Paths in `exempt` (endpoints that cap their own
    streaming, like update uploads) are passed through untouched.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope.get("method") in ("GET", "HEAD")  # no endpoint here reads their bodies
            or any(path.startswith(p) for p in self.exempt)
        ):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                detail = f"body of {int(value)} bytes exceeds the limit of {limit} bytes"
                await self._refuse(send, detail)
                return
        seen = 0
        exceeded = False
        refused = False

        async def counted_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal refused
            if not exceeded:
                await send(message)
            elif not refused:
                # The framework turned the cut-off read into its own error: answer 413.
                refused = True
                await self._refuse(send, f"body exceeds the limit of {limit} bytes")

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            if not refused:
                refused = True
                await self._refuse(send, f"body exceeds the limit of {limit} bytes")

    @staticmethod
    async def _refuse(send: Send, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
