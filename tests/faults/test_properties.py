"""Property: any interleaving, duplication and reordering of a set of deliveries, cut at any batch
boundaries, spread over any partitions, with stale (zombie) re-applications of batches thrown in, converges
to the same tables.

Runs the real pipeline on a real database (the in-memory feeding path, no broker, for speed); the database
is reset with TRUNCATE between examples. Each example is checked twice: exactly against the expectation
computed in the order the batches were applied (which delivery of a duplicate was stored), and, with the
source columns left out, against the canonical end state of the stream: the tables every order converges to.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import FakeRecord
from tests.faults.checks import assert_tables, seed, topic_of
from tests.faults.expectation import Delivered, Expected, expect, expected_alerts, planned, prepare
from tests.faults.generator import Message, Stream, generate
from tests.faults.harness import RESULTS, Record
from tests.feeding import Feeder
from worker.batch import decode_batch
from worker.config import Settings
from worker.errors import StaleOffsets

PARTITIONS = 3
EXAMPLES = 40
RESET = (
    "TRUNCATE cost_data, api_usage, project_metrics, user_metrics, quarantine, outbox, consumer_offsets, budget_alerts"
)


def base_stream() -> Stream:
    """A small stream without reused event ids (whose winner legitimately depends on arrival order)."""
    stream = generate(4242, n_events=40, days=3)
    seen: dict[tuple[Any, str], Any] = {}
    kept: list[Message] = []
    for message in stream.messages:
        if message.event is not None:
            key = (message.event.organization_id, message.event.event_id)
            if seen.setdefault(key, message.event) != message.event:
                continue
        kept.append(message)
    stream.messages = kept
    stream.conflicts = 0
    prepare(stream)
    return stream


BASE = base_stream()
CANONICAL = expect(planned(BASE))
CANONICAL.alerts = expected_alerts(BASE, CANONICAL, BASE.budgets)
RECORD = Record("property: any order, duplication, batching converges")


@dataclass
class Plan:
    """Deliveries as indices into the base stream (a short repr for hypothesis to print), their partitions,
    the batch boundaries and the batches a zombie re-applies."""

    order: list[int]
    partitions: list[int]
    cuts: list[int]
    zombies: set[int]

    @property
    def messages(self) -> list[Message]:
        return [BASE.messages[i] for i in self.order]


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    count = len(BASE.messages)
    order = list(draw(st.permutations(range(count))))
    for index in draw(st.lists(st.integers(0, count - 1), max_size=12)):  # re-sends, anywhere
        order.insert(draw(st.integers(0, len(order))), index)
    partitions = draw(st.lists(st.integers(0, PARTITIONS - 1), min_size=len(order), max_size=len(order)))
    cuts = sorted(draw(st.sets(st.integers(1, len(order) - 1), max_size=25)))
    zombies = draw(st.sets(st.integers(0, len(cuts)), max_size=4))
    return Plan(order, partitions, cuts, zombies)


def projection_of(expected: Expected) -> dict[str, Any]:
    """The end state without the source columns (which delivery of a duplicate was kept)."""
    return {
        "cost_data": sorted(
            (str(k), line.currency, line.amount, line.quantity, collected)
            for k, (line, collected, _, _) in expected.cost_data.items()
        ),
        "api_usage": sorted(str(event) for event, _, _ in expected.api_usage.values()),
        "project_metrics": sorted((str(k), tuple(v)) for k, v in expected.project_metrics.items()),
        "user_metrics": sorted((str(k), tuple(v)) for k, v in expected.user_metrics.items()),
        "quarantined_reasons": sorted(set(expected.quarantine.values())),
        "alerts": sorted(map(str, expected.alerts)),
    }


@pytest.fixture
async def platform(db: asyncpg.Connection) -> str:
    """The base stream's organizations, prices and budgets in this test's database."""
    await seed(db, BASE)
    return f"seeded stream {BASE.seed}"  # short: hypothesis prints the arguments of a falsifying example


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
@given(plan=plans())
async def test_any_delivery_order_converges(
    plan: Plan, platform: str, db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    if RECORD not in RESULTS:
        RESULTS.append(RECORD)
    RECORD.passed = False
    started = time.monotonic()
    await db.execute(RESET)
    feeder.next.clear()
    feeder.stored.clear()

    applied: list[Delivered] = []
    messages = plan.messages
    bounds = [0, *plan.cuts, len(messages)]
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        records = []
        for message, partition in zip(messages[start:end], plan.partitions[start:end], strict=True):
            record = feeder.record(topic_of(settings, message.kind), message.value, partition)
            records.append(FakeRecord(record.topic, record.partition, record.offset, record.value, message.key))
            applied.append(Delivered(message, partition, record.offset))
        before = dict(feeder.stored)
        await feeder.apply(records)
        if number in plan.zombies:
            # The same batch again from a consumer that still believes the old positions: fenced, no effect.
            with pytest.raises(StaleOffsets):
                await feeder.pipeline.apply(decode_batch(records, settings), before)
            RECORD.faults += 1
    RECORD.messages += len(applied)
    RECORD.bad_inputs += sum(1 for d in applied if d.message.bad is not None)

    expected = expect(applied, applied_in_order=True)
    expected.alerts = expected_alerts(BASE, expected, BASE.budgets)
    await assert_tables(db, expected, settings, outbox_drained=False)
    assert projection_of(expected) == projection_of(CANONICAL)
    RECORD.alerts = len(CANONICAL.alerts)
    RECORD.seconds += time.monotonic() - started
    RECORD.passed = True
