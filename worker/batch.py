"""Batch assembly: Kafka records become one batch of validated messages and quarantine outcomes.

Pure and CPU-bound (no I/O), so the consumer runs it while the previous batch is in the database. Decoding is
``worker.decode``'s; here records are sorted into a batch, and the later deliveries of an API-usage event key
are set apart from its first (``worker.redelivery`` judges them).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from worker.config import Settings
from worker.decode import ApiEvent, ProviderMessage, decode_api_event, decode_provider_message
from worker.ledger import Ledger
from worker.quarantine import Quarantined, Source
from worker.rows import UsageRows

TP = tuple[str, int]  # (topic, partition)
EventKey = tuple[int, datetime, str]  # (organization_id.int, occurred_at, event_id): api_usage's key


def event_key(event: ApiEvent) -> EventKey:
    """The event's dedupe key, as ``api_usage`` holds it. Hashes ``UUID.int``: hashing a UUID object runs
    Python code, hashing its int does not."""
    return (event.organization_id.int, event.occurred_at, event.event_id)


class KafkaRecord(Protocol):
    """The part of a consumed Kafka record a batch reads."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


@dataclass
class Batch:
    events: list[ApiEvent] = field(default_factory=list)  # the first delivery of each key, in lock order
    later: list[ApiEvent] = field(default_factory=list)  # later deliveries of those keys, in arrival order
    messages: list[ProviderMessage] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    last_offsets: dict[TP, int] = field(default_factory=dict)
    sizes: Counter[str] = field(default_factory=Counter)
    # Prepared before the batch's transaction opens (``Pipeline.prepare``); None until then.
    usage: UsageRows | None = None  # the events' rows, priced
    ledger: Ledger | None = None  # the messages attributed, priced and reduced

    def __len__(self) -> int:
        return sum(self.sizes.values())

    def without(self, partitions: set[TP]) -> Batch:
        """This batch minus the messages of some partitions (revoked while the batch was prepared)."""

        def kept(item: ApiEvent | ProviderMessage | Quarantined) -> bool:
            return (item.source.topic, item.source.partition) not in partitions

        rest = Batch(
            events=[e for e in self.events if kept(e)],
            usage=None if self.usage is None else self.usage.only(i for i, e in enumerate(self.events) if kept(e)),
            later=[e for e in self.later if kept(e)],
            messages=[m for m in self.messages if kept(m)],
            quarantined=[q for q in self.quarantined if kept(q)],
            last_offsets={tp: o for tp, o in self.last_offsets.items() if tp not in partitions},
        )
        firsts = {event_key(e) for e in rest.events}
        if any(event_key(e) not in firsts for e in rest.later):  # a first delivery was revoked: split again
            rest.events, rest.later = _split([*rest.events, *rest.later])
            rest.usage = None
        items: list[ApiEvent | ProviderMessage | Quarantined] = [
            *rest.events,
            *rest.later,
            *rest.messages,
            *rest.quarantined,
        ]
        rest.sizes.update(item.source.topic for item in items)
        return rest  # without a ledger: message indices changed, it is reduced again


def _source(record: KafkaRecord) -> Source:
    return Source(record.topic, record.partition, record.offset, record.key, tuple(record.headers or ()))


def decode_batch(records: Iterable[KafkaRecord], settings: Settings) -> Batch:
    """Validate every record; bad ones become quarantine outcomes. Pure and CPU-bound."""
    batch = Batch()
    decode_into(batch, records, settings)
    finish_batch(batch)
    return batch


def decode_into(batch: Batch, records: Iterable[KafkaRecord], settings: Settings, *, until: float = math.inf) -> bool:
    """Decode records into a batch until they run out (returns False) or ``time.perf_counter()`` passes
    ``until`` (returns True; the rest of an iterator is left for the next call). The consumer decodes in such
    slices, yielding to the event loop between them so that the batch in flight keeps talking to PostgreSQL."""
    for record in records:
        source = _source(record)
        payload = record.value if record.value is not None else b""
        batch.sizes[record.topic] += 1
        tp = (record.topic, record.partition)
        batch.last_offsets[tp] = max(record.offset, batch.last_offsets.get(tp, -1))
        decoded: ApiEvent | ProviderMessage | Quarantined
        if record.topic == settings.topic_api_usage:
            decoded = decode_api_event(payload, source, max_bytes=settings.max_message_bytes)
        else:
            decoded = decode_provider_message(
                payload, source, max_bytes=settings.max_message_bytes, max_results=settings.max_results_per_message
            )
        if isinstance(decoded, ApiEvent):
            batch.events.append(decoded)
        elif isinstance(decoded, ProviderMessage):
            batch.messages.append(decoded)
        else:
            batch.quarantined.append(decoded)
        if time.perf_counter() >= until:
            return True
    return False


def finish_batch(batch: Batch) -> None:
    """Keep the first delivery of each key in ``events``, in (organization, event_id, occurred_at) order (the
    order rows are locked in, across workers), and set later deliveries apart in ``later``. Nothing is judged
    here: whether a later one is a duplicate or a conflict depends on what is stored, which the batch's
    transaction finds out (``Pipeline``).

    Pure, so it runs while the previous batch is in the database.
    """
    batch.events, later = _split(batch.events)
    batch.later.extend(later)


def _split(events: list[ApiEvent]) -> tuple[list[ApiEvent], list[ApiEvent]]:
    """(the first delivery of each key, in (organization, event_id, occurred_at) order; the others, in the order
    given). Keys hash (``UUID.int``, event_id) first: hashing a UUID object runs Python code, hashing its int does
    not, and an aware datetime's first hash asks its time zone for the offset (a Python call per event); the
    instant is compared only when an id repeats."""
    unique: dict[tuple[int, str], ApiEvent] = {}
    instants: dict[EventKey, ApiEvent] = {}  # the same id at another instant than its first (rare)
    later = []
    for event in events:
        key = (event.organization_id.int, event.event_id)
        first = unique.get(key)
        if first is None:
            unique[key] = event
        elif first.occurred_at == event.occurred_at:
            later.append(event)
        else:
            other = event_key(event)
            if other in instants:
                later.append(event)
            else:
                instants[other] = event
    if not instants:
        return [unique[key] for key in sorted(unique)], later  # sorting the keys: no Python call per comparison
    firsts = [*unique.values(), *instants.values()]
    firsts.sort(key=lambda e: (e.organization_id.int, e.event_id, e.occurred_at))
    return firsts, later
