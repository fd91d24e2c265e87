"""HTTP load from a separate process on loopback: `wrk` when installed, else an httpx loader.

Both are bounded in time (`duration`) and, for the httpx loader, in count
(`max_requests`). Each run cycles through a list of request paths, so one run
can mix users, filters and sessions. Latencies are end-to-end per request as
the client sees them.

`python -m bench.load --base URL --paths FILE --concurrency C --duration S`
is the httpx loader itself (one asyncio process, C connections).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoadResult:
    tool: str
    concurrency: int
    requests: int
    errors: int  # non-2xx answers and transport errors
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def find_wrk(install: bool = False) -> str | None:
    """The wrk binary; with `install`, try Debian's package once when it is missing."""
    path = shutil.which("wrk")
    if path is None and install and os.environ.get("FEDJEWEL_BENCH_NO_INSTALL") is None:
        apt = shutil.which("apt-get")
        if apt is not None and os.geteuid() == 0:
            subprocess.run(
                [apt, "install", "-y", "-qq", "wrk"],
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=300,
            )
            path = shutil.which("wrk")
    return path


_WRK_SCRIPT = """
local paths = {%(paths)s}
local i = 0
%(headers)s
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "FEDJEWEL_JSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"errors\\": %%d, "
    .. "\\"p50\\": %%d, \\"p90\\": %%d, \\"p99\\": %%d, \\"max\\": %%d}\\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    wrk: str,
    base_url: str,
    paths: list[str],
    *,
    concurrency: int,
    duration: float,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    headers_lua = "\n".join(
        f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in (headers or {}).items()
    )
    script = _WRK_SCRIPT % {
        "paths": ", ".join(_lua_string(p) for p in paths),
        "headers": headers_lua,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
        script_path = fh.name
    try:
        threads = max(1, min(2, concurrency))
        cmd = [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s"]
        cmd += ["--timeout", "10s", "-s", script_path, base_url]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 60, check=False
        ).stdout
    finally:
        os.unlink(script_path)
    line = next((x for x in out.splitlines() if x.startswith("FEDJEWEL_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result:\n{out[-2000:]}")
    data = json.loads(line.removeprefix("FEDJEWEL_JSON "))
    seconds = data["duration_us"] / 1e6
    # wrk counts requests with a non-2xx/3xx answer under errors.status.
    return LoadResult(
        tool="wrk",
        concurrency=concurrency,
        requests=int(data["requests"]),
        errors=int(data["errors"]),
        seconds=seconds,
        rps=data["requests"] / seconds if seconds else 0.0,
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        max_ms=data["max"] / 1000,
    )


def run_httpx_loader(
    base_url: str,
    paths: list[str],
    *,
    concurrency: int,
    duration: float,
    max_requests: int = 200_000,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Run the httpx loader in its own process and parse its JSON line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"paths": paths, "headers": headers or {}}, fh)
        spec = fh.name
    try:
        cmd = [sys.executable, "-m", "bench.load", "--base", base_url, "--spec", spec]
        cmd += ["--concurrency", str(concurrency), "--duration", str(duration)]
        cmd += ["--max-requests", str(max_requests)]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 120, check=True
        ).stdout
    finally:
        os.unlink(spec)
    return LoadResult(**json.loads(out.strip().splitlines()[-1]))


def run_load(
    base_url: str,
    paths: list[str],
    *,
    concurrency: int,
    duration: float,
    headers: dict[str, str] | None = None,
    tool: str = "auto",
) -> LoadResult:
    """`tool`: auto (wrk if present or installable, else httpx), wrk, httpx."""
    wrk = find_wrk(install=tool in ("auto", "wrk")) if tool != "httpx" else None
    if wrk is not None:
        return run_wrk(
            wrk, base_url, paths, concurrency=concurrency, duration=duration, headers=headers
        )
    if tool == "wrk":
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    return run_httpx_loader(
        base_url, paths, concurrency=concurrency, duration=duration, headers=headers
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[idx]


async def _httpx_load(
    base: str,
    paths: list[str],
    headers: dict[str, str],
    concurrency: int,
    duration: float,
    max_requests: int,
) -> LoadResult:
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, limits=limits, timeout=10.0
    ) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal errors, counter
            while time.perf_counter() < deadline and counter < max_requests:
                path = paths[counter % len(paths)]
                counter += 1
                t0 = time.perf_counter()
                try:
                    resp = await client.get(path)
                    ok = resp.status_code < 400
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    lat = sorted(x * 1000 for x in latencies)
    return LoadResult(
        tool="httpx",
        concurrency=concurrency,
        requests=len(lat),
        errors=errors,
        seconds=seconds,
        rps=len(lat) / seconds if seconds else 0.0,
        p50_ms=_percentile(lat, 50),
        p90_ms=_percentile(lat, 90),
        p99_ms=_percentile(lat, 99),
        max_ms=lat[-1] if lat else 0.0,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="httpx load generator (one process)")
    p.add_argument("--base", required=True)
    p.add_argument("--spec", type=Path, required=True, help='JSON {"paths": [...], "headers": {}}')
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=200_000)
    args = p.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    result = asyncio.run(
        _httpx_load(
            args.base,
            spec["paths"],
            spec.get("headers", {}),
            args.concurrency,
            args.duration,
            args.max_requests,
        )
    )
    print(json.dumps(result.as_dict()))


if __name__ == "__main__":
    main()
