"""``cost-worker notify run``: the alerts-topic consumer and the dispatcher in one process.

Shutdown follows the worker's rule: a signal sets an event; the consumer finishes its batch, attempts in
flight get what is left of ``COST_WORKER_SHUTDOWN_GRACE`` and are then cancelled (their leases expire and
they are sent again by the next process: at least once, same ``webhook-id``). A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import structlog

from worker import logs
from worker.app import (
    EXIT_DEADLINE,
    EXIT_FATAL,
    EXIT_OK,
    EXIT_SECOND_SIGNAL,
    exit_after,
    run_loop,
    until_ready,
    watch_database,
)
from worker.config import Settings
from worker.errors import FatalError
from worker.faults import Faults
from worker.http import Health, HealthServer
from worker.migrate import check_current
from worker.notify.consumer import AlertConsumer
from worker.notify.dispatcher import Dispatcher
from worker.notify.sealing import Sealer
from worker.notify.sender import Sender
from worker.notify.store import NotifyStore
from worker.notify.urls import UrlPolicy
from worker.store import Database, connect

log = structlog.get_logger("worker.notify")


class NotifyService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.health = Health(ready_max_retrying=settings.ready_max_retrying)
        self.faults = Faults.from_env()
        self.sealer = Sealer.from_settings(settings)  # fails fast without a key
        self.sender = Sender(settings, UrlPolicy.from_settings(settings))
        self.db: Database | None = None
        self.consumer: AlertConsumer | None = None
        self.dispatcher: Dispatcher | None = None
        self.http: HealthServer | None = None
        self._signals = 0

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(EXIT_SECOND_SIGNAL)
        log.info("shutdown_requested", signal=sig.name)
        self.health.stopping = True
        self.stop.set()

    async def run(self) -> int:
        started = time.monotonic()
        try:
            await self._start()
            return await self._serve()
        finally:
            await self._close()
            log.info("notify_stopped", uptime_seconds=round(time.monotonic() - started, 1))

    async def _start(self) -> None:
        settings = self.settings
        self.http = HealthServer(self.health, settings.metrics_host, settings.metrics_port)
        log.info("http_listening", port=await self.http.start())
        self.db = await until_ready("database", self.stop, self._open_database)
        self.health.database_ok = True
        self.dispatcher = Dispatcher(settings, NotifyStore(self.db), self.sealer, self.sender, faults=self.faults)
        self.consumer = AlertConsumer(settings, self.db, self.health, on_created=self.dispatcher.wake.set)
        await until_ready("kafka", self.stop, self.consumer.start)

    async def _open_database(self) -> Database:
        settings = self.settings
        conn = await connect(settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout)
        try:
            await check_current(conn)
        finally:
            await conn.close()
        return await Database.open(
            settings.dsn(),
            role=settings.database_role,
            min_size=settings.database_pool_min,
            max_size=settings.database_pool_max,
            statement_timeout=settings.database_statement_timeout,
            connect_timeout=settings.database_connect_timeout,
        )

    async def _serve(self) -> int:
        assert self.consumer is not None
        assert self.dispatcher is not None
        tasks = [
            asyncio.create_task(self.consumer.run(self.stop), name="notify-consume"),
            asyncio.create_task(self.dispatcher.run(self.stop), name="notify-dispatch"),
            asyncio.create_task(watch_database(self.db, self.health, self.stop), name="database-check"),
        ]
        stopping = asyncio.create_task(self.stop.wait(), name="stop")
        code = EXIT_OK
        try:
            done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                if not task.cancelled() and task.exception() is not None:
                    error = task.exception()
                    log.error("component_failed", component=task.get_name(), error=f"{type(error).__name__}: {error}")
                    self.health.dead = task.get_name()
                    code = EXIT_FATAL
            self.stop.set()
            self.health.stopping = True
            await self.dispatcher.drain(self.settings.shutdown_grace * 0.75)
            _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace * 0.2)
            for task in pending:
                task.cancel()
            return code
        finally:
            stopping.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, stopping, return_exceptions=True)

    async def _close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self.sender.close()
        if self.db is not None:
            await self.db.close()
        if self.http is not None:
            await self.http.stop()


def run(settings: Settings) -> int:
    """Entry point of ``cost-worker notify run``."""
    logs.configure(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())

    async def main() -> int:
        service = NotifyService(settings)
        service.install_signal_handlers()
        code = EXIT_FATAL
        try:
            code = await service.run()
            return code
        except FatalError as exc:
            log.error("fatal", error=str(exc))
            raise
        finally:
            exit_after(EXIT_DEADLINE, code)

    return run_loop(main())
