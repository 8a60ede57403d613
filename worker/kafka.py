"""The Kafka boundary: the only module that knows aiokafka, its clients and its errors.

Everything else sees the worker's own types: ``GroupConsumer`` and ``Producer`` below, partitions as
``(topic, partition)`` tuples, and ``BrokerUnavailable`` (a ``TransientError``) for whatever the client raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.structs import OffsetAndMetadata

from worker.batch import TP, KafkaRecord
from worker.config import Settings
from worker.errors import BrokerUnavailable

PRODUCER_LINGER = 5  # milliseconds a produce waits to fill a batch
PRODUCER_MAX_REQUEST = 2 * 1_048_576  # bytes; dead letters are capped well below this
STOP_TIMEOUT = 10.0  # seconds a client gets to leave the group / flush before it is let go
# What a client may raise when the broker is unreachable or refuses: its own errors, the network's, timeouts.
CLIENT_ERRORS = (KafkaError, OSError, TimeoutError)


def translate(exc: BaseException, doing: str | None = None) -> BrokerUnavailable:
    """A client error as the worker's own (the caller raises it ``from exc``); ``kind`` keeps the client's name."""
    return BrokerUnavailable(f"{doing}: {exc}" if doing else str(exc), kind=type(exc).__name__)


def _client_error(exc: BaseException) -> bool:
    """Any exception of the client library counts (aiokafka raises a few outside KafkaError's tree)."""
    return isinstance(exc, CLIENT_ERRORS) or type(exc).__module__.startswith("aiokafka")


def consumer(settings: Settings) -> Any:
    """The group consumer of both input topics. Offsets live in PostgreSQL, so auto-commit is off."""
    return AIOKafkaConsumer(
        **settings.kafka_options(),
        group_id=settings.kafka_group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # read_committed (the default): a producer that publishes in Kafka transactions and aborts one has those
        # messages skipped by the broker, so spend it withdrew is never counted; the consumer reads up to the last
        # stable offset, so an open transaction holds back what follows it until it commits or aborts.
        isolation_level=settings.kafka_isolation_level,
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
        # Dead letters, and the collector's bucket messages (up to max_message_bytes, plus key and batch framing):
        # a message the producer refuses would stay staged, retried forever, ahead of every later one.
        max_request_size=max(
            PRODUCER_MAX_REQUEST, settings.dead_letter_max_bytes * 2, settings.max_message_bytes + 65_536
        ),
    )


class Rebalance(Protocol):
    """What a group member does when partitions are taken away or handed to it (both awaited by the client
    before it goes on: a revocation may wait for the batch in flight)."""

    async def on_revoked(self, partitions: set[TP]) -> None: ...
    async def on_assigned(self, partitions: set[TP]) -> None: ...


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, rebalance: Rebalance) -> None:
        self.rebalance = rebalance

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.rebalance.on_revoked({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.rebalance.on_assigned({(tp.topic, tp.partition) for tp in assigned})


class GroupConsumer:
    """A member of a consumer group on some topics. Positions are the caller's: auto-commit is off, and Kafka's
    committed offsets are written only as a mirror (``commit``)."""

    def __init__(self, settings: Settings, topics: Iterable[str], rebalance: Rebalance) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.rebalance = rebalance
        self._client: Any = None

    async def start(self) -> None:
        client = consumer(self.settings)
        client.subscribe(topics=self.topics, listener=_Listener(self.rebalance))
        try:
            await client.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await client.stop()  # release its connections before the caller retries
            if isinstance(exc, Exception) and _client_error(exc):
                raise translate(exc, f"cannot join the group at {self.settings.kafka_bootstrap_servers}") from exc
            raise
        self._client = client

    async def stop(self) -> None:
        """Leave the group (the coordinator reassigns our partitions right away)."""
        if self._client is not None:
            with contextlib.suppress(*CLIENT_ERRORS):
                await asyncio.wait_for(self._client.stop(), timeout=STOP_TIMEOUT)

    async def fetch(self, *, timeout: float, max_records: int) -> dict[TP, list[KafkaRecord]]:
        try:
            fetched = await self._client.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        except KafkaError as exc:
            raise translate(exc) from exc
        return {(tp.topic, tp.partition): records for tp, records in fetched.items()}

    async def commit(self, offsets: dict[TP, int], *, timeout: float) -> None:
        """Commit these next offsets to Kafka."""
        request = {TopicPartition(*tp): OffsetAndMetadata(offset, "") for tp, offset in offsets.items()}
        try:
            await asyncio.wait_for(self._client.commit(request), timeout=timeout)
        except CLIENT_ERRORS as exc:
            raise translate(exc) from exc

    async def beginning_offsets(self, partitions: list[TP]) -> dict[TP, int]:
        """The first offset each partition still holds (the topic's retention deletes what comes before)."""
        try:
            found = await self._client.beginning_offsets([TopicPartition(*tp) for tp in partitions])
        except CLIENT_ERRORS as exc:
            raise translate(exc, "cannot read the partitions' first offsets") from exc
        return {(tp.topic, tp.partition): int(offset) for tp, offset in found.items()}

    async def seek(self, tp: TP, offset: int | None) -> None:
        """Fetch the partition from ``offset`` next (None: from its beginning)."""
        if offset is None:
            await self._client.seek_to_beginning(TopicPartition(*tp))
        else:
            self._client.seek(TopicPartition(*tp), offset)

    def highwater(self, tp: TP) -> int | None:
        """The partition's high watermark as of the last fetch response (None before one)."""
        if self._client is None:
            return None
        highwater = self._client.highwater(TopicPartition(*tp))
        return None if highwater is None else int(highwater)


class Producer:
    """An idempotent producer (acks=all) started on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None

    async def start(self) -> None:
        if self._client is not None:
            return
        client = producer(self.settings)
        try:
            await client.start()
        except CLIENT_ERRORS as exc:
            with contextlib.suppress(Exception):
                await client.stop()
            raise translate(exc, "cannot start the Kafka producer") from exc
        self._client = client

    async def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(*CLIENT_ERRORS):
                await asyncio.wait_for(self._client.stop(), timeout=STOP_TIMEOUT)
            self._client = None

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[None]:
        """Queue one message; the future returned resolves when the broker acknowledged it, or fails with
        ``BrokerUnavailable``. Queueing itself never raises for the broker's sake (its future fails instead)."""
        await self.start()
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            delivery = await self._client.send(topic, value=value, key=key, headers=headers)
        except KafkaError as exc:
            _settle(acknowledged, exc)
            return acknowledged
        delivery.add_done_callback(lambda done: _settle(acknowledged, done))
        return acknowledged


def _settle(future: asyncio.Future[None], outcome: asyncio.Future[Any] | BaseException) -> None:
    """Resolve a delivery's future from the client's (or from its error), a client error translated."""
    if future.done():
        return
    if isinstance(outcome, asyncio.Future):
        if outcome.cancelled():
            future.cancel()
            return
        error = outcome.exception()
    else:
        error = outcome
    if error is None:
        future.set_result(None)
    elif isinstance(error, KafkaError):
        translated = translate(error)
        translated.__cause__ = error
        future.set_exception(translated)
    else:
        future.set_exception(error)


async def ensure_topics(settings: Settings, topics: dict[str, int]) -> list[str]:
    """Create the topics that do not exist yet (name -> partitions). Returns the ones created."""
    admin = AIOKafkaAdminClient(**settings.kafka_options())
    try:
        await admin.start()
    except KafkaError as exc:
        raise translate(exc, f"cannot reach Kafka at {settings.kafka_bootstrap_servers}") from exc
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(name, partitions, 1) for name, partitions in topics.items() if name not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        return [topic.name for topic in wanted]
    except KafkaError as exc:
        raise translate(exc, "Kafka admin request failed") from exc
    finally:
        await admin.close()
