"""api_usage partitioned by UTC month (issue 18): the layout the migration leaves, what a duplicate is across
months, and partitions made in the batch path when a month has none (concurrent workers included)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.factories import api_event, make_org
from tests.feeding import Feeder
from worker.breaker import CircuitBreaker
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.errors import CircuitOpen
from worker.partitions import add_months, month_of
from worker.pipeline import Pipeline
from worker.store import Database


async def partitions(db: asyncpg.Connection) -> dict[str, tuple[datetime, datetime]]:
    rows = await db.fetch("SELECT partition_name, from_at, until_at FROM cost_worker_api_usage_partitions()")
    return {row["partition_name"]: (row["from_at"], row["until_at"]) for row in rows}


async def drop_legacy(db: asyncpg.Connection) -> None:
    """Past months without a partition: the (empty) table the migration attached for every instant before it."""
    await db.execute("ALTER TABLE api_usage DETACH PARTITION api_usage_legacy")
    await db.execute("DROP TABLE api_usage_legacy")


def at(month: date, day: int = 15, hour: int = 12) -> str:
    return f"{month.isoformat()[:8]}{day:02d}T{hour:02d}:00:00Z"


async def test_api_usage_is_partitioned_by_month_with_months_ahead(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT relkind::text FROM pg_class WHERE oid = 'api_usage'::regclass") == "p"
    assert await db.fetchval("SELECT pg_get_partkeydef('api_usage'::regclass)") == "RANGE (occurred_at)"
    key = await db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'api_usage'::regclass AND contype = 'p'"
    )
    assert key == "PRIMARY KEY (organization_id, occurred_at, event_id)"  # time leads (0014)
    found = await partitions(db)
    now = datetime.now(UTC)
    # The table of before the migration holds every instant the previous release could still write.
    legacy_from, legacy_until = found.pop("api_usage_legacy")
    assert legacy_from.year == 1
    assert legacy_until > now + timedelta(days=2)
    # Then one partition per month, contiguous, through two months after the current one.
    bounds = sorted(found.values())
    assert bounds[0][0] == legacy_until
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(month_of(b[0]) == b[0].date() and add_months(b[0].date(), 1) == b[1].date() for b in bounds)
    assert bounds[-1][1].date() >= add_months(month_of(now), 3)
    # Reached through the parent only: row-level security forced, no grant of their own.
    for name in [*found, "api_usage_legacy"]:
        row = await db.fetchrow("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = $1", name)
        assert row is not None, name
        assert row["relrowsecurity"], name
        assert row["relforcerowsecurity"], name
        for role in ("cost_worker_writer", "cost_worker_reader"):
            assert not await db.fetchval("SELECT has_table_privilege($1, $2, 'SELECT')", role, name), (role, name)


async def test_a_redelivery_is_a_noop_other_content_a_conflict_another_instant_another_event(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    org = await make_org(db)
    topic = feeder.settings.topic_api_usage
    first = api_event(org, event_id="e1", project=org.projects["proj_a"], occurred_at="2026-11-21T10:00:00.123Z")
    assert (await feeder.events(first)).messages[(topic, "inserted")] == 1
    assert (await feeder.events(first)).messages[(topic, "duplicate")] == 1  # a redelivery: nothing changes
    # The same key with other content: a conflicting duplicate, quarantined; the stored row stays.
    changed = dict(first, endpoint="/v1/other")
    assert (await feeder.events(changed)).quarantined[(topic, "conflicting_duplicate")] == 1
    # The same id at another instant, in the same month or another: another event (the key holds occurred_at).
    same_month = dict(first, occurred_at="2026-11-02T08:00:00Z")
    other_month = dict(first, occurred_at="2026-10-31T23:59:59Z")
    both = await feeder.events(same_month, other_month)  # in one batch as across batches
    assert both.messages[(topic, "inserted")] == 2
    assert not both.quarantined
    for again in (other_month, same_month, first):  # each one's redelivery is a no-op
        assert (await feeder.events(again)).messages[(topic, "duplicate")] == 1

    stored = await db.fetch("SELECT occurred_at, endpoint FROM api_usage WHERE event_id = 'e1' ORDER BY occurred_at")
    assert [(row["occurred_at"], row["endpoint"]) for row in stored] == [
        (datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC), "/v1/orchestrations"),
        (datetime(2026, 11, 2, 8, 0, 0, tzinfo=UTC), "/v1/orchestrations"),
        (datetime(2026, 11, 21, 10, 0, 0, 123000, tzinfo=UTC), "/v1/orchestrations"),
    ]
    assert await db.fetchval("SELECT sum(request_count) FROM project_metrics") == 3
    reasons = await db.fetch("SELECT reason FROM quarantine ORDER BY id")
    assert [row["reason"] for row in reasons] == ["conflicting_duplicate"]


async def test_a_month_without_a_partition_gets_one_in_the_batch(db: asyncpg.Connection, feeder: Feeder) -> None:
    await drop_legacy(db)
    org = await make_org(db)
    topic = feeder.settings.topic_api_usage
    events = [
        api_event(org, occurred_at="2026-09-03T04:05:06Z"),
        api_event(org, occurred_at="2026-11-20T00:00:00Z"),
        api_event(org, occurred_at="2025-02-28T23:59:59.999Z"),
    ]
    assert (await feeder.events(*events)).messages[(topic, "inserted")] == 3
    assert {"api_usage_y2026m09", "api_usage_y2026m11", "api_usage_y2025m02"} <= set(await partitions(db))
    assert (await feeder.events(*events)).messages[(topic, "duplicate")] == 3
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 3
    where = await db.fetch("SELECT tableoid::regclass::text AS part, event_id FROM api_usage ORDER BY occurred_at")
    assert [row["part"] for row in where] == ["api_usage_y2025m02", "api_usage_y2026m09", "api_usage_y2026m11"]


async def test_concurrent_workers_make_a_missing_month_once(db: asyncpg.Connection, settings: Settings) -> None:
    await drop_legacy(db)
    org = await make_org(db)
    pools = [await Database.open(settings.dsn(), role=settings.database_role) for _ in range(3)]
    try:
        feeders = [Feeder(Pipeline(pool, settings, budgets=BudgetEngine(settings)), settings) for pool in pools]
        batches: list[list[dict[str, Any]]] = [
            [api_event(org, occurred_at=f"2026-08-{day:02d}T10:00:00Z") for day in range(1, 29)] for _ in feeders
        ]
        outcomes = await asyncio.gather(
            *(f.events(*batch, partition=index) for index, (f, batch) in enumerate(zip(feeders, batches, strict=True)))
        )
    finally:
        for pool in pools:
            await pool.close()
    topic = settings.topic_api_usage
    assert [o.messages[(topic, "inserted")] for o in outcomes] == [28, 28, 28]
    assert [name for name in await partitions(db) if name.startswith("api_usage_y2026m08")] == ["api_usage_y2026m08"]
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 84


async def test_events_before_the_first_month_kept_are_quarantined(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    await db.execute("UPDATE api_usage_retention SET kept_from = '2026-11-01'")
    topic = feeder.settings.topic_api_usage
    old = api_event(org, occurred_at="2026-10-31T23:59:59.999Z")
    kept = api_event(org, occurred_at="2026-11-01T00:00:00Z")
    outcome = await feeder.events(old, kept)
    assert outcome.messages[(topic, "inserted")] == 1
    assert outcome.quarantined[(topic, "invalid_timestamp")] == 1
    row = await db.fetchrow("SELECT reason, detail FROM quarantine")
    assert row is not None
    assert row["reason"] == "invalid_timestamp"
    assert "before 2026-11-01: retention dropped" in row["detail"]
    assert await db.fetchval("SELECT sum(request_count) FROM project_metrics") == 1
    assert await db.fetchval("SELECT count(*) FROM api_usage WHERE occurred_at < '2026-11-01'") == 0


async def test_events_of_a_dropped_month_do_not_open_the_circuit_breaker(
    db: asyncpg.Connection, settings: Settings, database: Database
) -> None:
    """Events of a month retention dropped are valid input refused by policy, not a broken producer: a backlog of
    them (a producer's backfill, a re-read topic) was 300 of 310 "invalid" messages and stopped the worker
    (CircuitOpen, at every restart: the same batch). Events with a timestamp that is really bad still count."""
    org = await make_org(db)
    await db.execute("UPDATE api_usage_retention SET kept_from = '2026-11-01'")
    breaker = CircuitBreaker(window=1000, min_messages=200, invalid_ratio=settings.breaker_invalid_ratio)
    feeder = Feeder(Pipeline(database, settings, budgets=BudgetEngine(settings), breaker=breaker), settings)
    topic = settings.topic_api_usage
    old = [api_event(org, occurred_at=f"2026-10-{1 + i % 30:02d}T{i % 24:02d}:00:00Z") for i in range(300)]
    kept = [api_event(org, occurred_at=f"2026-11-{1 + i:02d}T00:00:00Z") for i in range(10)]
    outcome = await feeder.events(*old, *kept)
    assert outcome.quarantined[(topic, "invalid_timestamp")] == 300
    assert outcome.messages[(topic, "inserted")] == 10

    broken = [api_event(org, occurred_at="2014-12-31T00:00:00Z") for _ in range(300)]
    feeder.pipeline.breaker = CircuitBreaker(
        window=1000, min_messages=200, invalid_ratio=settings.breaker_invalid_ratio
    )
    with pytest.raises(CircuitOpen):
        await feeder.events(*broken)


async def test_the_writer_cannot_make_or_drop_partitions_itself(db: asyncpg.Connection) -> None:
    for statement, error in (
        ("SELECT cost_worker_api_usage_create_partition('2026-01-01')", asyncpg.InsufficientPrivilegeError),
        ("ALTER TABLE api_usage DETACH PARTITION api_usage_legacy", asyncpg.InsufficientPrivilegeError),
        ("DROP TABLE api_usage_legacy", asyncpg.InsufficientPrivilegeError),
        ("SELECT * FROM api_usage_legacy", asyncpg.InsufficientPrivilegeError),
        ("UPDATE api_usage_retention SET kept_from = NULL", asyncpg.InsufficientPrivilegeError),
        # Only a partition wholly before the first month kept (nothing was dropped yet: none).
        ("SELECT cost_worker_retention_drop('api_usage_legacy')", asyncpg.RaiseError),
        # Recording a drop and dropping what was recorded are the owner's steps (0032); the writer only resumes.
        ("SELECT cost_worker_retention_begin_drop('api_usage_legacy')", asyncpg.InsufficientPrivilegeError),
        ("SELECT cost_worker_retention_finish_drop('api_usage_legacy')", asyncpg.InsufficientPrivilegeError),
        (
            "INSERT INTO api_usage_retention_drops VALUES (1, 'api_usage_legacy', now())",
            asyncpg.InsufficientPrivilegeError,
        ),
    ):
        with pytest.raises(error):
            async with db.transaction():
                await db.execute("SET LOCAL ROLE cost_worker_writer")
                await db.execute(statement)
