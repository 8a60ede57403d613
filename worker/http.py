"""HTTP on the metrics port: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for Kubernetes.

Served by aiohttp (no hand-parsed HTTP). Liveness means the event loop answers and no component died;
readiness means the worker can do its job: it has a partition assignment (or is waiting for one
normally), the database answers, and it is not stuck retrying a batch for longer than allowed.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from worker import metrics
from worker.errors import FatalError

ASSIGNMENT_GRACE = 60.0  # seconds after start during which "no assignment yet" is still normal


@dataclass
class Health:
    """What the probes look at. The worker's components update it; the handlers only read it."""

    ready_max_retrying: float
    started: float = field(default_factory=time.monotonic)
    joined_group: bool = False  # a first assignment (maybe empty) arrived
    assigned: int = 0
    database_ok: bool = False
    retrying_since: float | None = None  # monotonic time the current batch started failing
    stopping: bool = False
    dead: str | None = None  # a component that stopped unexpectedly, and why

    def readiness(self) -> tuple[bool, str]:
        now = time.monotonic()
        if self.dead:
            return False, f"component stopped: {self.dead}"
        if self.stopping:
            return False, "shutting down"
        if not self.database_ok:
            return False, "database unreachable"
        if self.retrying_since is not None and now - self.retrying_since > self.ready_max_retrying:
            return False, f"retrying a batch for {now - self.retrying_since:.0f}s"
        if not self.joined_group and now - self.started > ASSIGNMENT_GRACE:
            return False, "no partition assignment yet"
        return True, f"ok: {self.assigned} partition(s) assigned"


class HealthServer:
    def __init__(self, health: Health, host: str, port: int) -> None:
        self.health = health
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:  # a port in use, a host that does not resolve or is not ours: the settings' fault
            await self.stop()
            raise FatalError(self._cannot_listen(exc)) from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def _cannot_listen(self, exc: OSError) -> str:
        where = f"cannot serve /metrics, /healthz and /readyz on {self.host}:{self.port}"
        if isinstance(exc, socket.gaierror):
            return f"{where}: COST_WORKER_METRICS_HOST {self.host!r} does not resolve ({exc.strerror or exc})"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{where}: COST_WORKER_METRICS_HOST {self.host!r} is not an address of this machine"
        if exc.errno == errno.EADDRINUSE:
            return f"{where}: the port is in use: set COST_WORKER_METRICS_PORT to a free port (0 picks one)"
        return f"{where}: {exc.strerror or exc}: check COST_WORKER_METRICS_HOST and COST_WORKER_METRICS_PORT"

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.health.dead:
            return web.Response(status=503, text=f"dead: {self.health.dead}\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, why = self.health.readiness()
        metrics.READY.set(1 if ready else 0)
        return web.Response(status=200 if ready else 503, text=why + "\n")
