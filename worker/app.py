"""The running worker: wires the components together and owns startup and shutdown.

Shutdown (SIGTERM or SIGINT): the signal handler only sets an event. The consumer stops fetching and
finishes its in-flight batch; if that takes longer than ``shutdown_grace`` the batch is cancelled, its
transaction rolls back and Kafka redelivers it to the next owner. Then the outbox is flushed within what is
left of the grace period, the consumer leaves the group, and the process exits 0. A second signal exits at
once.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

from worker import logs, metrics, retention, tracing
from worker.alerts import Alert, Resolution
from worker.breaker import CircuitBreaker
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.consumer import Consumer
from worker.errors import CostWorkerError, FatalError, TransientError
from worker.faults import Faults
from worker.http import Health, HealthServer
from worker.migrate import check_current
from worker.outbox import OutboxPublisher
from worker.outcome import Outcome
from worker.pipeline import Pipeline
from worker.retry import Backoff, Stopped, retry_transient, sleep_or_stop
from worker.store import Database, connect

log = structlog.get_logger("worker.app")
T = TypeVar("T")

# The cyclic garbage collector, tuned for a process that keeps one or two batches of thousands of rows alive:
# with Python's default (700, 10, 10) it collected the young generation every 700 net allocations (a few events)
# and kept re-walking the older ones, which hold the batches in flight and everything loaded at start-up. Almost
# everything the worker allocates is freed by reference counting anyway. Start-up objects are frozen out of the
# collector (``gc.freeze``) and the young generation is collected every 10,000 net allocations: in the benchmark's
# drains (bench/PROFILE.md) worker CPU per event fell by ~15 % and per ledger line by ~20 %, for ~45 MB more
# peak RSS (the young garbage waits longer). Larger thresholds saved little more and cost more memory.
GC_THRESHOLDS = (10_000, 10, 10)  # net allocations before a young collection; young, middle collections per next

DATABASE_CHECK_INTERVAL = 5.0  # seconds between readiness pings of the database
STARTUP_RETRY_FIRST = 0.5  # seconds before the second attempt to reach the database or broker at startup
STARTUP_RETRY_MAX = 30.0  # seconds between attempts to reach the database or broker at startup
STARTUP_BACKOFF = Backoff(STARTUP_RETRY_FIRST, STARTUP_RETRY_MAX)
EXIT_OK, EXIT_FATAL, EXIT_SECOND_SIGNAL = 0, 1, 130
TASK_STOP_TIMEOUT = 5.0  # seconds background tasks get to finish after being cancelled
EXIT_DEADLINE = 15.0  # seconds from the end of the drain to process exit, whatever still runs


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.health = Health(ready_max_retrying=settings.ready_max_retrying)
        self.faults = Faults.from_env()
        self.db: Database | None = None
        self.http: HealthServer | None = None
        self.consumer: Consumer | None = None
        self.publisher: OutboxPublisher | None = None
        self.budgets = BudgetEngine(settings)
        self._signals = 0
        self._deadline: float | None = None  # loop time by which a shutdown must be over

    # --- signals ------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second_signal_exit", signal=sig.name)
            os._exit(EXIT_SECOND_SIGNAL)
        log.info("shutdown_requested", signal=sig.name, grace_seconds=self.settings.shutdown_grace)
        self.health.stopping = True
        self.stop.set()

    # --- main ---------------------------------------------------------------------------------------

    async def run(self, *, exit_when_idle: float | None = None) -> int:
        started = time.monotonic()
        try:
            await self._start()
            return await self._serve(exit_when_idle)
        finally:
            await self._close()
            log.info("stopped", uptime_seconds=round(time.monotonic() - started, 1))

    async def _start(self) -> None:
        settings = self.settings
        self.http = HealthServer(self.health, settings.metrics_host, settings.metrics_port)
        port = await self.http.start()
        log.info("http_listening", port=port)
        self.db = await until_ready("database", self.stop, self._open_database)
        self.health.database_ok = True
        self.publisher = OutboxPublisher(settings, self.db, faults=self.faults)
        breaker = CircuitBreaker(
            window=settings.breaker_window,
            min_messages=settings.breaker_min_messages,
            invalid_ratio=settings.breaker_invalid_ratio,
        )
        pipeline = Pipeline(self.db, settings, budgets=self.budgets, breaker=breaker, faults=self.faults)
        self.consumer = Consumer(
            settings, self.db, pipeline, self.health, on_commit=self._committed, faults=self.faults
        )
        consumer = self.consumer
        await until_ready("kafka", self.stop, consumer.start)

    async def _open_database(self) -> Database:
        settings = self.settings
        conn = await connect(settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout)
        try:
            ahead = await check_current(conn)
        finally:
            await conn.close()
        if ahead:
            # The compatibility window: a newer release migrated (expand only); this older code still fits.
            log.warning("schema_ahead_of_code", expand_migrations=ahead)
        return await Database.open(
            settings.dsn(),
            role=settings.database_role,
            min_size=settings.database_pool_min,
            max_size=settings.database_pool_max,
            statement_timeout=settings.database_statement_timeout,
            connect_timeout=settings.database_connect_timeout,
        )

    async def _serve(self, exit_when_idle: float | None) -> int:
        assert self.consumer is not None
        assert self.publisher is not None
        assert self.db is not None
        consume = asyncio.create_task(self.consumer.run(self.stop, exit_when_idle=exit_when_idle), name="consume")
        background = [
            asyncio.create_task(self.publisher.run(self.stop), name="outbox"),
            asyncio.create_task(self.budgets.run_sweeps(self.db, self.stop, on_alerts=self._alerts), name="sweep"),
            asyncio.create_task(watch_database(self.db, self.health, self.stop), name="database-check"),
            asyncio.create_task(retention.run_periodically(self.settings, self.stop), name="retention"),
        ]
        stopping = asyncio.create_task(self.stop.wait(), name="stop")
        code = EXIT_OK
        try:
            done, _ = await asyncio.wait([consume, stopping, *background], return_when=asyncio.FIRST_COMPLETED)
            if consume in done:
                code = self._outcome(consume)
            elif not self.stop.is_set():  # a background task died: that is a bug or a fatal error
                for task in done:
                    code = self._outcome(task) or EXIT_FATAL
                    self.health.dead = task.get_name()
            self.stop.set()
            self.health.stopping = True
            self._deadline = asyncio.get_running_loop().time() + self.settings.shutdown_grace
            if not consume.done():
                # Finish the in-flight batch within the grace period; past it, cancel (the transaction rolls
                # back and the batch is redelivered).
                try:
                    await asyncio.wait_for(asyncio.shield(consume), timeout=self.settings.shutdown_grace * 0.75)
                except TimeoutError:
                    metrics.BATCHES.labels(result="abandoned").inc()
                    log.warning("in_flight_batch_abandoned", grace_seconds=self.settings.shutdown_grace)
                    consume.cancel()
                    # Its rollback needs the database too: on a connection that stopped answering, the driver
                    # waits for the command timeout, far past the grace. Do not wait for it: closing the pool
                    # below ends it (and the server rolls back when the connection closes).
                    await asyncio.wait({consume}, timeout=self.settings.shutdown_grace * 0.05)
                except CostWorkerError:
                    code = self._outcome(consume)
            loop = asyncio.get_running_loop()
            flushed = await self.publisher.flush(loop.time() + self.settings.shutdown_grace * 0.2)
            log.info("outbox_flushed" if flushed else "outbox_left_for_next_start")
            return code
        finally:
            for task in (*background, stopping):
                task.cancel()
            _, stuck = await asyncio.wait([*background, stopping], timeout=TASK_STOP_TIMEOUT)
            if stuck:
                log.warning("tasks_did_not_stop", tasks=sorted(t.get_name() for t in stuck))

    def _outcome(self, task: asyncio.Task[Any]) -> int:
        if task.cancelled():
            return EXIT_OK
        error = task.exception()
        if error is None:
            return EXIT_OK
        if isinstance(error, FatalError):
            log.error("fatal", error=str(error))
            raise error
        log.error("component_failed", component=task.get_name(), error=f"{type(error).__name__}: {error}")
        raise error

    async def _committed(self, outcome: Outcome) -> None:
        if outcome.outbox_rows and self.publisher is not None:
            self.publisher.wake.set()

    async def _alerts(self, alerts: list[Alert | Resolution]) -> None:
        if self.publisher is not None:
            self.publisher.wake.set()

    async def _close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.publisher is not None:
            await self.publisher.close()
        if self.db is not None:
            # Within what is left of the grace (a connection stuck on an abandoned batch is then terminated).
            left = None if self._deadline is None else self._deadline - asyncio.get_running_loop().time()
            await self.db.close() if left is None else await self.db.close(timeout=max(0.5, left))
        if self.http is not None:
            await self.http.stop()


async def watch_database(db: Database | None, health: Health, stop: asyncio.Event) -> None:
    """Readiness follows the database: ping it every ``DATABASE_CHECK_INTERVAL`` until ``stop``; one warning when
    it becomes unreachable, ``/readyz`` not ready while it stays so."""
    assert db is not None
    while not stop.is_set():
        try:
            await db.ping()
            health.database_ok = True
        except TransientError as exc:
            if health.database_ok:
                log.warning("database_unreachable", error=str(exc))
            health.database_ok = False
        await sleep_or_stop(stop, DATABASE_CHECK_INTERVAL)


async def until_ready(
    what: str,
    stop: asyncio.Event,
    attempt: Callable[[], Awaitable[T]],
    *,
    give_up_after: float | None = None,
    limit_name: str = "",
) -> T:
    """Retry a startup step while its service is unreachable (not while it is misconfigured: the store and the
    Kafka boundary raise ``TransientError`` only for the former). With ``give_up_after``, a ``FatalError`` naming
    ``limit_name`` once the next try would come later than that many seconds after the first (a one-off command
    must not hang)."""
    began = time.monotonic()

    def waiting(error: BaseException, _attempt: int, wait: float) -> None:
        if give_up_after is not None and time.monotonic() - began + wait > give_up_after:
            raise FatalError(
                f"{what} unreachable for {time.monotonic() - began:.0f}s, gave up ({limit_name} is "
                f"{give_up_after:g}s): {error}"
            )
        log.warning("waiting_for", service=what, error=str(error), retry_in=wait)
        if stop.is_set():
            raise FatalError(f"stopped while waiting for the {what}")

    try:
        return await retry_transient(attempt, STARTUP_BACKOFF, stop=stop, on_retry=waiting)
    except Stopped:
        raise FatalError(f"stopped while waiting for the {what}") from None


def exit_after(seconds: float, code: int) -> None:
    """The hard deadline: if the interpreter has not exited ``seconds`` after shutdown began (a library task
    that ignores cancellation, a connection that never closes), leave anyway with ``code``."""

    def watchdog() -> None:
        time.sleep(seconds)
        print(f"cost-worker: shutdown exceeded its {seconds:.0f}s deadline; exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)

    threading.Thread(target=watchdog, name="exit-deadline", daemon=True).start()


def tune_gc() -> None:
    """For the worker process: what its imports loaded is never garbage, so the collector stops walking it
    (``gc.freeze``), and collections become rare (``GC_THRESHOLDS``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(settings: Settings, *, exit_when_idle: float | None = None) -> int:
    """Entry point of ``cost-worker run``."""
    logs.configure(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    provider = tracing.configure()  # None unless OTEL_EXPORTER_OTLP_ENDPOINT is set
    if provider is not None:
        tracing.instrument_drivers(provider)
        log.info("tracing_on", endpoint=os.environ.get(tracing.ENDPOINT_ENV))
    tune_gc()

    async def main() -> int:
        worker = Worker(settings)
        worker.install_signal_handlers()
        code = EXIT_FATAL
        try:
            code = await worker.run(exit_when_idle=exit_when_idle)
            return code
        finally:
            exit_after(EXIT_DEADLINE, code)
            tracing.shutdown(provider)

    return run_loop(main())


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it exists (its transports make asyncpg's and aiokafka's I/O cheaper: ~10 % more
    events per second here), else on the standard event loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional at import time: not on Windows
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
