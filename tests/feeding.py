"""Driving the pipeline directly with in-memory records, as a consumer would (no broker)."""

from __future__ import annotations

from typing import Any

from tests.factories import FakeRecord, dumps
from worker.batch import Batch, decode_batch
from worker.config import Settings
from worker.pipeline import Pipeline


class Feeder:
    """Numbers records per partition and applies them as batches, tracking expected offsets like a consumer."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.next: dict[tuple[str, int], int] = {}
        self.stored: dict[tuple[str, int], int | None] = {}

    def record(self, topic: str, value: bytes, partition: int = 0) -> FakeRecord:
        offset = self.next.get((topic, partition), 0)
        self.next[(topic, partition)] = offset + 1
        return FakeRecord(topic, partition, offset, value)

    async def apply(self, records: list[FakeRecord]) -> Any:
        batch = decode_batch(records, self.settings)
        outcome = await self.pipeline.apply(batch, dict(self.stored))
        for tp, last in batch.last_offsets.items():
            self.stored[tp] = last + 1
        return outcome

    async def apply_prepared(self, batch: Batch) -> Any:
        """Apply a batch decoded (and perhaps prepared: ``Pipeline.prepare``) earlier, as the consumer does with the
        batch it prepared while the one before it was in the database."""
        outcome = await self.pipeline.apply(batch, dict(self.stored))
        for tp, last in batch.last_offsets.items():
            self.stored[tp] = last + 1
        return outcome

    async def events(self, *payloads: dict[str, Any], partition: int = 0) -> Any:
        return await self.apply([self.record(self.settings.topic_api_usage, dumps(p), partition) for p in payloads])

    async def buckets(self, *payloads: dict[str, Any] | bytes, partition: int = 0) -> Any:
        return await self.apply(
            [
                self.record(self.settings.topic_provider_buckets, p if isinstance(p, bytes) else dumps(p), partition)
                for p in payloads
            ]
        )
