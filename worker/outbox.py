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

from worker import metrics
from worker.config import Settings
from worker.errors import TransientError
from worker.faults import NO_FAULTS, FaultPoint, Faults
from worker.kafka import Producer
from worker.retry import Backoff, Stopped, retry_transient
from worker.store import Database

log = structlog.get_logger("worker.outbox")

PUBLISH_TIMEOUT = 30.0  # seconds to wait for the broker to acknowledge a round


class OutboxPublisher:
    def __init__(self, settings: Settings, db: Database, *, faults: Faults = NO_FAULTS) -> None:
        self.settings = settings
        self.db = db
        self.faults = faults
        self.wake = asyncio.Event()
        self.producer = Producer(settings)

    async def close(self) -> None:
        await self.producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish whenever a batch wrote outbox rows (``wake``) or every poll interval."""

        async def drain() -> None:
            while await self.publish_round():
                pass
            await self.update_gauges()

        def failed(error: BaseException, _attempt: int, _wait: float) -> None:
            metrics.OUTBOX_FAILURES.labels(error=type(error).__name__).inc()
            log.warning("outbox_publish_failed", error=str(error))

        while not stop.is_set():
            try:
                await retry_transient(drain, Backoff.of(self.settings), stop=stop, on_retry=failed)
            except Stopped:
                return
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
        await self.producer.start()
        async with self.db.transaction() as tx:
            rows = await tx.outbox_claim(self.settings.outbox_batch)
            if not rows:
                return 0
            self.faults.hit(FaultPoint.BEFORE_OUTBOX_PUBLISH)
            sent = []
            for row in rows:
                headers = [(name, str(value).encode()) for name, value in _headers(row["headers"]).items()]
                delivery = await self.producer.send(row["topic"], row["value"], key=row["key"], headers=headers)
                sent.append((row, delivery))
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
                kind = error.kind if isinstance(error, TransientError) else type(error).__name__
                await tx.outbox_failed([row["id"]], f"{kind}: {error}")
                metrics.OUTBOX_FAILURES.labels(error=kind).inc()
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


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
