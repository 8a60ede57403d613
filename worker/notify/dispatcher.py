"""The dispatcher: claims due deliveries and sends them, each destination on its own.

Delivery guarantee, enforced here and in ``notify_claim``: at least once on the wire, once in effect.
A delivery is claimed with a lease before it is sent and marked delivered only after the receiver's 2xx;
a crash anywhere in between leaves it pending, and it is sent again when the lease ends, with the same
``webhook-id`` (receivers dedupe on it). Its row is one row whatever happens, so it is recorded once.

Isolation: each destination's claimed deliveries run in their own task, and a destination that is still
busy is left out of the next claim; so a slow or dead receiver (bounded by the attempt timeout) holds
only its own deliveries, never the others'. A failure backs off the whole destination (exponential, with
jitter, up to the maximum age, then ``failed``); 410 Gone disables it. A destination whose sealed URL or
secret does not open with the configured key is a configuration error, not the alert's: its deliveries
stay pending and are retried the same way (at most ``KEY_RETRY_MAX`` apart) until the key is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from datetime import UTC, datetime
from uuid import UUID

import structlog

from worker import metrics
from worker.config import Settings, env_name
from worker.errors import TransientError
from worker.faults import NO_FAULTS, FaultPoint, Faults
from worker.notify.backoff import Backoff
from worker.notify.sealing import SealBroken, Sealer
from worker.notify.sender import ERROR_EXCERPT_CHARS, Attempt, Sender
from worker.notify.store import Claimed, NotifyStore

log = structlog.get_logger("worker.notify.dispatcher")

LEASE_MARGIN = 2.0  # seconds a claim outlives the attempt timeout (twice over: the send, then the record)
STATS_INTERVAL = 5.0  # seconds between backlog/oldest-age refreshes
ERROR_PAUSE = 1.0  # seconds to wait after the database failed a claim
KEY_RETRY_MAX = 60.0  # seconds at most between attempts of a delivery the secrets key does not open
KEY_MISMATCH_ERROR = (
    f"{env_name('notify_secrets_key')} does not open this destination's sealed URL or secret (wrong key?)"
)


class Dispatcher:
    def __init__(
        self, settings: Settings, store: NotifyStore, sealer: Sealer, sender: Sender, *, faults: Faults = NO_FAULTS
    ) -> None:
        self.settings = settings
        self.store = store
        self.sealer = sealer
        self.sender = sender
        self.faults = faults
        self.backoff = Backoff(settings.notify_backoff_initial, settings.notify_backoff_max, settings.notify_max_age)
        self.key_backoff = Backoff(
            min(settings.notify_backoff_initial, KEY_RETRY_MAX),
            min(settings.notify_backoff_max, KEY_RETRY_MAX),
            settings.notify_max_age,
        )
        self.lease = settings.notify_timeout * 2 + LEASE_MARGIN
        self.wake = asyncio.Event()
        self.busy: dict[UUID, asyncio.Task[None]] = {}
        self.in_flight = 0
        self._stats_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and send until ``stop``; attempts in flight are left to ``drain`` (the caller's grace)."""
        try:
            while not stop.is_set():
                self.wake.clear()  # before the claim: a wake-up during it is not lost
                claimed = await self.round()
                await self._stats()
                if claimed == 0:
                    await self._wait(stop)
        except asyncio.CancelledError:
            await self.drain(0.0)
            raise

    async def round(self) -> int:
        """Claim what is due for destinations not busy here, and start their tasks. Returns the count."""
        free = self.settings.notify_max_in_flight - self.in_flight
        if free <= 0:
            return 0
        try:
            claimed = await self.store.claim(list(self.busy), self.settings.notify_per_destination, free, self.lease)
        except TransientError as exc:
            log.warning("notify_claim_failed", error=str(exc))
            await asyncio.sleep(ERROR_PAUSE)
            return 0
        groups: dict[UUID, list[Claimed]] = defaultdict(list)
        for item in claimed:
            groups[item.destination_id].append(item)
        for destination, items in groups.items():
            self.in_flight += len(items)
            task = asyncio.create_task(self._destination(destination, items), name=f"notify-{destination}")
            self.busy[destination] = task
        return len(claimed)

    def _done(self, destination: UUID, count: int) -> None:
        self.busy.pop(destination, None)
        self.in_flight -= count
        self.wake.set()  # the destination may have more due: claim again now

    async def _wait(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.settings.notify_poll_interval, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def drain(self, timeout: float) -> None:
        """Let attempts in flight finish for ``timeout`` seconds, then cancel them (their leases expire and
        the deliveries are sent again later: at least once)."""
        tasks = list(self.busy.values())
        if not tasks:
            return
        if timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at < STATS_INTERVAL:
            return
        self._stats_at = now
        with contextlib.suppress(TransientError):
            backlog, oldest = await self.store.stats()
            metrics.NOTIFY_BACKLOG.set(backlog)
            metrics.NOTIFY_OLDEST_PENDING_AGE.set(oldest)

    # --- one destination ------------------------------------------------------------------------------

    async def _destination(self, destination: UUID, items: list[Claimed]) -> None:
        try:
            results = await asyncio.gather(*(self._deliver(item) for item in items), return_exceptions=True)
            for item, result in zip(items, results, strict=True):
                if isinstance(result, Exception):  # a bug: logged; the lease expires and the delivery is retried
                    log.error("notify_attempt_crashed", delivery=item.id, error=f"{type(result).__name__}: {result}")
        finally:
            self._done(destination, len(items))

    async def _deliver(self, item: Claimed) -> None:
        try:
            url = self.sealer.open(item.url_sealed, item.destination_id)
            secret = self.sealer.open(item.secret_sealed, item.destination_id) if item.secret_sealed else None
            previous = (
                self.sealer.open(item.previous_secret_sealed, item.destination_id)
                if item.previous_secret_sealed
                else None
            )
        except SealBroken as exc:
            # The configured key is wrong (or was rotated without the previous one and `notify reseal`): the
            # operator's to fix, not a property of the alert. The delivery stays pending and is tried again (at
            # most KEY_RETRY_MAX apart, so it goes out soon after a restart with the right key) until its maximum
            # age.
            log.error(
                "notify_secrets_key_mismatch",
                delivery=item.id,
                destination=str(item.destination_id),
                error=str(exc),
            )
            await self._record(item, "key_mismatch", Attempt(None, 0.0, KEY_MISMATCH_ERROR))
            return
        attempt = await self.sender.send(
            item.kind, url, secret, item.webhook_id, item.payload, previous_secret=previous
        )
        metrics.NOTIFY_ATTEMPT_DURATION.labels(kind=item.kind).observe(attempt.seconds)
        # Sent; not yet recorded. A crash here resends the delivery after its lease, same webhook-id.
        self.faults.hit(FaultPoint.NOTIFY_AFTER_SEND)
        if attempt.ok:
            outcome = "delivered"
        elif attempt.gone:
            outcome = "disabled"
        elif attempt.refused:
            outcome = "refused"
        else:
            outcome = "retried"
        await self._record(item, outcome, attempt)

    async def _record(self, item: Claimed, outcome: str, attempt: Attempt) -> None:
        try:
            if outcome == "delivered":
                assert attempt.status is not None
                recorded = await self.store.delivered(item, attempt.status)
                if recorded:
                    latency = (datetime.now(UTC) - item.created_at).total_seconds()
                    metrics.NOTIFY_DELIVERY_LATENCY.labels(kind=item.kind).observe(max(latency, 0.0))
            elif outcome == "disabled":
                await self.store.disable(item, f"410 Gone at {datetime.now(UTC).isoformat(timespec='seconds')}")
                recorded = True
            elif outcome == "refused":
                recorded = await self.store.failed(item, attempt.status, attempt.error)
            else:
                backoff = self.key_backoff if outcome == "key_mismatch" else self.backoff
                at = backoff.next_attempt(
                    item.attempts, item.created_at, datetime.now(UTC), not_before=attempt.retry_after
                )
                if at is None:
                    outcome = "failed"
                    error = f"gave up: {attempt.error}"[:ERROR_EXCERPT_CHARS]
                    recorded = await self.store.failed(item, attempt.status, error)
                else:
                    recorded = await self.store.retry(item, at, attempt.status, attempt.error, destination_backoff=True)
        except TransientError as exc:
            # Not recorded: the lease runs out and the delivery is attempted again (same webhook-id).
            log.warning("notify_record_failed", delivery=item.id, error=str(exc))
            return
        if not recorded:
            outcome = "fenced"  # the lease had expired and another attempt took over
        metrics.NOTIFY_ATTEMPTS.labels(kind=item.kind, outcome=outcome).inc()
        log.info(
            "notify_attempt",
            delivery=item.id,
            destination=str(item.destination_id),
            webhook_id=item.webhook_id,
            attempt=item.attempts,
            outcome=outcome,
            status=attempt.status,
            error=attempt.error or None,
            duration_ms=round(attempt.seconds * 1000, 1),
        )
