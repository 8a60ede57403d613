"""The consume loop: Kafka records in batches, one database transaction each, offsets from PostgreSQL.

Positions: PostgreSQL is the source of truth for what was consumed. On assignment the consumer seeks each
partition to the offset stored in ``consumer_offsets`` (from the beginning when there is none); a batch
advances those offsets in its own transaction; Kafka's committed offsets are written only afterwards, for
lag tooling, and never read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from worker import metrics, tracing
from worker.batch import TP, Batch, decode_into, finish_batch
from worker.config import Settings
from worker.errors import BrokerUnavailable, StaleOffsets, TransientError
from worker.faults import NO_FAULTS, FaultPoint, Faults
from worker.http import Health
from worker.kafka import GroupConsumer
from worker.outcome import Outcome
from worker.pipeline import Pipeline
from worker.retry import Backoff, Stopped, retry_transient, sleep_or_stop
from worker.store import Database

log = structlog.get_logger("worker.consumer")

REVOKE_WAIT = 10.0  # seconds a revocation waits for the in-flight batch to commit before letting go
KAFKA_COMMIT_TIMEOUT = 5.0  # seconds; the Kafka commit is informational and must never stall the loop
# Seconds of decoding between two yields to the event loop. Every round trip of the batch in flight waits for the
# slice that is running when its answer arrives: with 250-record slices (~4 ms) each of the transaction's small
# statements took 6-10 ms instead of 1-2 (bench/PROFILE.md). A yield costs a few microseconds.
DECODE_SLICE_SECONDS = 0.0005
GROUP_SETTLE_FACTOR = 1.5  # x session timeout an assignment must have lasted before the worker calls itself idle
FETCH_RETRY_PAUSE = 1.0  # seconds after a failed fetch


class Consumer:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        pipeline: Pipeline,
        health: Health,
        *,
        on_commit: Callable[[Outcome], Awaitable[None]] | None = None,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self.settings = settings
        self.db = db
        self.pipeline = pipeline
        self.health = health
        self.on_commit = on_commit
        self.faults = faults
        self.kafka = GroupConsumer(settings, settings.input_topics, _Rebalance(self))
        self.assigned: set[TP] = set()
        self.positions: dict[TP, int | None] = {}  # next offset stored in the database (None: none yet)
        self.unsynced: set[TP] = set()  # assigned, but not yet sought to the stored position
        # How often each partition was sought to its stored position. A batch remembers the counts from before
        # its fetch: records fetched before a later seek are stale, whatever the partition's state is now.
        self.seeks: dict[TP, int] = {}
        self.batch_lock = asyncio.Lock()  # held while a batch is applied, so revocation can wait for it
        self.sync_lock = asyncio.Lock()  # one position sync at a time (rebalance callback or loop)
        self.last_record = time.monotonic()
        self.assigned_at = time.monotonic()  # the last (re)assignment

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        for topic in self.settings.input_topics:
            # Exported at 0 from the start, so a loss found at the first assignment is a change the alert sees.
            metrics.INPUT_LOST_TO_RETENTION.labels(topic=topic)
        await self.kafka.start()

    async def stop(self) -> None:
        """Leave the group (the coordinator reassigns our partitions right away)."""
        await self.kafka.stop()

    async def run(self, stop: asyncio.Event, *, exit_when_idle: float | None = None) -> None:
        """Consume until ``stop`` is set (or, with ``exit_when_idle``, until caught up and quiet).

        Two batches overlap: while one is written to the database (I/O, on PostgreSQL's core) the next one is
        fetched and decoded (CPU, on ours). Batches are still applied strictly one after the other, in
        offset order, each with the positions its predecessor committed.
        """
        in_flight: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                await self._sync_positions(stop)
                sought = dict(self.seeks)  # before the fetch: a seek during it makes its records stale
                fetch_started = time.perf_counter()
                try:
                    fetched = await self.kafka.fetch(
                        timeout=self.settings.batch_max_wait, max_records=self.settings.batch_max_records
                    )
                except BrokerUnavailable as exc:
                    log.warning("fetch_failed", error=str(exc))
                    await sleep_or_stop(stop, FETCH_RETRY_PAUSE)
                    continue
                live = self._live()
                # Only partitions we own and have sought; never records below the stored position (those are
                # already applied, and taking them would move the stored offset backwards).
                records = [
                    record
                    for tp, batch in fetched.items()
                    if tp in live
                    for record in batch
                    if record.offset >= (self.positions.get(tp) or 0)
                ]
                self._update_lag()
                if not records:
                    if in_flight is not None and in_flight.done():
                        await in_flight  # surfaces its failure, if any
                        in_flight = None
                    if in_flight is None and exit_when_idle is not None and self._idle_for(exit_when_idle):
                        log.info("idle_exit", idle_seconds=exit_when_idle, partitions=len(self.assigned))
                        return
                    continue
                self.last_record = time.monotonic()
                started = time.perf_counter()
                metrics.BATCH_DURATION.labels(stage="fetch").observe(started - fetch_started)
                span = tracing.start_batch()
                decoding = tracing.child(span, "decode")
                batch = Batch()
                pending = iter(records)
                # (not a poll, which ASYNC110 is about: every turn decodes a slice)
                while decode_into(batch, pending, self.settings, until=time.perf_counter() + DECODE_SLICE_SECONDS):  # noqa: ASYNC110
                    # Let the batch in flight take its next step now, not after the whole decode: its
                    # round trips (lookups, the statement itself) then overlap with our CPU work.
                    await asyncio.sleep(0)
                finish_batch(batch)
                decoding.end()
                metrics.BATCH_DURATION.labels(stage="decode").observe(time.perf_counter() - started)
                try:
                    await self.pipeline.prepare(batch)  # overlaps the batch in flight; apply retries it if need be
                except TransientError as exc:
                    log.debug("batch_prepare_deferred", error=str(exc))
                if in_flight is not None:
                    # The next batch is ready; how long it waits here for the one in the database says which
                    # side limits the rate (near zero: this process's CPU; most of a batch: the database).
                    waited = time.perf_counter()
                    await in_flight
                    metrics.BATCH_DURATION.labels(stage="wait").observe(time.perf_counter() - waited)
                in_flight = asyncio.create_task(self._apply(batch, sought, started, span), name="apply-batch")
            if in_flight is not None:
                await in_flight  # a stop request lets the batch in flight finish (the caller bounds how long)
        except BaseException:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()  # rolls its transaction back; the batch is redelivered
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await in_flight
            raise

    # --- one batch ----------------------------------------------------------------------------------

    async def _apply(self, batch: Batch, sought: dict[TP, int], started: float, span: tracing.Span) -> None:
        try:
            await self._apply_retrying(batch, sought, started, span)
        finally:
            span.end()

    async def _apply_retrying(self, batch: Batch, sought: dict[TP, int], started: float, span: tracing.Span) -> None:
        def retried(error: BaseException, attempt: int, _wait: float) -> None:
            if self.health.retrying_since is None:
                self.health.retrying_since = time.monotonic()
            metrics.DATABASE_RETRIES.labels(error=type(error).__name__).inc()
            metrics.BATCHES.labels(result="retried").inc()
            log.warning("batch_retry", attempt=attempt, error=str(error), messages=len(batch))

        # Transient failures retry the whole batch with exponential backoff and jitter, for as long as it
        # takes: skipping would lose data. A shutdown cancels the wait; the batch is then redelivered.
        try:
            outcome = await retry_transient(
                lambda: self._apply_once(batch, sought, started, span),
                Backoff.of(self.settings, jitter=True),
                on_retry=retried,
            )
        except StaleOffsets:
            metrics.BATCHES.labels(result="fenced").inc()
            log.warning("batch_fenced", partitions=sorted(batch.last_offsets))
            self.unsynced.update(tp for tp in batch.last_offsets if tp in self.assigned)
            return
        finally:
            self.health.retrying_since = None
        if outcome is None:
            return
        if self.on_commit is not None:
            await self.on_commit(outcome)

    async def _apply_once(
        self, batch: Batch, sought: dict[TP, int], started: float, span: tracing.Span
    ) -> Outcome | None:
        async with self.batch_lock:
            # Partitions revoked (or re-sought) since the batch was fetched are not ours to write. A re-seek
            # (after a fenced batch, a reassignment) may already be over when this batch's turn comes: its
            # records then lie before or after the new stored position, and writing them with that position
            # as `expected` would move the offset backwards or skip the records in between. So such a
            # partition is dropped from the batch and sought again; its records are read again from there.
            live = self._live()
            stale = {tp for tp in batch.last_offsets if tp in live and self.seeks.get(tp, 0) != sought.get(tp, 0)}
            self.unsynced.update(stale)
            gone = {tp for tp in batch.last_offsets if tp not in live} | stale
            if gone:
                batch = batch.without(gone)
            if not batch.last_offsets:
                return None
            expected = {tp: self.positions.get(tp) for tp in batch.last_offsets}
            db_started = time.perf_counter()
            with tracing.stage(span, "database"):
                outcome = await self.pipeline.apply(batch, expected)
            committed = time.perf_counter()
            # The database transaction committed: data and offsets are durable together.
            now = time.time()
            for (topic, partition), last in batch.last_offsets.items():
                self.positions[(topic, partition)] = last + 1
                metrics.LAST_COMMIT.labels(topic=topic, partition=str(partition)).set(now)
            self.faults.hit(FaultPoint.AFTER_DB_COMMIT)
            with tracing.stage(span, "kafka_commit"):
                await self._commit_kafka(batch)
            done = time.perf_counter()
        metrics.BATCH_DURATION.labels(stage="database").observe(committed - db_started)
        metrics.BATCH_DURATION.labels(stage="kafka_commit").observe(done - committed)
        metrics.BATCH_DURATION.labels(stage="total").observe(done - started)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.BATCHES.labels(result="committed").inc()
        _record(outcome)
        self._update_lag()
        log.info(
            "batch",
            messages=len(batch),
            topics=dict(batch.sizes),
            partitions=sorted(f"{t}:{p}" for t, p in batch.last_offsets),
            outcomes={f"{t}:{o}": n for (t, o), n in sorted(outcome.messages.items())},
            quarantined={f"{t}:{r}": n for (t, r), n in sorted(outcome.quarantined.items())},
            alerts=len(outcome.alerts),
            duration_ms=round((done - started) * 1000, 1),
            database_ms=round((committed - db_started) * 1000, 1),
            **tracing.log_fields(span),
        )
        return outcome

    async def _commit_kafka(self, batch: Batch) -> None:
        """Mirror the stored offsets to Kafka for lag tooling. Best effort: PostgreSQL is the truth."""
        offsets = {tp: last + 1 for tp, last in batch.last_offsets.items()}
        try:
            await self.kafka.commit(offsets, timeout=KAFKA_COMMIT_TIMEOUT)
        except BrokerUnavailable as exc:
            log.debug("kafka_commit_skipped", error=str(exc))

    # --- positions ----------------------------------------------------------------------------------

    def _live(self) -> set[TP]:
        return self.assigned - self.unsynced

    async def _sync_positions(self, stop: asyncio.Event) -> None:
        """Seek partitions that need it to the offsets stored in the database (retrying until it answers)."""

        async def sync() -> None:
            if self.unsynced & self.assigned and not stop.is_set():
                await self.seek_to_stored(sorted(self.unsynced & self.assigned))
                self.health.database_ok = True

        def failed(error: BaseException, _attempt: int, _wait: float) -> None:
            self.health.database_ok = False
            log.warning("position_sync_failed", error=str(error))

        with contextlib.suppress(Stopped):
            await retry_transient(sync, Backoff.of(self.settings), stop=stop, on_retry=failed)

    async def seek_to_stored(self, partitions: list[TP]) -> None:
        # After the batch in flight (if any) committed: it may advance the very positions we are about to read.
        async with self.sync_lock, self.batch_lock:
            partitions = [tp for tp in partitions if tp in self.unsynced and tp in self.assigned]
            if partitions:
                await self._seek_to_stored(partitions)

    async def _seek_to_stored(self, partitions: list[TP]) -> None:
        stored = {
            (o.topic, o.partition): o.next_offset
            for o in await self.db.load_offsets(self.settings.kafka_group_id, partitions)
        }
        await self._check_retention({tp: stored[tp] for tp in partitions if tp in stored and tp in self.assigned})
        for tp in partitions:
            if tp in self.assigned:
                await self.kafka.seek(tp, stored.get(tp))
                self.positions[tp] = stored.get(tp)
                self.seeks[tp] = self.seeks.get(tp, 0) + 1
                self.unsynced.discard(tp)
        log.info("positions_synced", positions={f"{t}:{p}": stored.get((t, p)) for t, p in partitions})

    async def _check_retention(self, stored: dict[TP, int]) -> None:
        """Say so, loudly, when the topic's retention deleted messages this group had not consumed yet (the worker
        was stopped, or stuck, for longer than the topic keeps data). Kafka then resumes at the partition's first
        offset; what lay between is gone and can only be published again by its producer."""
        if not stored:
            return
        first = await self.kafka.beginning_offsets(sorted(stored))
        for tp, lost in lost_to_retention(stored, first).items():
            metrics.INPUT_LOST_TO_RETENTION.labels(topic=tp[0]).inc(lost)
            log.error(
                "input_lost_to_retention",
                topic=tp[0],
                partition=tp[1],
                stored_offset=stored[tp],
                first_offset=first[tp],
                lost_messages=lost,
            )

    # --- lag and idleness ---------------------------------------------------------------------------

    def _lag(self, tp: TP) -> int | None:
        """High watermark from fetch responses minus the stored position (ListOffsets is not trusted)."""
        if tp in self.unsynced:
            return None
        highwater = self.kafka.highwater(tp)
        if highwater is None:
            return None
        return max(0, highwater - (self.positions.get(tp) or 0))

    def _update_lag(self) -> None:
        for tp in self.assigned:
            lag = self._lag(tp)
            if lag is not None:
                metrics.CONSUMER_LAG.labels(topic=tp[0], partition=str(tp[1])).set(lag)

    def caught_up(self) -> bool:
        return self.health.joined_group and all(self._lag(tp) == 0 for tp in self.assigned)

    def _idle_for(self, seconds: float) -> bool:
        """Caught up, nothing new for ``seconds``, and the group settled: members that died without leaving
        hold their partitions until the coordinator expires them (one session timeout), so an assignment
        younger than that may not be the final one."""
        now = time.monotonic()
        settled = now - self.assigned_at >= self.settings.kafka_session_timeout * GROUP_SETTLE_FACTOR
        return settled and self.caught_up() and now - self.last_record >= seconds

    def forget(self, partitions: set[TP]) -> None:
        for topic, partition in partitions:
            self.positions.pop((topic, partition), None)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(topic, str(partition))
            with contextlib.suppress(KeyError):
                metrics.LAST_COMMIT.remove(topic, str(partition))


class _Rebalance:
    """Stop work on revoked partitions; start assigned ones from the offsets stored in the database."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer

    async def on_revoked(self, revoked: set[TP]) -> None:
        consumer = self.consumer
        metrics.REBALANCES.labels(event="revoked").inc()
        # Let the in-flight batch commit first (its offsets then tell the next owner where to start).
        # If it takes too long we let go anyway: the offset compare-and-set stops it from landing late.
        acquired = False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(consumer.batch_lock.acquire(), REVOKE_WAIT)
            acquired = True
        try:
            gone = set(revoked)
            consumer.assigned -= gone
            consumer.unsynced -= gone
            consumer.forget(gone)
            metrics.ASSIGNED_PARTITIONS.set(len(consumer.assigned))
            consumer.health.assigned = len(consumer.assigned)
        finally:
            if acquired:
                consumer.batch_lock.release()
        log.info("partitions_revoked", partitions=sorted(f"{t}:{p}" for t, p in revoked))

    async def on_assigned(self, assigned: set[TP]) -> None:
        consumer = self.consumer
        metrics.REBALANCES.labels(event="assigned").inc()
        new = set(assigned)
        consumer.assigned = set(new)
        # Another member may have moved these partitions on: always re-read the stored positions.
        consumer.unsynced = set(new)
        consumer.health.joined_group = True
        consumer.health.assigned = len(new)
        consumer.assigned_at = time.monotonic()
        now = time.time()
        for topic, partition in new:  # "no commit since" counts from the assignment, not from the epoch
            metrics.LAST_COMMIT.labels(topic=topic, partition=str(partition)).set(now)
        metrics.ASSIGNED_PARTITIONS.set(len(new))
        log.info("partitions_assigned", partitions=sorted(f"{t}:{p}" for t, p in new))
        try:
            await consumer.seek_to_stored(sorted(new))
        except TransientError as exc:  # the loop retries until the database answers
            log.warning("position_sync_deferred", error=str(exc))


def _record(outcome: Outcome) -> None:
    for (topic, result), count in outcome.messages.items():
        metrics.MESSAGES.labels(topic=topic, outcome=result).inc(count)
    for (topic, reason), count in outcome.quarantined.items():
        metrics.QUARANTINED.labels(topic=topic, reason=reason).inc(count)
    for (api_version, result), count in outcome.ledger_lines.items():
        metrics.LEDGER_LINES.labels(api_version=api_version, outcome=result).inc(count)
    for provider, count in outcome.unpriced.items():
        metrics.UNPRICED_LINES.labels(provider=provider).inc(count)
    if outcome.unknown_models:
        metrics.UNKNOWN_MODEL_EVENTS.inc(outcome.unknown_models)
    if outcome.catalogue_estimates:
        metrics.CATALOGUE_ESTIMATES.inc(outcome.catalogue_estimates)


def lost_to_retention(stored: dict[TP, int], first: dict[TP, int]) -> dict[TP, int]:
    """Per partition, how many offsets below its first one the stored position is (only those it is below)."""
    return {tp: first[tp] - position for tp, position in stored.items() if tp in first and first[tp] > position}
