"""The outbox publisher: drains rows written by batch transactions (alerts, dead letters) to Kafka.

Delivery guarantee, enforced in ``publish_round``: at least once. Rows are claimed with a row lock, sent,
and deleted in the same transaction only after the broker acknowledged them; a crash in between leaves them
in the table and they are sent again. Keys are stable (budget id for alerts, source coordinates for dead
letters, and every alert carries a stable alert id), so consumers can dedupe the rare repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import structlog
from aiokafka.errors import KafkaError

from worker import kafka, metrics
from worker.config import Settings
from worker.errors import TransientError
from worker.faults import NO_FAULTS, Faults
from worker.store import Database

log = structlog.get_logger("worker.outbox")

PUBLISH_TIMEOUT = 30.0  # seconds to wait for the broker to acknowledge a round


class OutboxPublisher:
    def __init__(self, settings: Settings, db: Database, *, faults: Faults = NO_FAULTS) -> None:
        self.settings = settings
        self.db = db
        self.faults = faults
        self.wake = asyncio.Event()
        self.producer: Any = None

    async def _producer(self) -> Any:
        if self.producer is None:
            producer = kafka.producer(self.settings)
            try:
                await producer.start()
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise TransientError(f"cannot start the Kafka producer: {exc}") from exc
            self.producer = producer
        return self.producer

    async def close(self) -> None:
        if self.producer is not None:
            with contextlib.suppress(KafkaError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.producer.stop(), timeout=10)
            self.producer = None

    async def run(self, stop: asyncio.Event) -> None:
        """Publish whenever a batch wrote outbox rows (``wake``) or every poll interval."""
        delay = self.settings.retry_initial_backoff
        while not stop.is_set():
            try:
                while await self.publish_round():
                    pass
                await self.update_gauges()
                delay = self.settings.retry_initial_backoff
            except TransientError as exc:
                metrics.OUTBOX_FAILURES.labels(error=type(exc).__name__).inc()
                log.warning("outbox_publish_failed", error=str(exc))
                await _wait(stop, delay)
                delay = min(delay * 2, self.settings.retry_max_backoff)
                continue
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_first(stop, self.wake), timeout=self.settings.outbox_poll_interval)

    async def flush(self, deadline: float) -> bool:
        """Publish until the outbox is empty or the deadline (loop time) passes. True when empty."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            try:
                if not await asyncio.wait_for(self.publish_round(), timeout=max(0.1, deadline - loop.time())):
                    return True
            except (TimeoutError, TransientError) as exc:
                log.warning("outbox_flush_incomplete", error=str(exc))
                return False
        return False

    async def publish_round(self) -> int:
        """Publish one claimed round of rows; returns how many rows were claimed (0: outbox empty)."""
        producer = await self._producer()
        async with self.db.transaction() as tx:
            rows = await tx.outbox_claim(self.settings.outbox_batch)
            if not rows:
                return 0
            self.faults.hit("before_outbox_publish")
            sent = []
            for row in rows:
                headers = [(name, str(value).encode()) for name, value in _headers(row["headers"]).items()]
                try:
                    future = await producer.send(row["topic"], value=row["value"], key=row["key"], headers=headers)
                except KafkaError as exc:
                    future = _failed(exc)
                sent.append((row, future))
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(f for _, f in sent), return_exceptions=True), timeout=PUBLISH_TIMEOUT
                )
            except TimeoutError as exc:
                raise TransientError("the broker did not acknowledge the outbox round in time") from exc
            done = [
                row["id"] for (row, _), result in zip(sent, results, strict=True) if not isinstance(result, Exception)
            ]
            failed = [
                (row, result) for (row, _), result in zip(sent, results, strict=True) if isinstance(result, Exception)
            ]
            if done:
                await tx.outbox_delete(done)
            for row, error in failed:
                await tx.outbox_failed([row["id"]], f"{type(error).__name__}: {error}")
                metrics.OUTBOX_FAILURES.labels(error=type(error).__name__).inc()
            for (row, _), result in zip(sent, results, strict=True):
                if not isinstance(result, Exception):
                    metrics.OUTBOX_PUBLISHED.labels(topic=row["topic"]).inc()
        if failed and not done:
            raise TransientError(f"every outbox message of the round failed, e.g. {failed[0][1]}")
        return len(rows)

    async def update_gauges(self) -> None:
        backlog, oldest = await self.db.outbox_stats()
        metrics.OUTBOX_BACKLOG.set(backlog)
        metrics.OUTBOX_OLDEST_AGE.set(oldest)


def _headers(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else {}
    return dict(value or {})


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
