"""Run docker-compose.yml without Docker: each service's own command as a local process.

What the harness does with the compose file, and nothing more:

* interpolates `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$` from the
  environment it is given (as `docker compose` does from the shell / `.env`);
* starts services in `depends_on` order, waiting for `service_healthy`
  dependencies by running each service's own healthcheck command;
* maps the `postgres` service to an existing PostgreSQL database (no process is
  started; its health is a real connection), and rewrites every PostgreSQL URL
  that points at it;
* gives every published container port a free loopback port and rewrites
  `--port <container port>`, `--host 0.0.0.0` and `<service>:<port>` references in
  commands, environment values and healthchecks accordingly;
* maps each named volume to a directory of its own and rewrites its mount path.

The services run with the repository root as working directory (the image's
WORKDIR holds the same tree) and this interpreter's `bin/` first on PATH, so
`python` means the project's virtual environment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text

from shared.devservers import ServiceProcess, free_port

_VAR = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)")
_PG_URL = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://(?:[^@/]*@)?(?P<host>[^:/]+)(?::\d+)?/")


class ComposeError(RuntimeError):
    pass


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution for one string."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        current = env.get(name)
        if op == ":-" and not current:
            return default
        if op == "-" and current is None:
            return default
        return current or ""

    return _VAR.sub(sub, value)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


def parse_duration(value: str | int | float | None, default: float) -> float:
    """Compose durations: `5s`, `1m30s`, `500ms`."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        raise ComposeError(f"bad duration {value!r}")
    return sum(float(n) * scale[u] for n, u in parts)


@dataclass(frozen=True)
class Healthcheck:
    argv: tuple[str, ...]  # CMD form; CMD-SHELL becomes ("sh", "-c", ...)
    interval: float
    timeout: float
    retries: int
    start_period: float


@dataclass(frozen=True)
class ComposeService:
    name: str
    image: str | None
    build: str | None
    command: tuple[str, ...]
    environment: dict[str, str]
    ports: tuple[int, ...]  # container ports
    volumes: tuple[tuple[str, str], ...]  # (named volume or host path, mount path)
    depends_on: dict[str, str]  # service -> condition
    healthcheck: Healthcheck | None


