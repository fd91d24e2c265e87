"""Errors that are part of the API: each maps to a 4xx with a JSON `detail`."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

SettingsT = TypeVar("SettingsT")
log = logging.getLogger("fedjewel.errors")


class ApiError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401


class Forbidden(ApiError):
    status_code = 403


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class PayloadTooLarge(ApiError):
    status_code = 413


class Unprocessable(ApiError):
    status_code = 422


class ServiceUnavailable(ApiError):
    status_code = 503


class StoredDataCorrupted(ServiceUnavailable, RuntimeError):
    """Stored bytes fail their checksum: refuse to serve them, say so as JSON (503)."""


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    async def invalid(_request: Request, exc: Exception) -> JSONResponse:
        # FastAPI's own 422, except that an input it echoes back which JSON cannot carry
        # is written as text, not a 500: NaN or Infinity (the JSON parser takes them),
        # bytes that are not UTF-8 (a body sent as text/plain), a lone surrogate ("\ud800").
        assert isinstance(exc, RequestValidationError)
        errors = jsonable_encoder(_bytes_as_text(exc.errors()))
        return JSONResponse({"detail": _json_safe(errors)}, 422)

    async def database_down(_request: Request, exc: Exception) -> JSONResponse:
        # The database refused or dropped the connection, or a lock could not be had
        # (a deadlock, SQLite's busy timeout): a 503 the caller may retry, not a 500.
        assert isinstance(exc, OperationalError)
        if not database_unavailable(exc):
            raise exc  # a bug (SQLite says OperationalError for a missing column too): 500
        log.warning("database unavailable: %s", str(exc).splitlines()[0])
        return JSONResponse(
            {"detail": f"the database is not available ({type(exc.orig).__name__}); retry"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    app.add_exception_handler(ApiError, handle)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(OperationalError, database_down)


def database_unavailable(exc: OperationalError) -> bool:
    """Whether an OperationalError means "the database is not available now" (retry)
    rather than a bug. PostgreSQL's are connection failures, deadlocks, lock and
    statement timeouts (a bad column is a ProgrammingError there); SQLite's cover
    both, so its message decides."""
    if exc.connection_invalidated:
        return True
    if type(exc.orig).__module__.startswith("sqlite3"):
        text = str(exc.orig).lower()
        return any(w in text for w in ("locked", "busy", "unable to open", "disk i/o"))
    return True


def _bytes_as_text(value: object) -> object:
    """`value` with every bytes in it decoded, undecodable bytes replaced (jsonable_encoder
    would decode them strictly and fail)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [_bytes_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _bytes_as_text(v) for k, v in value.items()}
    return value


def _json_safe(value: object) -> object:
    """A jsonable value that JSON can carry: non-finite floats as text, strings with a
    lone surrogate (which UTF-8 cannot encode) with '?' in its place."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    return value


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses=` entries for the listed error codes."""
    from shared.schemas import ErrorBody

    text = {
        400: "Malformed request.",
        401: "Missing or invalid bearer token / API key.",
        403: "Authenticated, but not allowed to do this.",
        404: "No such resource.",
        409: "Conflicts with the current state (stale or duplicate).",
        413: "Body larger than the configured limit.",
        422: "Request well-formed but invalid; `detail` says what is wrong.",
        503: "A dependency (the database, the coordinator) is not available.",
    }
    return {code: {"model": ErrorBody, "description": text.get(code, "Error.")} for code in codes}


def settings_or_exit(make: Callable[[], SettingsT], service: str) -> SettingsT:
    """A service's settings from the environment, or exit with one line saying what is
    wrong (not a pydantic traceback)."""
    try:
        return make()
    except ValidationError as exc:
        msgs = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        sys.exit(f"{service}: invalid configuration: {msgs}")


def database_or_exit(url: str, service: str) -> None:
    """Exit with one line when the service's database cannot be reached or the URL is not
    one (a SQLAlchemy traceback, and uvicorn's "Application startup failed", otherwise)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        sys.exit(f"{service}: the database URL {url!r} is not a URL SQLAlchemy can read")
    try:
        engine = create_engine(url)
    except (ArgumentError, ImportError) as exc:  # an unknown dialect or driver
        sys.exit(f"{service}: cannot use the database {shown}: {exc}")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        sys.exit(f"{service}: cannot reach the database {shown}: {reason}")
    finally:
        engine.dispose()


def port_number(text: str) -> int:
    """argparse type of a TCP port: 0-65535 (0: any free port)."""
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {port}")
    return port


def below_minimum(checks: Iterable[tuple[str, int | None, int]]) -> str | None:
    """The first (flag, value, least) whose value is given and under `least`, said as
    "FLAG must be at least LEAST, not VALUE" (or None)."""
    for flag, value, least in checks:
        if value is not None and value < least:
            return f"{flag} must be at least {least}, not {value}"
    return None
