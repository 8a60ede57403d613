"""The Kafka boundary: aiokafka clients built from settings, and topic creation for dev and tests."""

from __future__ import annotations

import contextlib
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from worker.config import Settings
from worker.errors import BrokerUnavailable

PRODUCER_LINGER = 5  # milliseconds a produce waits to fill a batch
PRODUCER_MAX_REQUEST = 2 * 1_048_576  # bytes; dead letters are capped well below this


def consumer(settings: Settings) -> Any:
    """The group consumer of both input topics. Offsets live in PostgreSQL, so auto-commit is off."""
    return AIOKafkaConsumer(
        **settings.kafka_options(),
        group_id=settings.kafka_group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.batch_max_records,
        session_timeout_ms=int(settings.kafka_session_timeout * 1000),
        heartbeat_interval_ms=int(settings.kafka_heartbeat_interval * 1000),
        max_poll_interval_ms=int(settings.kafka_max_poll_interval * 1000),
        max_partition_fetch_bytes=max(1_048_576, settings.max_message_bytes + 65_536),
        fetch_max_wait_ms=int(settings.kafka_fetch_max_wait * 1000),
    )


def producer(settings: Settings) -> Any:
    return AIOKafkaProducer(
        **settings.kafka_options(),
        acks="all",
        enable_idempotence=settings.kafka_producer_idempotence,
        linger_ms=PRODUCER_LINGER,
        max_request_size=max(PRODUCER_MAX_REQUEST, settings.dead_letter_max_bytes * 2),
    )


async def ensure_topics(settings: Settings, topics: dict[str, int]) -> list[str]:
    """Create the topics that do not exist yet (name -> partitions). Returns the ones created."""
    admin = AIOKafkaAdminClient(**settings.kafka_options())
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        raise BrokerUnavailable(f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {exc}") from exc
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(name, partitions, 1) for name, partitions in topics.items() if name not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        return [topic.name for topic in wanted]
    except KafkaError as exc:
        raise BrokerUnavailable(f"Kafka admin request failed: {exc}") from exc
    finally:
        await admin.close()