def _command(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return tuple(shlex.split(raw))
    return tuple(str(x) for x in raw)


def _environment(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, list):
        out: dict[str, str] = {}
        for entry in raw:
            key, _, value = str(entry).partition("=")
            out[key] = value
        return out
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def _healthcheck(raw: Any) -> Healthcheck | None:
    if not raw or raw.get("disable"):
        return None
    test = raw["test"]
    if isinstance(test, str):
        argv: tuple[str, ...] = ("sh", "-c", test)
    elif test[0] == "CMD":
        argv = tuple(str(x) for x in test[1:])
    elif test[0] == "CMD-SHELL":
        argv = ("sh", "-c", str(test[1]))
    else:
        raise ComposeError(f"unsupported healthcheck test {test!r}")
    return Healthcheck(
        argv=argv,
        interval=parse_duration(raw.get("interval"), 30.0),
        timeout=parse_duration(raw.get("timeout"), 30.0),
        retries=int(raw.get("retries", 3)),
        start_period=parse_duration(raw.get("start_period"), 0.0),
    )


def _container_port(spec: Any) -> int:
    text_spec = str(spec).split("/")[0]  # drop "/tcp"
    return int(text_spec.rsplit(":", 1)[-1])


def load_compose(path: Path, env: Mapping[str, str]) -> dict[str, ComposeService]:
    """Parse and interpolate a compose file (YAML anchors and merge keys included)."""
    doc = _interpolate_tree(yaml.safe_load(path.read_text()), env)
    services: dict[str, ComposeService] = {}
    for name, raw in (doc.get("services") or {}).items():
        build = raw.get("build")
        if isinstance(build, dict):
            build = build.get("context", ".")
        depends = raw.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        volumes: list[tuple[str, str]] = []
        for v in raw.get("volumes") or []:
            if isinstance(v, dict):
                volumes.append((str(v["source"]), str(v["target"])))
            else:
                source, _, target = str(v).partition(":")
                volumes.append((source, target.split(":")[0]))
        services[name] = ComposeService(
            name=name,
            image=raw.get("image"),
            build=build,
            command=_command(raw.get("command")),
            environment=_environment(raw.get("environment")),
            ports=tuple(_container_port(p) for p in raw.get("ports") or []),
            volumes=tuple(volumes),
            depends_on={
                d: str((c or {}).get("condition", "service_started")) for d, c in depends.items()
            },
            healthcheck=_healthcheck(raw.get("healthcheck")),
        )
    return services


def start_order(services: Mapping[str, ComposeService]) -> list[str]:
    """Dependencies first; file order among independent services. Raises on cycles."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name not in services:
            raise ComposeError(f"{chain[-1]} depends on unknown service {name!r}")
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ComposeError("dependency cycle: " + " -> ".join((*chain, name)))
        state[name] = "visiting"
        for dep in services[name].depends_on:
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in services:
        visit(name, ())
    return order


@dataclass
class _Running:
    service: ComposeService
    process: ServiceProcess | None  # None for the mapped postgres service
    ports: dict[int, int]  # container port -> loopback port


@dataclass
class ComposeHarness:
    """`up()` starts the file's services as local processes; `down()` stops them."""

    compose_file: Path
    workdir: Path
    postgres_url: str
    env: Mapping[str, str] = field(default_factory=dict)
    postgres_service: str = "postgres"
    max_interval: float = 0.5  # poll healthchecks at least this often
    services: dict[str, ComposeService] = field(init=False)
    running: dict[str, _Running] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.services = load_compose(self.compose_file, self.env)
        self.ports = {
            name: {cport: free_port() for cport in svc.ports}
            for name, svc in self.services.items()
            if name != self.postgres_service
        }

    # ------------------------------------------------------------------ rewriting

    def rewrite(self, service: str, value: str) -> str:
        """A value as the service would see it on this machine instead of in its container."""
        m = _PG_URL.match(value)
        if m and m.group("host") == self.postgres_service:
            return self.postgres_url
        for other, ports in self.ports.items():
            for cport, local in ports.items():
                value = re.sub(
                    rf"(?<![\w.-]){re.escape(other)}:{cport}\b", f"127.0.0.1:{local}", value
                )
        own = self.ports.get(service, {})
        for cport, local in own.items():
            value = re.sub(rf"(?<![\w.-])(127\.0\.0\.1|localhost):{cport}\b", rf"\1:{local}", value)
            value = re.sub(rf"--port([ =]){cport}\b", rf"--port\g<1>{local}", value)
        value = re.sub(r"--host([ =])0\.0\.0\.0\b", r"--host\g<1>127.0.0.1", value)
        for source, target in self.services[service].volumes:
            local_dir = self.volume_dir(source)
            value = re.sub(rf"(?<![\w.-]){re.escape(target)}(?=/|$)", str(local_dir), value)
        return value

    def rewrite_argv(self, service: str, argv: tuple[str, ...]) -> list[str]:
        """`rewrite` per token, and for exec-form pairs like `--port`, `8100`."""
        out: list[str] = []
        for token in argv:
            if out and out[-1] in ("--port", "--host"):
                token = self.rewrite(service, f"{out[-1]} {token}").split(" ", 1)[1]
            out.append(self.rewrite(service, token))
        return out

    def volume_dir(self, source: str) -> Path:
        path = self.workdir / "volumes" / source.strip("./").replace("/", "_")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def process_env(self, service: str) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("COORDINATOR_", "NODE_", "POSTGRES_"))
        }
        bin_dir = str(Path(sys.executable).parent)
        base["PATH"] = bin_dir + os.pathsep + base.get("PATH", "")
        svc = self.services[service]
        return base | {k: self.rewrite(service, v) for k, v in svc.environment.items()}

    # ------------------------------------------------------------------ lifecycle

    def url(self, service: str, container_port: int | None = None) -> str:
        ports = self.running[service].ports
        port = ports[container_port] if container_port is not None else next(iter(ports.values()))
        return f"http://127.0.0.1:{port}"

    def up(self, timeout: float = 120.0, *, wait: bool = True) -> None:
        """Start every service; with `wait`, like `docker compose up --wait`, return once all
        services that have a healthcheck are healthy."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for name in start_order(self.services):
                self._start(name, timeout)
            if wait:
                for name, run in self.running.items():
                    if run.process is not None and run.service.healthcheck is not None:
                        self.wait_healthy(name, timeout)
        except BaseException:
            self.down()
            raise

    def _start(self, name: str, timeout: float) -> None:
        svc = self.services[name]
        for dep, condition in svc.depends_on.items():
            if condition == "service_healthy":
                self.wait_healthy(dep, timeout)
            elif condition != "service_started":
                raise ComposeError(f"{name}: depends_on condition {condition!r} not supported")
        if name == self.postgres_service:
            self.running[name] = _Running(svc, None, {})
            return
        if not svc.command:
            raise ComposeError(f"{name}: no command (the harness cannot run an image's default)")
        ports = self.ports[name]
        process = ServiceProcess(
            name=name,
            module=name,
            env=self.process_env(name),
            log_path=self.workdir / "logs" / f"{name}.log",
            port=next(iter(ports.values()), 0),
            cwd=self.compose_file.parent / (svc.build or "."),
            command=tuple(self.rewrite_argv(name, svc.command)),
        ).start()
        self.running[name] = _Running(svc, process, ports)

    def is_healthy(self, name: str) -> bool:
        run = self.running[name]
        if run.process is None:
            engine = create_engine(self.postgres_url)
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return True
            except Exception:
                return False
            finally:
                engine.dispose()
        check = run.service.healthcheck
        if check is None:
            raise ComposeError(f"{name} has no healthcheck but a dependant waits for it")
        try:
            done = subprocess.run(
                self.rewrite_argv(name, check.argv),
                env=self.process_env(name),
                cwd=run.process.cwd,
                timeout=check.timeout,
                capture_output=True,
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def wait_healthy(self, name: str, timeout: float) -> None:
        """Poll the healthcheck until it passes; fail fast when the process dies."""
        run = self.running[name]
        check = run.service.healthcheck
        interval = min(check.interval if check else 1.0, self.max_interval)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = run.process.proc if run.process is not None else None
            if proc is not None and proc.poll() is not None:
                raise ComposeError(
                    f"{name} exited with {proc.returncode}; log:\n{self.log_tail(name)}"
                )
            if self.is_healthy(name):
                return
            time.sleep(interval)
        raise ComposeError(f"{name} not healthy after {timeout}s; log:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        run = self.running.get(name)
        return run.process.tail_log(lines) if run and run.process else ""

    def logs(self) -> str:
        return "\n\n".join(f"--- {n} ---\n{self.log_tail(n, 30)}" for n in self.running)

    def down(self) -> None:
        for name in reversed(list(self.running)):
            process = self.running[name].process
            if process is not None:
                process.stop()
        self.running.clear()
