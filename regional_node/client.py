"""The node's HTTP client for the coordinator (httpx, async)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

from shared.insights_schemas import RegionReport
from shared.privacy_schemas import SecAggState
from shared.schemas import CatalogOut, ModelVersionOut, RoundOut, UpdateReceipt


class CoordinatorError(Exception):
    """The coordinator answered with an error status."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"coordinator answered {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class Weights:
    version: int
    sha256: str
    data: bytes


def _raise_for_status(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        try:
            detail = str(resp.json().get("detail"))
        except (ValueError, AttributeError):
            detail = resp.text[:500]
        raise CoordinatorError(resp.status_code, detail)


class CoordinatorClient:
    def __init__(self, base_url: str, token: str | None, *, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def current_round(
        self, *, after: int | None = None, wait: float = 0.0
    ) -> RoundOut | None:
        """The open round; with `after`, long-polls up to `wait` s for a newer one."""
        params: dict[str, str] = {}
        timeout = self._http.timeout
        if after is not None:
            params = {"after": str(after), "wait": f"{wait:.3f}"}
            timeout = httpx.Timeout(self._http.timeout.read or 60.0, read=wait + 30.0)
        resp = await self._http.get("/v1/rounds/current", params=params, timeout=timeout)
        if resp.status_code == 404:
            return None
        _raise_for_status(resp)
        return RoundOut.model_validate(resp.json())

    async def active_model(self) -> ModelVersionOut | None:
        resp = await self._http.get("/v1/models/latest")
        if resp.status_code == 404:
            return None
        _raise_for_status(resp)
        return ModelVersionOut.model_validate(resp.json())

    async def model(self, version: int) -> ModelVersionOut:
        resp = await self._http.get(f"/v1/models/{version}")
        _raise_for_status(resp)
        return ModelVersionOut.model_validate(resp.json())

    async def weights(self, version: int, cached: Weights | None = None) -> Weights:
        """Download a version's weights, reusing `cached` on 304; verifies the sha256."""
        from shared.serialization import sha256_hex

        headers = {}
        if cached is not None and cached.version == version:
            headers["If-None-Match"] = f'"{cached.sha256}"'
        async with self._http.stream(
            "GET", f"/v1/models/{version}/weights", headers=headers
        ) as resp:
            if resp.status_code == 304 and cached is not None:
                return cached
            if resp.status_code >= 400:
                await resp.aread()
                _raise_for_status(resp)
            chunks = [chunk async for chunk in resp.aiter_bytes()]
            expected = resp.headers.get("ETag", "").strip('"')
        data = b"".join(chunks)  # the one whole-body copy
        del chunks
        actual = sha256_hex(data)
        if expected and actual != expected:
            raise CoordinatorError(502, f"weights of version {version} fail their sha256 check")
        return Weights(version=version, sha256=actual, data=data)

    async def catalog(self, etag: str | None = None) -> tuple[CatalogOut | None, str | None]:
        """(catalog, etag); (None, etag) when unchanged since `etag`."""
        headers = {"If-None-Match": etag} if etag else {}
        resp = await self._http.get("/v1/catalog", headers=headers)
        if resp.status_code == 304:
            return None, etag
        _raise_for_status(resp)
        return CatalogOut.model_validate(resp.json()), resp.headers.get("ETag")

    async def submit_update(
        self,
        round_id: int,
        *,
        base_version: int,
        num_examples: int,
        payload: bytes,
        sha256: str,
        metrics: dict[str, float],
        encoding: str = "dense",
    ) -> UpdateReceipt:
        resp = await self._http.post(
            f"/v1/rounds/{round_id}/updates",
            params={"num_examples": num_examples, "base_version": base_version},
            content=payload,
            headers={
                "Content-Type": "application/octet-stream",
                "X-Content-SHA256": sha256,
                "X-Update-Metrics": json.dumps(metrics),
                "X-Update-Encoding": encoding,
            },
        )
        _raise_for_status(resp)
        return UpdateReceipt.model_validate(resp.json())

    # Privacy features (docs/privacy.md) ------------------------------------------------------

    async def publish_secagg_key(self, round_id: int, public_key: str) -> SecAggState:
        resp = await self._http.post(
            f"/v1/rounds/{round_id}/secagg/keys", json={"public_key": public_key}
        )
        _raise_for_status(resp)
        return SecAggState.model_validate(resp.json())

    async def secagg_state(self, round_id: int) -> SecAggState:
        resp = await self._http.get(f"/v1/rounds/{round_id}/secagg")
        _raise_for_status(resp)
        return SecAggState.model_validate(resp.json())

    async def reveal_secagg_seeds(self, round_id: int, seeds: dict[str, str]) -> SecAggState:
        resp = await self._http.post(f"/v1/rounds/{round_id}/secagg/reveals", json={"seeds": seeds})
        _raise_for_status(resp)
        return SecAggState.model_validate(resp.json())

    async def push_insights(self, node_id: str, report: RegionReport) -> None:
        resp = await self._http.post(
            f"/v1/insights/{node_id}",
            content=report.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        _raise_for_status(resp)
