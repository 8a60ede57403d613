"""Consumes the alerts topic into delivery rows, with the worker's offset machinery.

Positions live in ``consumer_offsets`` (group ``COST_WORKER_NOTIFY_GROUP_ID``), exactly as for the input
topics: on assignment each partition is sought to its stored offset, and a batch advances the offsets by
compare-and-set (``Tx.advance_offsets``) in the same transaction that inserts its deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from worker import metrics
from worker.config import Settings
from worker.errors import BrokerUnavailable, StaleOffsets, TransientError
from worker.http import Health
from worker.kafka import GroupConsumer
from worker.notify import messages
from worker.notify.store import NewDelivery, destinations_for, insert_deliveries
from worker.retry import sleep_or_stop
from worker.store import Database

log = structlog.get_logger("worker.notify.consumer")

TP = tuple[str, int]
FETCH_MAX_RECORDS = 500  # alert messages per batch (one transaction)
REVOKE_WAIT = 10.0  # seconds a revocation waits for the batch in flight
RETRY_PAUSE_MAX = 30.0  # seconds between attempts of a batch the database keeps failing


class AlertConsumer:
    def __init__(self, settings: Settings, db: Database, health: Health, *, on_created: Callable[[], None]) -> None:
        self.settings = settings.model_copy(update={"kafka_group_id": settings.notify_group_id})
        self.db = db
        self.health = health
        self.on_created = on_created
        self.kafka = GroupConsumer(self.settings, [self.settings.topic_budget_alerts], _Rebalance(self))
        self.assigned: set[TP] = set()
        self.unsynced: set[TP] = set()
        self.positions: dict[TP, int | None] = {}
        self.lock = asyncio.Lock()  # held while a batch is applied or positions are sought
        self.last_record = time.monotonic()

    async def start(self) -> None:
        await self.kafka.start()

    async def stop(self) -> None:
        await self.kafka.stop()

    async def run(self, stop: asyncio.Event) -> None:
        pause = self.settings.retry_initial_backoff
        while not stop.is_set():
            try:
                await self._sync()
                fetched = await self.kafka.fetch(timeout=self.settings.batch_max_wait, max_records=FETCH_MAX_RECORDS)
                live = self.assigned - self.unsynced
                records = [
                    record
                    for tp, batch in fetched.items()
                    if tp in live
                    for record in batch
                    if record.offset >= (self.positions.get(tp) or 0)
                ]
                if records:
                    self.last_record = time.monotonic()
                    await self.apply(records)
                self._update_lag()
                pause = self.settings.retry_initial_backoff
                self.health.retrying_since = None
            except BrokerUnavailable as exc:
                log.warning("notify_fetch_failed", error=str(exc))
                await sleep_or_stop(stop, 1.0)
            except TransientError as exc:
                # The batch rolled back: nothing stored, offsets unchanged; fetch it again after a pause.
                self.health.retrying_since = self.health.retrying_since or time.monotonic()
                log.warning("notify_batch_retry", error=str(exc))
                self.unsynced |= self.assigned
                await sleep_or_stop(stop, pause)
                pause = min(pause * 2, RETRY_PAUSE_MAX)

    async def apply(self, records: list[Any]) -> None:
        """One transaction: the offset compare-and-set and one delivery per (alert, matching destination).

        Delivery guarantee, enforced here: the deliveries of a batch and the offsets that cover it commit
        together, so every alert message becomes its delivery rows exactly once in effect (a redelivered
        message fails the compare-and-set; a duplicate alert hits the (destination, webhook id) key).
        """
        last: dict[TP, int] = {}
        alerts: list[messages.AlertMessage] = []
        invalid = 0
        for record in records:
            tp = (record.topic, record.partition)
            last[tp] = max(record.offset, last.get(tp, -1))
            try:
                alerts.append(messages.parse(record.value))
            except messages.Invalid as exc:
                invalid += 1
                log.warning(
                    "notify_invalid_alert",
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    reason=str(exc),
                )
        async with self.lock:
            if any(tp not in self.assigned or tp in self.unsynced for tp in last):
                return  # revoked or re-sought meanwhile: not ours to store
            moves = [(t, p, self.positions.get((t, p)), offset + 1) for (t, p), offset in last.items()]
            matched: set[str] = set()
            created = 0
            try:
                async with self.db.transaction() as tx:
                    if not await tx.advance_offsets(self.settings.kafka_group_id, moves):
                        raise StaleOffsets()
                    organizations = sorted({a.organization_id for a in alerts})
                    if organizations:
                        await tx.set_tenants(set(organizations))
                        rows = _deliveries(alerts, await destinations_for(tx, organizations))
                        matched = {r.webhook_id for r in rows}
                        if rows:
                            created = await insert_deliveries(tx, rows)
            except StaleOffsets:
                log.warning("notify_batch_fenced", partitions=sorted(f"{t}:{p}" for t, p in last))
                self.unsynced |= set(last)
                return
            now = time.time()
            for (topic, partition), offset in last.items():
                self.positions[(topic, partition)] = offset + 1
                metrics.LAST_COMMIT.labels(topic=topic, partition=str(partition)).set(now)
        metrics.NOTIFY_ALERTS.labels(outcome="invalid").inc(invalid)
        metrics.NOTIFY_ALERTS.labels(outcome="matched").inc(sum(1 for a in alerts if a.webhook_id in matched))
        metrics.NOTIFY_ALERTS.labels(outcome="unmatched").inc(sum(1 for a in alerts if a.webhook_id not in matched))
        metrics.NOTIFY_DELIVERIES_CREATED.inc(created)
        log.info("notify_batch", messages=len(records), alerts=len(alerts), invalid=invalid, deliveries=created)
        if created:
            self.on_created()

    def _update_lag(self) -> None:
        """The worker's lag gauge, for the alerts topic: high watermark minus the stored position."""
        for tp in self.assigned - self.unsynced:
            highwater = self.kafka.highwater(tp)
            if highwater is not None:
                lag = max(0, highwater - (self.positions.get(tp) or 0))
                metrics.CONSUMER_LAG.labels(topic=tp[0], partition=str(tp[1])).set(lag)

    async def _sync(self) -> None:
        pending = sorted(self.unsynced & self.assigned)
        if not pending:
            return
        async with self.lock:
            stored = {
                (o.topic, o.partition): o.next_offset
                for o in await self.db.load_offsets(self.settings.kafka_group_id, pending)
            }
            for tp in pending:
                if tp in self.assigned:
                    await self.kafka.seek(tp, stored.get(tp))
                    self.positions[tp] = stored.get(tp)
                    self.unsynced.discard(tp)
        self.health.database_ok = True


