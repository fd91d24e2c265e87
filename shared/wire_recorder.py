"""A recording reverse proxy: forwards every request to an upstream and logs it in full.

`python -m shared.wire_recorder --upstream URL --log FILE --host H --port P`

Each request becomes one JSON line: method, path, query string, all headers and
the body (base64). Used by the wire audit test (tests/test_wire_audit.py) to
prove what a regional node sends to the coordinator. `/__recorder/ready` is
answered by the proxy itself and not recorded.
"""

from __future__ import annotations

import argparse
import base64
import json
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def read_log(path: Path) -> list[dict[str, Any]]:
    """The recorded requests, bodies decoded to bytes."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec["body"] = base64.b64decode(rec["body_b64"])
        out.append(rec)
    return out


class RecordingProxy:
    def __init__(self, upstream: str, log_path: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self.log_path = log_path
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock, self.log_path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    self._client = httpx.AsyncClient(timeout=120)
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        await self._client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        body = bytearray()
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path: str = scope["path"]
        if path == "/__recorder/ready":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        query = scope.get("query_string", b"").decode("latin-1")
        self._record(
            {
                "method": scope["method"],
                "path": path,
                "query": query,
                "headers": headers,
                "body_b64": base64.b64encode(bytes(body)).decode(),
            }
        )
        assert self._client is not None
        url = self.upstream + path + (f"?{query}" if query else "")
        fwd = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        resp = await self._client.request(scope["method"], url, headers=fwd, content=bytes(body))
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in resp.headers.multi_items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"
        ]
        await send(
            {"type": "http.response.start", "status": resp.status_code, "headers": out_headers}
        )
        await send({"type": "http.response.body", "body": resp.content})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.wire_recorder")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    uvicorn.run(RecordingProxy(args.upstream, args.log), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
