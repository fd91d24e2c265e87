"""FastAPI dependencies of the node, in one place.

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, and a
thread hop per dependency cost /v1/recommend more than its scoring. None of them
blocks (state lookups and a constant-time key comparison).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from regional_node.participation import NodeRuntime
from regional_node.settings import NodeSettings
from regional_node.store import EventStore
from shared.errors import Unauthorized


async def get_settings(request: Request) -> NodeSettings:
    settings: NodeSettings = request.app.state.settings
    return settings


async def get_store(request: Request) -> EventStore:
    store: EventStore = request.app.state.store
    return store


async def get_runtime(request: Request) -> NodeRuntime:
    runtime: NodeRuntime = request.app.state.runtime
    return runtime


SettingsDep = Annotated[NodeSettings, Depends(get_settings)]
StoreDep = Annotated[EventStore, Depends(get_store)]
RuntimeDep = Annotated[NodeRuntime, Depends(get_runtime)]

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="Storefront API key.")


async def require_api_key(
    settings: SettingsDep, key: Annotated[str | None, Depends(_api_key)]
) -> None:
    keys = settings.api_key_list
    if not key:
        if settings.allow_anonymous:
            return
        raise Unauthorized("missing X-API-Key header")
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise Unauthorized("invalid API key")


ApiKeyDep = Annotated[None, Depends(require_api_key)]
