"""Envelopes and their delivery to the provider-bucket topic.

Every message is one whole provider bucket in the documented envelope (``schema/events/provider-envelope``):
``provider``, ``ai_organization_id``, ``api_version``, ``collected_at`` (one per poll), ``bucket`` and, for
OpenAI usage, ``endpoint`` (COORDINATION.md). The key is the provider account, so one account's windows stay
in order on one partition. Numbers pass through exactly: pages are parsed with Decimals and written back
as the same digits.

Delivery guarantee, part two (enforced in ``CollectorPublisher.publish_round``): at least once. Staged rows are
claimed with a row lock, sent by the idempotent producer with ``acks=all``, and deleted in the same transaction
only after the broker acknowledged every one of them; a crash in between sends them again, byte for byte, and
the worker's snapshot rule makes the repeat change nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog

from worker import metrics
from worker.collect.errors import ProviderRejected
from worker.collect.sources import Endpoint
from worker.collect.store import OutboxConnection, StagedRow
from worker.config import Settings
from worker.decode import decode_provider_message
from worker.errors import TransientError
from worker.kafka import Producer
from worker.quarantine import Quarantined, Source

log = structlog.get_logger("worker.collect.publisher")
COLLECTED = Source("collect", 0, 0)  # where a bucket checked before staging "comes from"

PUBLISH_TIMEOUT = 30.0  # seconds to wait for the broker to acknowledge a round
PUBLISH_BATCH = 500  # staged messages per round


def dump_exact(value: Any) -> str:
    """JSON text of parsed JSON whose numbers are Decimals, keeping their digits (``json`` cannot)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump_exact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump_exact(v) for v in value) + "]"
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ProviderRejected("a provider number is not finite")
        return str(value)
    return json.dumps(value)


def envelope(
    endpoint: Endpoint,
    account: str,
    bucket: dict[str, Any],
    collected_at: datetime,
    *,
    max_bytes: int,
    max_results: int | None = None,
) -> tuple[bytes, bytes]:
    """(key, value) of one bucket's message. A bucket too large for one message (bytes, or results: the worker's
    two limits, beyond which it would quarantine the message) is refused, never split."""
    results = len(bucket.get("results") or ())
    if max_results is not None and results > max_results:
        raise ProviderRejected(
            f"{endpoint.report} of account {account}: one bucket has {results} results, more than "
            f"COST_WORKER_MAX_RESULTS_PER_MESSAGE ({max_results}); a bucket is never split, so this window waits"
        )
    body: dict[str, Any] = {
        "provider": endpoint.provider,
        "ai_organization_id": account,
        "api_version": endpoint.api_version,
        "collected_at": collected_at.isoformat(),
    }
    if endpoint.usage_endpoint is not None:
        body["endpoint"] = endpoint.usage_endpoint
    body["bucket"] = bucket
    value = dump_exact(body).encode()
    if len(value) > max_bytes:
        raise ProviderRejected(
            f"{endpoint.report} of account {account}: one bucket is {len(value)} bytes, more than "
            f"COST_WORKER_MAX_MESSAGE_BYTES ({max_bytes}); a bucket is never split, so this window waits"
        )
    # The worker's own decoder, before anything is staged: a bucket it would quarantine (a negative zero, a
    # number beyond its bounds, a field it cannot read) is not published and left behind while the state moves
    # on (quarantined for good, its money never collected once the day left the trailing re-read); its window
    # waits instead, named in the log, until the provider's data or the worker's limits change.
    checked = decode_provider_message(
        value, COLLECTED, max_bytes=max_bytes, max_results=sys.maxsize if max_results is None else max_results
    )
    if isinstance(checked, Quarantined):
        raise ProviderRejected(
            f"{endpoint.report} of account {account}: the worker would quarantine a bucket "
            f"({checked.reason.value}: {checked.detail}), so this window waits"
        )
    return account.encode(), value


class CollectorPublisher:
    def __init__(self, settings: Settings, outbox: OutboxConnection) -> None:
        self.settings = settings
        self.outbox = outbox
        self.wake = asyncio.Event()
        self.producer = Producer(settings)  # acks=all, idempotent unless turned off for the dev broker

    async def start(self) -> None:
        await self.producer.start()

    async def close(self) -> None:
        await self.producer.stop()

    async def publish_round(self) -> int:
        """Send one batch of staged rows; returns how many were acknowledged (0: nothing staged)."""
        return await self.outbox.claim_and_send(PUBLISH_BATCH, self._send)

    async def drain(self) -> None:
        while await self.publish_round():
            pass
        metrics.COLLECT_OUTBOX_BACKLOG.set(await self.outbox.backlog())

    async def _send(self, rows: Sequence[StagedRow]) -> None:
        try:
            deliveries = [await self.producer.send(row.topic, row.message, key=row.key) for row in rows]
            await asyncio.wait_for(asyncio.gather(*deliveries), timeout=PUBLISH_TIMEOUT)
        except (TransientError, TimeoutError) as exc:
            kind = exc.kind if isinstance(exc, TransientError) else type(exc).__name__
            raise TransientError(f"publishing staged buckets failed: {kind}: {exc}") from exc
        for row in rows:
            metrics.COLLECT_BUCKETS.labels(provider=row.provider, report=row.report).inc()
