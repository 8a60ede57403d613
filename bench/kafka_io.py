"""Topics, fast backlog production, and the consume-only ceiling (aiokafka, as the worker uses it)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from worker.config import MAX_MESSAGE_BYTES

PRODUCE_WINDOW = 20_000  # sends in flight before waiting for their acknowledgements
FETCH_BYTES = max(1_048_576, MAX_MESSAGE_BYTES + 65_536)  # the worker's max_partition_fetch_bytes


@dataclass
class Produced:
    topic: str
    count: int
    seconds: float
    next_offsets: dict[int, int] = field(default_factory=dict)  # partition -> last offset + 1

    @property
    def end(self) -> int:
        """Sum of the partitions' next offsets: what consumer_offsets sums to once everything is stored."""
        return sum(self.next_offsets.values())

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(name, partitions, 1) for name, partitions in topics.items() if name not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()


def producer(bootstrap: str, *, linger_ms: int = 5, batch_bytes: int = 1_048_576) -> Any:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=linger_ms,
        max_batch_size=batch_bytes,
        max_request_size=8 * 1_048_576,
        acks=1,
    )


async def partitions_of(client: Any, topic: str) -> list[int]:
    for _ in range(100):
        found = await client.partitions_for(topic)
        if found:
            return sorted(found)
        await asyncio.sleep(0.05)
    raise RuntimeError(f"topic {topic} has no partitions")


async def produce(bootstrap: str, topic: str, payloads: Iterable[bytes]) -> Produced:
    """Publish every payload, round robin over the partitions in record batches of up to 1 MiB (aiokafka's
    batch API: the backlog is prepared fast), and wait for every acknowledgement."""
    client = producer(bootstrap)
    await client.start()
    produced = Produced(topic=topic, count=0, seconds=0.0)
    started = time.perf_counter()
    try:
        partitions = await partitions_of(client, topic)
        batches = {p: client.create_batch() for p in partitions}
        pending: list[tuple[asyncio.Future[Any], int]] = []

        async def flush(partition: int) -> None:
            batch = batches[partition]
            count = batch.record_count()
            if count:
                batch.close()
                pending.append((await client.send_batch(batch, topic, partition=partition), count))
                batches[partition] = client.create_batch()

        async def settle() -> None:
            metas = await asyncio.gather(*(future for future, _ in pending))
            for meta, (_, count) in zip(metas, pending, strict=True):
                end = meta.offset + count  # a batch's metadata carries its base offset
                produced.next_offsets[meta.partition] = max(produced.next_offsets.get(meta.partition, 0), end)
            pending.clear()

        for index, payload in enumerate(payloads):
            partition = partitions[index % len(partitions)]
            if batches[partition].append(key=None, value=payload, timestamp=None) is None:
                await flush(partition)
                batches[partition].append(key=None, value=payload, timestamp=None)
            produced.count += 1
            if len(pending) >= 64:
                await settle()
        for partition in partitions:
            await flush(partition)
        await settle()
    finally:
        await client.stop()
    produced.seconds = time.perf_counter() - started
    return produced


async def consume_rate(bootstrap: str, topic: str, expect: int, *, timeout: float = 600.0) -> dict[str, Any]:
    """Consume-only ceiling: read the topic from the beginning (raw bytes, no group) with the worker's fetch
    settings and batch size, until ``expect`` records arrived."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=FETCH_BYTES,
    )
    await consumer.start()
    count = 0
    payload_bytes = 0
    try:
        started = time.perf_counter()
        first: float | None = None
        deadline = started + timeout
        while count < expect and time.perf_counter() < deadline:
            fetched = await consumer.getmany(timeout_ms=500, max_records=5_000)
            for records in fetched.values():
                if first is None:
                    first = time.perf_counter()
                count += len(records)
                payload_bytes += sum(len(r.value or b"") for r in records)
        seconds = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {
        "records": count,
        "seconds": round(seconds, 3),
        "per_second": round(count / seconds, 1) if seconds else None,
        "mb_per_second": round(payload_bytes / seconds / 1e6, 2) if seconds else None,
        "complete": count >= expect,
    }