def _deliveries(alerts: list[messages.AlertMessage], destinations: list[Any]) -> list[NewDelivery]:
    by_org: dict[Any, list[tuple[Any, messages.Filter]]] = {}
    for row in destinations:
        wanted = messages.Filter(tuple(row["scopes"]), row["min_threshold"], row["include_resolved"])
        by_org.setdefault(row["organization_id"], []).append((row["id"], wanted))
    return [
        NewDelivery(alert.organization_id, destination, alert.webhook_id, alert.type, alert.payload)
        for alert in alerts
        for destination, wanted in by_org.get(alert.organization_id, [])
        if wanted.wants(alert)
    ]


class _Rebalance:
    def __init__(self, consumer: AlertConsumer) -> None:
        self.consumer = consumer

    async def on_revoked(self, revoked: set[TP]) -> None:
        consumer = self.consumer
        acquired = False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(consumer.lock.acquire(), REVOKE_WAIT)
            acquired = True
        try:
            gone = set(revoked)
            consumer.assigned -= gone
            consumer.unsynced -= gone
            for tp in gone:
                consumer.positions.pop(tp, None)
        finally:
            if acquired:
                consumer.lock.release()

    async def on_assigned(self, assigned: set[TP]) -> None:
        consumer = self.consumer
        new = set(assigned)
        consumer.assigned = set(new)
        consumer.unsynced = set(new)  # always re-read the stored positions (the loop seeks)
        consumer.health.joined_group = True
        consumer.health.assigned = len(new)
        log.info("notify_partitions_assigned", partitions=sorted(f"{t}:{p}" for t, p in new))
