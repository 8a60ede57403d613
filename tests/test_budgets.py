"""Budgets: periods in time zones, the spend rule, the hierarchy, and alerts exactly once."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import Org, api_event, change_budget, envelope, make_org, openai_cost_bucket
from tests.feeding import Feeder
from tests.spend_model import period as model_period
from tests.test_migrate import copy_schema
from worker.alerts import Alert
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.migrate import migrate
from worker.pipeline import Pipeline
from worker.sql import query
from worker.store import Database


async def add_budget(
    db: asyncpg.Connection,
    scope: str,
    org: Org,
    amount: str,
    *,
    project: uuid.UUID | None = None,
    user: uuid.UUID | None = None,
    period: str = "monthly",
    timezone: str = "UTC",
    thresholds: tuple[int, ...] = (50, 80, 100),
    currency: str = "USD",
) -> uuid.UUID:
    budget = uuid.uuid4()
    common = (budget, org.id, Decimal(amount), currency, period, timezone, [Decimal(t) for t in thresholds])
    if scope == "organization":
        await db.execute(
            "INSERT INTO ai_organization_budgets (id, organization_id, amount, currency, period, timezone, thresholds)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            *common,
        )
    elif scope == "project":
        await db.execute(
            "INSERT INTO ai_project_budgets (id, organization_id, amount, currency, period, timezone, thresholds, "
            "project_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            *common,
            project,
        )
    else:
        await db.execute(
            "INSERT INTO ai_budgets (id, organization_id, amount, currency, period, timezone, thresholds, user_id, "
            "project_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            *common,
            user,
            project,
        )
    return budget


async def alerts(db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT scope, budget_id, period_start, threshold, spend FROM budget_alerts "
        "ORDER BY scope, budget_id, period_start, threshold"
    )
    return [tuple(r) for r in rows]


async def outbox_alerts(db: asyncpg.Connection, settings: Settings) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT key, value FROM outbox WHERE topic = $1 ORDER BY id", settings.topic_budget_alerts)
    return [json.loads(r["value"]) | {"_key": r["key"].decode()} for r in rows]


# A moment inside November 2026, the month most tests' data lies in (ended by now): budgets changed "during" it
# (change_budget), so the month is judged by the changed terms (migration 0033: the terms in force at its end).
DURING = datetime(2026, 11, 10, 11, tzinfo=UTC)


def spend_event(
    org: Org, cost: str, *, at: str = "2026-11-10T10:00:00Z", user: bool = True, event_id: str | None = None
) -> dict[str, Any]:
    return api_event(
        org,
        event_id=event_id,
        project=org.projects["proj_a"],
        user=org.users[0] if user else None,
        cost=cost,
        occurred_at=at,
    )


async def test_thresholds_alert_once_each_and_replays_add_nothing(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "10")
    await feeder.events(spend_event(org, "4.99", event_id="a"))
    assert await alerts(db) == []
    outcome = await feeder.events(spend_event(org, "3.01", event_id="b"))  # 8.00: crosses 50 and 80 at once
    assert [(a.threshold, a.spend) for a in outcome.alerts] == [(Decimal(50), Decimal(8)), (Decimal(80), Decimal(8))]
    await feeder.events(spend_event(org, "1", event_id="c"), spend_event(org, "0.5", event_id="d"))
    assert await alerts(db) == [
        ("organization", budget, datetime(2026, 11, 1, tzinfo=UTC), Decimal(50), Decimal(8)),
        ("organization", budget, datetime(2026, 11, 1, tzinfo=UTC), Decimal(80), Decimal(8)),
    ]
    await feeder.events(spend_event(org, "0.5", event_id="e"))  # 10.00: exactly 100 %
    assert len(await alerts(db)) == 3
    # Replays, duplicates, reordering: nothing new.
    for event_id, cost in (("a", "4.99"), ("e", "0.5"), ("b", "3.01")):
        await feeder.events(spend_event(org, cost, event_id=event_id))
    assert len(await alerts(db)) == 3
    messages = await outbox_alerts(db, settings)
    assert len(messages) == 3
    first = messages[0]
    assert first["_key"] == str(budget)
    assert first["scope"] == "organization"
    assert first["threshold_percent"] == "50"
    assert first["spend"] == "8.00"
    assert first["amount"] == "10"
    assert first["percent_used"] == "80.00"
    assert first["currency"] == "USD"
    assert first["period_start"] == "2026-11-01T00:00:00+00:00"
    assert first["period_end"] == "2026-12-01T00:00:00+00:00"
    stored_ids = {str(r["id"]) for r in await db.fetch("SELECT id FROM budget_alerts")}
    assert {m["alert_id"] for m in messages} == stored_ids


async def test_hierarchy_each_level_alerts_on_its_own_spend(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db, project_ids=("proj_a", "proj_b"), users=2)
    a, b = org.projects["proj_a"], org.projects["proj_b"]
    alice, bob = org.users
    org_budget = await add_budget(db, "organization", org, "100", thresholds=(50,))
    project_budget = await add_budget(db, "project", org, "40", project=a, thresholds=(50,))
    user_in_project = await add_budget(db, "user", org, "10", user=alice, project=b, thresholds=(50,))
    user_anywhere = await add_budget(db, "user", org, "30", user=alice, thresholds=(50,))
    await feeder.events(
        api_event(org, project=a, user=alice, cost="16"),  # alice in A
        api_event(org, project=b, user=alice, cost="6"),  # alice in B
        api_event(org, project=b, user=bob, cost="30"),  # bob in B
    )
    raised = {(scope, budget) for scope, budget, *_ in await alerts(db)}
    assert raised == {
        ("organization", org_budget),  # 52 of 100
        ("user", user_in_project),  # 6 of 10 (only project B counts)
        ("user", user_anywhere),  # 22 of 30
    }
    assert ("project", project_budget) not in raised  # project A: 16 of 40
    await feeder.events(api_event(org, project=a, user=bob, cost="4"))
    assert ("project", project_budget) in {(s, b) for s, b, *_ in await alerts(db)}  # 20 of 40


async def test_periods_follow_the_budget_time_zone_across_dst(db: asyncpg.Connection) -> None:
    async def period(kind: str, tz: str, at: str) -> tuple[datetime, datetime]:
        row = await db.fetchrow(
            "SELECT * FROM cost_worker_period($1::budget_period, $2, $3::text::timestamptz)", kind, tz, at
        )
        assert row is not None
        return row["period_start"], row["period_end"]

    # Berlin, March 2026: CET -> CEST on the 29th. The month starts at local midnight (UTC+1) and ends
    # at local midnight (UTC+2); the DST day is 23 hours long.
    assert await period("monthly", "Europe/Berlin", "2026-03-15T12:00:00Z") == (
        datetime(2026, 2, 28, 23, tzinfo=UTC),
        datetime(2026, 3, 31, 22, tzinfo=UTC),
    )
    start, end = await period("daily", "Europe/Berlin", "2026-03-29T12:00:00Z")
    assert (start, end - start) == (
        datetime(2026, 3, 28, 23, tzinfo=UTC),
        datetime(2026, 3, 29, 22, tzinfo=UTC) - start,
    )
    assert (end - start).total_seconds() == 23 * 3600
    # New York, November 2026: EDT -> EST on Sunday the 1st. Weeks start on Monday.
    start, end = await period("weekly", "America/New_York", "2026-11-01T12:00:00Z")
    assert start == datetime(2026, 10, 26, 4, tzinfo=UTC)  # Monday 00:00 EDT
    assert end == datetime(2026, 11, 2, 5, tzinfo=UTC)  # next Monday 00:00 EST: a 169-hour week
    assert await period("quarterly", "UTC", "2026-11-22T00:00:00Z") == (
        datetime(2026, 10, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert await period("yearly", "Asia/Kolkata", "2026-12-31T20:00:00Z") == (
        datetime(2026, 12, 31, 18, 30, tzinfo=UTC),
        datetime(2027, 12, 31, 18, 30, tzinfo=UTC),
    )


# Zones whose clocks change at or across local midnight (Havana and the Azores turn back from 01:00 to 00:00, so
# midnight happens twice; Santiago springs forward from 00:00, so it does not happen), half-hour and 45-minute
# changes (Lord Howe, Chatham), a 45-minute offset without changes (Kathmandu), and the usual ones.
PERIOD_ZONES = (
    "America/Havana",
    "Atlantic/Azores",
    "America/Santiago",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Europe/Berlin",
    "America/Los_Angeles",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/New_York",
    "Europe/London",
    "UTC",
)


def _instants_around_changes(zone: str) -> list[datetime]:
    """Every half hour within two days of each change of the zone's offset in 2025-2027 (one day if none)."""
    tz = ZoneInfo(zone)
    at, end = datetime(2025, 1, 1, tzinfo=UTC), datetime(2028, 1, 1, tzinfo=UTC)
    changes, offset = [], at.astimezone(tz).utcoffset()
    while at < end:
        at += timedelta(hours=1)
        if at.astimezone(tz).utcoffset() != offset:
            changes.append(at)
            offset = at.astimezone(tz).utcoffset()
    around = {
        c + timedelta(minutes=30 * k) for c in changes or [datetime(2026, 11, 1, tzinfo=UTC)] for k in range(-96, 97)
    }
    return sorted(around)


async def test_periods_equal_the_calendar_model_around_every_clock_change(db: asyncpg.Connection) -> None:
    """The database's period of an instant is the independent model's (zoneinfo, fold=0: a local boundary that
    happens twice is its first instant), and contains the instant, for every kind and zone above."""
    kinds, zones, instants = [], [], []
    for zone in PERIOD_ZONES:
        for at in _instants_around_changes(zone):
            for kind in ("daily", "weekly", "monthly", "quarterly", "yearly"):
                kinds.append(kind)
                zones.append(zone)
                instants.append(at)
    rows = await db.fetch(
        "SELECT p.period_start, p.period_end FROM unnest($1::budget_period[], $2::text[], $3::timestamptz[]) "
        "WITH ORDINALITY AS x(kind, tz, at, n) CROSS JOIN LATERAL cost_worker_period(x.kind, x.tz, x.at) p "
        "ORDER BY x.n",
        kinds,
        zones,
        instants,
    )
    wrong = []
    for kind, zone, at, row in zip(kinds, zones, instants, rows, strict=True):
        found = (row["period_start"], row["period_end"])
        if kind in ("daily", "weekly", "monthly"):
            expected = model_period(kind, zone, at)
        else:  # the model knows no quarters or years: their first local day, at its first midnight
            local = at.astimezone(ZoneInfo(zone)).date()
            first = local.replace(month=local.month - (local.month - 1) % 3 if kind == "quarterly" else 1, day=1)
            after = date(first.year + (first.month + 2) // 12, (first.month + 2) % 12 + 1, 1)
            if kind == "yearly":
                after = date(first.year + 1, 1, 1)
            expected = (_first_midnight(first, zone), _first_midnight(after, zone))
        if found != expected or not found[0] <= at < found[1]:
            wrong.append((kind, zone, at.isoformat(), [t.isoformat() for t in found]))
    assert len(rows) > 10_000
    assert wrong == []


def _first_midnight(day: date, zone: str) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(zone)).astimezone(UTC)


async def test_spend_lands_in_the_period_of_the_budget_time_zone(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    berlin = await add_budget(db, "organization", org, "10", timezone="Europe/Berlin", thresholds=(50,))
    utc = await add_budget(db, "organization", org, "10", timezone="UTC", thresholds=(50,))
    # 2026-10-31T23:30Z is already November in Berlin (UTC+1 after the October DST change).
    await feeder.events(spend_event(org, "6", at="2026-10-31T23:30:00Z"))
    rows = {budget: start for _, budget, start, *_ in await alerts(db)}
    assert rows == {berlin: datetime(2026, 10, 31, 23, tzinfo=UTC), utc: datetime(2026, 10, 1, tzinfo=UTC)}


async def test_a_day_that_starts_after_a_spring_forward_gap_alerts_on_its_own_spend(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """America/Santiago springs forward from 00:00 to 01:00 on 6 September 2026: midnight does not happen, so
    the 5th (UTC-4) ends and the 6th (UTC-3) starts at 04:00 UTC, and the 6th is 23 hours long. Spend on both
    sides of the jump belongs to two days: neither alerts, and the 6th alerts once its own spend crosses, with
    its own start (an hour off at the gap would put 6 + 6 into one day and alert early, or the 6th's last
    hour into the 7th)."""
    org = await make_org(db)
    budget = await add_budget(
        db, "organization", org, "10", period="daily", timezone="America/Santiago", thresholds=(100,)
    )
    await feeder.events(spend_event(org, "6", at="2026-09-06T03:30:00Z"))  # 23:30 on the 5th, UTC-4
    await feeder.events(spend_event(org, "6", at="2026-09-06T04:30:00Z"))  # 01:30 on the 6th, UTC-3
    assert await alerts(db) == []
    await feeder.events(spend_event(org, "5", at="2026-09-07T02:30:00Z"))  # 23:30 on the 6th
    await feeder.events(spend_event(org, "5", at="2026-09-07T03:30:00Z"))  # 00:30 on the 7th
    sixth = datetime(2026, 9, 6, 4, tzinfo=UTC)
    assert sixth == datetime(2026, 9, 6, 1, tzinfo=ZoneInfo("America/Santiago"))
    assert await alerts(db) == [("organization", budget, sixth, Decimal(100), Decimal(11))]


async def test_provider_costs_replace_estimates_never_add_to_them(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    a = org.projects["proj_a"]
    project_budget = await add_budget(db, "project", org, "100", project=a, thresholds=(20, 30))
    org_budget = await add_budget(db, "organization", org, "100", thresholds=(20, 30))
    # The platform's estimate first: 25 on Nov 3 (hours 10 and 11) for project A.
    await feeder.events(
        api_event(org, project=a, cost="15", occurred_at="2026-11-03T10:00:00Z"),
        api_event(org, project=a, cost="10", occurred_at="2026-11-03T11:59:00Z"),
    )

    async def spend(scope: str, project: uuid.UUID | None) -> Decimal:
        value = await db.fetchval(
            "SELECT spend FROM cost_worker_spend($1, $2, $3, NULL, '2026-11-01Z', '2026-12-01Z', 'USD')",
            scope,
            org.id,
            project,
        )
        assert isinstance(value, Decimal)
        return value

    assert await spend("project", a) == 25
    assert {t for *_, t, _ in await alerts(db)} == {Decimal(20)}
    # Then the provider's authoritative cost for that day arrives (lower: 12), plus usage for the same
    # window (costs_v1 wins over usage_v1) and an older day the platform never saw.
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [
                openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", 12)]),
                openai_cost_bucket("2026-11-02", "2026-11-03", [("proj_a", "x", 1)]),
            ],
        )
    )
    assert await spend("project", a) == 13  # 12 + 1; the 25 of estimates for Nov 3 are replaced, not added
    assert await spend("organization", None) == 13
    # Provider rows without a project cover every project of that provider organization for the org budget.
    await feeder.events(api_event(org, project=org.projects["proj_b"], cost="5", occurred_at="2026-11-05T10:00:00Z"))
    assert await spend("organization", None) == 18
    await feeder.buckets(
        envelope("openai", org.ai_org, "costs_v1", [openai_cost_bucket("2026-11-05", "2026-11-06", [(None, "all", 7)])])
    )
    assert await spend("organization", None) == 20  # 13 + 7: project B's estimate of 5 is covered
    assert await spend("project", org.projects["proj_b"]) == 5  # its own budget still has only the estimate
    await feeder.events(api_event(org, project=a, cost="20", occurred_at="2026-11-07T10:00:00Z"))  # 33 / 40
    assert {(b, t) for _, b, _, t, _ in await alerts(db)} == {
        (project_budget, Decimal(20)),
        (org_budget, Decimal(20)),
        (project_budget, Decimal(30)),
        (org_budget, Decimal(30)),
    }


async def test_late_data_alerts_in_its_own_period(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    budget = await add_budget(db, "project", org, "10", project=org.projects["proj_a"], thresholds=(100,))
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-10-30", "2026-10-31", [("proj_a", "x", 4)])],
            collected_at="2026-10-31T06:00:00Z",
        )
    )
    assert await alerts(db) == []
    # A revision for last month, arriving now, pushes October over.
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-10-30", "2026-10-31", [("proj_a", "x", 11)])],
            collected_at="2026-11-20T06:00:00Z",
        )
    )
    assert await alerts(db) == [("project", budget, datetime(2026, 10, 1, tzinfo=UTC), Decimal(100), Decimal(11))]


async def test_other_currencies_never_count(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    eur = await add_budget(db, "project", org, "10", project=org.projects["proj_a"], currency="EUR", thresholds=(50,))
    usd = await add_budget(db, "project", org, "10", project=org.projects["proj_a"], thresholds=(50,))
    await feeder.buckets(
        envelope(
            "openai", org.ai_org, "costs_v1", [openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", 6)])]
        )
    )
    assert {b for _, b, *_ in await alerts(db)} == {usd}
    assert eur not in {b for _, b, *_ in await alerts(db)}


async def test_sweep_alerts_a_lowered_or_new_budget(
    db: asyncpg.Connection, feeder: Feeder, database: Database, settings: Settings
) -> None:
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "100", thresholds=(50, 100))
    now = datetime.now(UTC).replace(microsecond=0)
    await feeder.events(spend_event(org, "60", at=now.isoformat()))
    assert [t for *_, t, _ in await alerts(db)] == [Decimal(50)]
    await db.execute("UPDATE ai_organization_budgets SET amount = 50 WHERE id = $1", budget)
    engine = BudgetEngine(settings)
    raised = await engine.sweep(database)
    # A lowered budget is another budget: both thresholds alert at once against the new amount (re-armed).
    assert [(a.budget_id, a.threshold, a.amount) for a in raised if isinstance(a, Alert)] == [
        (budget, Decimal(50), Decimal(50)),
        (budget, Decimal(100), Decimal(50)),
    ]
    assert await engine.sweep(database) == []  # and only once
    inactive = await add_budget(db, "organization", org, "1", thresholds=(100,))
    await db.execute("UPDATE ai_organization_budgets SET is_active = false WHERE id = $1", inactive)
    assert await engine.sweep(database) == []
    await db.execute("UPDATE ai_organization_budgets SET is_active = true WHERE id = $1", inactive)
    assert [a.budget_id for a in await engine.sweep(database)] == [inactive]


async def test_two_workers_on_one_organization_raise_each_alert_once(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """Two batches for one organization commit at the same moment; only together do they cross 100 %.

    Without serialising evaluation per organization, each would see only its own spend (9.3 of 10) and the
    crossing would be missed until the next sweep. With it, the second evaluation sees both: one alert.
    """
    pools = [await Database.open(settings.dsn(), role=settings.database_role) for _ in range(2)]
    try:
        feeders = [Feeder(Pipeline(pool, settings, budgets=BudgetEngine(settings)), settings) for pool in pools]
        for trial in range(5):
            org = await make_org(db)
            await add_budget(db, "organization", org, "10", thresholds=(50, 100))
            await feeders[0].events(spend_event(org, "8.6", event_id=f"base-{trial}"), partition=2 * trial)
            await asyncio.gather(
                # Different hours, so the two batches share no rollup row (whose lock would serialise them).
                feeders[0].events(
                    spend_event(org, "0.7", event_id=f"w0-{trial}", at="2026-11-10T11:00:00Z"), partition=2 * trial
                ),
                feeders[1].events(
                    spend_event(org, "0.7", event_id=f"w1-{trial}", at="2026-11-10T12:00:00Z"), partition=2 * trial + 1
                ),
            )
            rows = await db.fetch(
                "SELECT threshold, spend FROM budget_alerts WHERE organization_id = $1 ORDER BY threshold", org.id
            )
            assert [(r["threshold"], r["spend"]) for r in rows] == [
                (Decimal(50), Decimal("8.6")),
                (Decimal(100), Decimal("10.0")),
            ], trial
    finally:
        for pool in pools:
            await pool.close()
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE topic = $1", settings.topic_budget_alerts) == 10


@pytest.mark.parametrize("thresholds", [(150,), (50, 100, 150)])
async def test_thresholds_above_one_hundred(
    db: asyncpg.Connection, feeder: Feeder, thresholds: tuple[int, ...]
) -> None:
    org = await make_org(db)
    await add_budget(db, "organization", org, "10", thresholds=thresholds)
    await feeder.events(spend_event(org, "14.99"))
    assert 150 not in {t for *_, t, _ in await alerts(db)}
    await feeder.events(spend_event(org, "0.01"))
    assert Decimal(150) in {t for *_, t, _ in await alerts(db)}


async def test_a_crash_between_commit_and_publish_still_publishes_each_alert_once(
    db: asyncpg.Connection, settings: Settings, tmp_path: Any
) -> None:
    """SIGKILL after the alerts were committed and before the outbox was published (a fault hook): the
    restarted worker publishes them, once each."""
    from tests.factories import dumps  # noqa: PLC0415
    from tests.kafka_helpers import consume_all, create_topics, produce, spawn_worker  # noqa: PLC0415

    await create_topics(settings)
    org = await make_org(db)
    await add_budget(db, "organization", org, "10", thresholds=(50, 80, 100))
    await produce(settings, settings.topic_api_usage, [dumps(spend_event(org, "3.5")) for _ in range(3)])
    crashing = spawn_worker(
        settings, "--exit-when-idle", "2", log=tmp_path / "crash.log", COST_WORKER_FAULT_POINTS="before_outbox_publish"
    )
    assert await asyncio.to_thread(crashing.wait, 120) == -9
    assert await db.fetchval("SELECT count(*) FROM budget_alerts") == 3  # committed...
    assert await db.fetchval("SELECT count(*) FROM outbox") == 3  # ...but not published
    restarted = spawn_worker(settings, "--exit-when-idle", "2", log=tmp_path / "restart.log")
    assert await asyncio.to_thread(restarted.wait, 120) == 0
    published = await consume_all(settings, settings.topic_budget_alerts, expect=3)
    ids = [json.loads(record.value)["alert_id"] for record in published]
    assert sorted(ids) == sorted(str(r["id"]) for r in await db.fetch("SELECT id FROM budget_alerts"))
    assert len(ids) == len(set(ids)) == 3
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


def _function_loops(plan: Any, function: str) -> int:
    """How many times ``function`` was scanned in an ``EXPLAIN (ANALYZE, FORMAT JSON)`` plan, over all nodes."""
    loops = 0
    if isinstance(plan, dict):
        if plan.get("Node Type") == "Function Scan" and plan.get("Function Name") == function:
            loops += int(plan["Actual Loops"])
        for value in plan.values():
            loops += _function_loops(value, function)
    elif isinstance(plan, list):
        loops += sum(_function_loops(item, function) for item in plan)
    return loops


async def test_budget_queries_compute_each_period_once(db: asyncpg.Connection) -> None:
    """A batch's candidates (and the sweep's active budgets) compute the period of each distinct (kind, zone,
    instant) once, not once per matched (budget, touched row): cost_worker_period is a function call of ~0.1 ms
    (0020), and a plan that called it per row cost ~700 ms on a batch spread over 1,000 organizations."""
    org = await make_org(db, project_ids=("proj_a", "proj_b"), users=3)
    projects = list(org.projects.values())
    await add_budget(db, "organization", org, "100")
    await add_budget(db, "organization", org, "100", period="daily", timezone="America/Havana")
    await add_budget(db, "project", org, "100", project=projects[0], timezone="Europe/Berlin")
    await add_budget(db, "user", org, "100", user=org.users[0])
    hours = [datetime(2026, 11, 10, hour, tzinfo=UTC) for hour in (9, 10, 11)]
    touched = [(projects[i % 2], org.users[i % 3], hours[i % 3]) for i in range(300)]
    args = (
        [org.id] * len(touched),
        [p for p, _, _ in touched],
        [u for _, u, _ in touched],
        [at for _, _, at in touched],
        [None] * len(touched),
        [None] * len(touched),
    )
    found = await db.fetch(query("budget_candidates"), *args)
    # (monthly, UTC) and (daily, Havana) for the organization, (monthly, Berlin) for the project, (monthly, UTC)
    # for the user: 3 distinct (kind, zone) pairs at 3 instants each, for 300 touched rows and 4 budgets
    assert len({(r["period"], r["timezone"], r["period_start"]) for r in found}) >= 3
    explained = await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query('budget_candidates')}", *args)
    assert _function_loops(json.loads(explained), "cost_worker_period") == 3 * 3

    explained = await db.fetchval(
        f"EXPLAIN (ANALYZE, FORMAT JSON) {query('budget_active')}", [org.id], datetime(2026, 11, 10, tzinfo=UTC)
    )
    assert _function_loops(json.loads(explained), "cost_worker_period") == 3


async def test_spend_does_not_depend_on_the_session_time_zone(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """A monthly budget in America/Los_Angeles: November starts at 07:00 UTC on the 1st, so its whole UTC days
    start at 00:00 UTC on the 2nd. That first midnight was computed as the 1st's UTC midnight + interval '1 day',
    which PostgreSQL adds in the session's TimeZone: in a database whose default zone is America/New_York (DST
    ends on 1 November) it is 01:00 UTC on the 2nd, and the aggregate's whole day of the 2nd was skipped: 61 USD
    of spend read as 1 USD (and nothing alerted)."""
    org = await make_org(db)
    project = org.projects["proj_a"]
    await feeder.events(
        spend_event(org, "1", at="2026-11-01T10:00:00Z", event_id="first"),
        spend_event(org, "60", at="2026-11-02T10:00:00Z", event_id="second"),
    )
    budget = await add_budget(db, "project", org, "100", project=project, timezone="America/Los_Angeles")
    november = (datetime(2026, 11, 1, 7, tzinfo=UTC), datetime(2026, 12, 1, 8, tzinfo=UTC))
    for zone in ("UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe"):
        await db.execute(f"SET TimeZone = '{zone}'")
        spend = await db.fetchval(
            "SELECT spend FROM cost_worker_spend('project', $1, $2, NULL, $3, $4, 'USD')", org.id, project, *november
        )
        assert spend == Decimal(61), zone
    await db.execute("RESET TimeZone")
    # The worker's own sessions take the database's default zone.
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE \"{name}\" SET TimeZone = 'America/New_York'")
    pool = await Database.open(settings.dsn(), role=settings.database_role)
    try:
        raised = await BudgetEngine(settings).sweep(pool, at=datetime(2026, 11, 20, tzinfo=UTC))
    finally:
        await pool.close()
        await db.execute(f'ALTER DATABASE "{name}" RESET TimeZone')
    assert [(a.budget_id, a.threshold, a.spend) for a in raised] == [(budget, Decimal(50), Decimal(61))]


async def test_a_budget_changed_to_a_longer_period_alerts_in_it(
    db: asyncpg.Connection, feeder: Feeder, database: Database, settings: Settings
) -> None:
    """A daily budget of 100 USD alerted at 80 % on 1 November (90 USD that day). On the 20th it becomes monthly:
    November's spend is 500 USD, 500 % of the budget, and the month's 80 % must alert. Its period starts at the same
    instant as the 1st's daily period, and the alert history was looked up by start only: the daily alert counted
    as the month's open one, so the monthly budget never alerted. The month's alert is the next crossing (its own
    id; the first crossing's id is the daily alert's)."""
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "100", period="daily", thresholds=(80,))
    first = await feeder.events(spend_event(org, "90", at="2026-11-01T10:00:00Z", event_id="first"))
    assert [(a.threshold, a.period_end) for a in first.alerts] == [(Decimal(80), datetime(2026, 11, 2, tzinfo=UTC))]
    await feeder.events(spend_event(org, "10", at="2026-11-10T10:00:00Z", event_id="second"))  # 10 %: nothing
    await change_budget(db, "UPDATE ai_organization_budgets SET period = 'monthly' WHERE id = $1", budget, at=DURING)
    await feeder.events(spend_event(org, "400", at="2026-11-12T10:00:00Z", event_id="third"))
    rows = await db.fetch(
        "SELECT period_end, threshold, spend, crossing, resolved_at IS NULL AS open FROM budget_alerts "
        "WHERE budget_id = $1 ORDER BY raised_at",
        budget,
    )
    assert [tuple(r) for r in rows] == [
        (datetime(2026, 11, 2, tzinfo=UTC), Decimal(80), Decimal(90), 1, True),
        (datetime(2026, 12, 1, tzinfo=UTC), Decimal(80), Decimal(500), 2, True),
    ]
    assert await BudgetEngine(settings).sweep(database, at=datetime(2026, 11, 20, tzinfo=UTC)) == []


async def test_two_periods_of_one_start_judged_in_one_batch_each_raise_their_alert(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """A daily budget of 10 USD was weekly from 5 to 12 November (migration 0033 judges an ended period by the terms in
    force at its end). One batch brings 6 USD on Monday 2 November, judged as that day (daily then), and 1 USD on
    the 6th, judged in its week, 2-9 November (weekly at the week's end): both periods start on the 2nd and both reach
    50 %. Their crossings were numbered from the same history, so both were crossing 1, one alert id: the week's
    insert hit the day's key and was dropped (ON CONFLICT DO NOTHING), and the week never alerted. Each is raised now,
    the second as the next crossing at that start."""
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "10", period="daily", thresholds=(50,))
    weekly = datetime(2026, 11, 5, 12, tzinfo=UTC)
    await change_budget(db, "UPDATE ai_organization_budgets SET period = 'weekly' WHERE id = $1", budget, at=weekly)
    await change_budget(
        db, "UPDATE ai_organization_budgets SET period = 'daily' WHERE id = $1", budget, at=weekly + timedelta(days=7)
    )
    outcome = await feeder.events(
        spend_event(org, "6", at="2026-11-02T10:00:00Z", event_id="monday"),
        spend_event(org, "1", at="2026-11-06T10:00:00Z", event_id="friday"),
    )
    day = (datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC))
    week = (datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 11, 9, tzinfo=UTC))
    assert sorted((a.period_start, a.period_end, a.spend) for a in outcome.alerts) == [
        (*day, Decimal(6)),
        (*week, Decimal(7)),
    ]
    rows = await db.fetch(
        "SELECT period_start, period_end, spend, crossing FROM budget_alerts WHERE budget_id = $1 ORDER BY period_end",
        budget,
    )
    assert sorted(r["crossing"] for r in rows) == [1, 2]
    assert [(r["period_start"], r["period_end"], r["spend"]) for r in rows] == [(*day, Decimal(6)), (*week, Decimal(7))]
    assert len({m["alert_id"] for m in await outbox_alerts(db, settings)}) == 2


async def test_a_time_zone_postgresql_knows_and_python_does_not_alerts_instead_of_failing_the_batch(
    db: asyncpg.Connection, feeder: Feeder, database: Database, settings: Settings
) -> None:
    """The budgets' CHECK accepts every name PostgreSQL knows: its zone names in any case (`europe/berlin`), its
    abbreviations (`PST`) and POSIX specs. The alert message rendered the period in ``ZoneInfo(timezone)``, which knows
    neither: ZoneInfoNotFoundError failed the whole batch, every time it was redelivered (ingestion stopped for every
    organization of its partitions), and the sweep with it. A name of another case is the zone it names (as in
    PostgreSQL); one Python cannot resolve is shown in UTC (the instants are PostgreSQL's, and right)."""
    org = await make_org(db)
    berlin = await add_budget(db, "organization", org, "10", timezone="europe/berlin", thresholds=(50,))
    pacific = await add_budget(db, "organization", org, "10", timezone="PST", thresholds=(50,))
    outcome = await feeder.events(spend_event(org, "6"))
    assert {a.budget_id for a in outcome.alerts} == {berlin, pacific}
    messages = {m["budget_id"]: m for m in await outbox_alerts(db, settings)}
    assert messages[str(berlin)]["period_start"] == "2026-11-01T00:00:00+01:00"  # Europe/Berlin
    assert messages[str(berlin)]["timezone"] == "europe/berlin"
    assert messages[str(pacific)]["period_start"] == "2026-11-01T08:00:00+00:00"  # midnight at UTC-8, shown in UTC
    await change_budget(
        db, "UPDATE ai_organization_budgets SET amount = 5 WHERE organization_id = $1", org.id, at=DURING
    )
    engine = BudgetEngine(settings)
    raised = await engine.sweep(database, at=datetime(2026, 11, 20, tzinfo=UTC))
    assert {a.budget_id for a in raised} == {berlin, pacific}


async def test_thresholds_holding_null_or_nested_alert_on_the_others_instead_of_failing_the_batch(
    db: asyncpg.Connection, feeder: Feeder, database: Database, settings: Settings
) -> None:
    """The thresholds' CHECK (`0 < ALL (thresholds)`) is NULL, so it passes, for an array holding a NULL, and a
    two-dimensional array passes it too. Candidate.from_row sorted the thresholds: a NULL among numbers raised TypeError
    (a nested list: unhashable), failing every batch that touched the organization and the sweep, again on each
    redelivery. A NULL is no threshold; a nested array's numbers are its thresholds."""
    org = await make_org(db)
    with_null = await add_budget(db, "organization", org, "10", thresholds=(50,))
    nested = await add_budget(db, "organization", org, "10", thresholds=(50,))
    only_null = await add_budget(db, "organization", org, "10", thresholds=(50,))
    await change_budget(
        db, "UPDATE ai_organization_budgets SET thresholds = '{50,NULL}' WHERE id = $1", with_null, at=DURING
    )
    await change_budget(
        db, "UPDATE ai_organization_budgets SET thresholds = '{{50,80}}' WHERE id = $1", nested, at=DURING
    )
    await change_budget(
        db, "UPDATE ai_organization_budgets SET thresholds = '{NULL}' WHERE id = $1", only_null, at=DURING
    )
    outcome = await feeder.events(spend_event(org, "9"))
    assert sorted((str(a.budget_id), a.threshold) for a in outcome.alerts) == sorted(
        [(str(with_null), Decimal(50)), (str(nested), Decimal(50)), (str(nested), Decimal(80))]
    )
    await change_budget(
        db,
        "UPDATE ai_organization_budgets SET amount = 5 WHERE organization_id = $1",
        org.id,
        at=DURING + timedelta(hours=1),  # after the first change
    )
    raised = await BudgetEngine(settings).sweep(database, at=datetime(2026, 11, 20, tzinfo=UTC))
    assert sorted((str(a.budget_id), a.threshold) for a in raised) == sorted(
        [(str(with_null), Decimal(50)), (str(nested), Decimal(50)), (str(nested), Decimal(80))]
    )


async def test_a_tiny_budget_amount_alerts_instead_of_failing_the_batch(
    db: asyncpg.Connection, feeder: Feeder, database: Database, settings: Settings
) -> None:
    """The budgets' CHECK is `amount > 0`, so 1e-60 USD is a budget. Its percent used (1 USD: 1e62 %) has 65 digits
    at cents, more than the exact context's 60, and quantize raised InvalidOperation: every batch that touched the
    organization failed, again on each redelivery (ingestion stopped for its partitions), and so did the sweep."""
    org = await make_org(db)
    tiny = "0." + "0" * 59 + "1"  # 1e-60
    budget = await add_budget(db, "organization", org, tiny, thresholds=(100,))
    outcome = await feeder.events(spend_event(org, "1"))
    assert [(a.budget_id, a.threshold) for a in outcome.alerts] == [(budget, Decimal(100))]
    [message] = await outbox_alerts(db, settings)
    assert message["percent_used"] == "1" + "0" * 62 + ".00"
    assert message["amount"] == tiny
    assert await db.fetchval("SELECT percent_used FROM budget_alerts WHERE budget_id = $1", budget) == Decimal("1e62")
    await change_budget(
        db, "UPDATE ai_organization_budgets SET thresholds = '{100,200}' WHERE id = $1", budget, at=DURING
    )
    raised = await BudgetEngine(settings).sweep(database, at=datetime(2026, 11, 20, tzinfo=UTC))
    assert [(a.budget_id, a.threshold) for a in raised] == [(budget, Decimal(200))]


async def test_a_zone_name_postgresql_reads_as_an_abbreviation_is_shown_at_its_offset(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """`CET`, `EET`, `MET` and `WET` are IANA zones (with summer time) and also abbreviations of PostgreSQL's Default
    set (fixed: +1, +2, +1, 0), which is how PostgreSQL reads them, so a `CET` budget's day starts at 00:00+01:00 all
    year. The message showed that instant in ZoneInfo('CET'): in summer `2026-07-01T01:00:00+02:00`, a period starting
    at 01:00 local. It is shown at the offset PostgreSQL computed it in."""
    org = await make_org(db)
    budgets = {
        name: await add_budget(db, "organization", org, "10", period="daily", timezone=name, thresholds=(50,))
        for name in ("CET", "eet", "MET", "WET")
    }
    await feeder.events(spend_event(org, "6", at="2026-07-01T10:00:00Z"))
    messages = {m["budget_id"]: m for m in await outbox_alerts(db, settings)}
    shown = {name: (messages[str(b)]["period_start"], messages[str(b)]["period_end"]) for name, b in budgets.items()}
    assert shown == {
        "CET": ("2026-07-01T00:00:00+01:00", "2026-07-02T00:00:00+01:00"),
        "eet": ("2026-07-01T00:00:00+02:00", "2026-07-02T00:00:00+02:00"),
        "MET": ("2026-07-01T00:00:00+01:00", "2026-07-02T00:00:00+01:00"),
        "WET": ("2026-07-01T00:00:00+00:00", "2026-07-02T00:00:00+00:00"),
    }


async def test_late_data_of_a_day_that_ended_when_the_budget_was_daily_is_judged_as_that_day(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """A daily budget of 100 USD, made monthly at 1000 today (after November ended). Late data of 10 November, 90 USD:
    that day was a period of the budget then, and 90 is 80 % of its 100 (it was judged as November at 1000, 9 %)."""
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "100", period="daily", thresholds=(80,))
    await db.execute("UPDATE ai_organization_budgets SET period = 'monthly', amount = 1000 WHERE id = $1", budget)
    outcome = await feeder.events(spend_event(org, "90", at="2026-11-10T10:00:00Z"))
    assert [(a.period, a.period_start, a.period_end, a.amount, a.threshold) for a in outcome.alerts] == [
        ("daily", datetime(2026, 11, 10, tzinfo=UTC), datetime(2026, 11, 11, tzinfo=UTC), Decimal(100), Decimal(80))
    ]


async def test_late_data_of_a_month_that_ended_when_the_budget_was_monthly_is_judged_as_that_month(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """A monthly budget of 1000 USD with 450 spent in November, made daily at 50 today. Late data of 15 November, 60
    USD: November makes 510, 51 % of 1000 (the 50 % alert of the month), not 120 % of a daily 50 for a day that was
    no period of the budget then."""
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "1000", thresholds=(50,))
    assert (await feeder.events(spend_event(org, "450", at="2026-11-05T10:00:00Z", event_id="early"))).alerts == []
    await db.execute("UPDATE ai_organization_budgets SET period = 'daily', amount = 50 WHERE id = $1", budget)
    outcome = await feeder.events(spend_event(org, "60", at="2026-11-15T10:00:00Z", event_id="late"))
    assert [(a.period, a.period_start, a.period_end, a.amount, a.spend) for a in outcome.alerts] == [
        ("monthly", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), Decimal(1000), Decimal(510))
    ]


async def test_a_late_provider_bucket_of_a_budget_that_was_daily_is_judged_in_the_days_it_had(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """The same through a provider row, whose window reaches other periods: a daily budget of 100 USD made monthly at
    1000 today; a late cost bucket of 90 USD over 10-12 November counts on the 11th (its midpoint), and is judged in
    the days of the budget then: 80 % of the 11th's 100 (as November at 1000: 9 %, nothing)."""
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "100", period="daily", thresholds=(80,))
    await db.execute("UPDATE ai_organization_budgets SET period = 'monthly', amount = 1000 WHERE id = $1", budget)
    outcome = await feeder.buckets(
        envelope("openai", org.ai_org, "costs_v1", [openai_cost_bucket("2026-11-10", "2026-11-12", [(None, "x", 90)])])
    )
    assert [(a.period, a.period_start, a.amount, a.spend) for a in outcome.alerts] == [
        ("daily", datetime(2026, 11, 11, tzinfo=UTC), Decimal(100), Decimal(90))
    ]


async def _versions_moved_back_to(db: asyncpg.Connection, budget: uuid.UUID, newest: datetime) -> None:
    """Move a budget's dated versions (budget_terms, 0033) back in time, in their order, the newest to ``newest``: as
    if the changes had been made then (a test cannot wait for a period to end after them)."""
    await db.execute(
        "UPDATE budget_terms SET valid_from = valid_from - ((SELECT max(valid_from) FROM budget_terms "
        "WHERE budget_id = $1) - $2::timestamptz) WHERE budget_id = $1 AND valid_from > '-infinity'",
        budget,
        newest,
    )


async def test_the_last_change_committed_is_the_budgets_newest_terms(
    db: asyncpg.Connection, database_url: str, feeder: Feeder
) -> None:
    """A budget of 100 USD. An operator's psql transaction starts; meanwhile the platform raises the budget to 1000
    (committed); then the operator's transaction sets it back to 100 and commits. The budget is 100, and a period that
    ends after both changes must be judged at 100. 0033 dated each version by its transaction's start, so the
    platform's 1000 (the later start) stayed the newest version: November (both changes made during it, moved back
    into it here) was judged at 1000, and its 90 USD (90 % of 100) alerted nothing."""
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "100", thresholds=(80,))
    operator = await asyncpg.connect(database_url)
    try:
        async with operator.transaction():
            await operator.fetchval("SELECT now()")  # the transaction has started
            await db.execute("UPDATE ai_organization_budgets SET amount = 1000 WHERE id = $1", budget)
            await operator.execute("UPDATE ai_organization_budgets SET amount = 100 WHERE id = $1", budget)
    finally:
        await operator.close()
    assert await db.fetchval("SELECT amount FROM ai_organization_budgets WHERE id = $1", budget) == 100
    await _versions_moved_back_to(db, budget, DURING)
    outcome = await feeder.events(spend_event(org, "90", at="2026-11-20T10:00:00Z"))
    assert [(a.amount, a.threshold, a.spend) for a in outcome.alerts] == [(Decimal(100), Decimal(80), Decimal(90))]
    assert await db.fetchval("SELECT amount FROM cost_worker_budget_terms_at('organization', $1, now())", budget) == 100


async def test_a_budget_re_created_with_the_same_id_after_a_truncate_holds_only_its_own_terms(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """An operator empties the budget table (TRUNCATE: no row trigger, budget_terms keeps the versions) and loads the
    budgets again with their ids, at 100 USD. A version of the budget before (lowered to 1000 during November) stayed,
    and judged November at 1000 (0033's insert kept the old versions): 90 USD alerted nothing instead of 80 % of 100."""
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "50", thresholds=(80,))
    await change_budget(db, "UPDATE ai_organization_budgets SET amount = 1000 WHERE id = $1", budget, at=DURING)
    await db.execute("TRUNCATE ai_organization_budgets")
    await db.execute(
        "INSERT INTO ai_organization_budgets (id, organization_id, amount, thresholds) VALUES ($1, $2, 100, '{80}')",
        budget,
        org.id,
    )
    outcome = await feeder.events(spend_event(org, "90", at="2026-11-20T10:00:00Z"))
    assert [(a.amount, a.threshold, a.spend) for a in outcome.alerts] == [(Decimal(100), Decimal(80), Decimal(90))]
    versions = await db.fetch(
        "SELECT valid_from = '-infinity' AS since_ever, amount FROM budget_terms WHERE budget_id = $1", budget
    )
    assert [tuple(v) for v in versions] == [(True, Decimal(100))]


async def test_a_budget_deleted_and_created_again_with_the_same_name_alerts_as_a_new_budget(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """'Team' (100 USD a month) alerts at 80 % with 85 USD in November; it is deleted and created again with the same
    name and terms (a new id). The next November data (5 USD more: 90) alerts the new budget at 80 % once, crossing 1,
    with its own id and the month's whole spend; the deleted budget's alert stays open, not resolved, not repeated."""
    org = await make_org(db)
    insert = (
        "INSERT INTO ai_organization_budgets (id, organization_id, name, amount, thresholds) "
        "VALUES ($1, $2, 'Team', 100, '{80}')"
    )
    old, new = uuid.uuid4(), uuid.uuid4()
    await db.execute(insert, old, org.id)
    first = await feeder.events(spend_event(org, "85", at="2026-11-05T10:00:00Z", event_id="a"))
    assert [(a.budget_id, a.crossing, a.spend) for a in first.alerts] == [(old, 1, Decimal(85))]
    await db.execute("DELETE FROM ai_organization_budgets WHERE id = $1", old)
    await db.execute(insert, new, org.id)
    again = await feeder.events(spend_event(org, "5", at="2026-11-06T10:00:00Z", event_id="b"))
    assert [(a.budget_id, a.budget_name, a.crossing, a.spend, a.amount) for a in again.alerts] == [
        (new, "Team", 1, Decimal(90), Decimal(100))
    ]
    assert again.alerts[0].id != first.alerts[0].id
    stored = await db.fetch("SELECT budget_id, resolved_at FROM budget_alerts ORDER BY raised_at")
    assert [(r["budget_id"], r["resolved_at"]) for r in stored] == [(old, None), (new, None)]
    assert [m["type"] for m in await outbox_alerts(db, settings)] == ["budget.alert.triggered"] * 2


# Edits of a budget's terms: (amount, currency, thresholds, period kind, zone), each column one of two values, so that
# an edit sometimes changes nothing (no version) and sometimes changes a column back.
term_edits = st.tuples(
    st.sampled_from((Decimal(100), Decimal(1000), Decimal("100.0"))),
    st.sampled_from(("USD", "EUR")),
    st.sampled_from(((Decimal(80),), (Decimal(50), Decimal(80)))),
    st.sampled_from(("monthly", "daily")),
    st.sampled_from(("UTC", "America/New_York")),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.lists(term_edits, max_size=3),
    operator=st.lists(term_edits, max_size=3),
    after=st.lists(term_edits, max_size=2),
    recreate=st.sampled_from((None, "delete", "truncate")),
    again=term_edits,
)
async def test_the_newest_terms_are_the_budget_as_it_is_property(
    db: asyncpg.Connection,
    database_url: str,
    before: list[tuple[Any, ...]],
    operator: list[tuple[Any, ...]],
    after: list[tuple[Any, ...]],
    recreate: str | None,
    again: tuple[Any, ...],
) -> None:
    """Whatever the order budget changes are made and committed in: the platform's edits (each its own transaction)
    while an operator's transaction that started before them is open, the operator's edits after them in it, more
    edits after it committed, the budget deleted or its table truncated and the budget loaded again with its id: the
    version in force now (cost_worker_budget_terms_at, 0033) is the budget's row, column by column (0040)."""
    await db.execute("TRUNCATE ai_organization_budgets, budget_terms")
    org = await make_org(db)
    budget = uuid.uuid4()
    columns = "amount = $2, currency = $3, thresholds = $4, period = $5, timezone = $6"
    update = f"UPDATE ai_organization_budgets SET {columns} WHERE id = $1"
    await db.execute(
        "INSERT INTO ai_organization_budgets (id, organization_id, amount) VALUES ($1, $2, 100)", budget, org.id
    )
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.fetchval("SELECT now()")  # the operator's transaction starts before the platform's edits
            for edit in before:
                await db.execute(update, budget, *edit)
            for edit in operator:
                await other.execute(update, budget, *edit)
    finally:
        await other.close()
    for edit in after:
        await db.execute(update, budget, *edit)
    count = "SELECT count(*) FROM budget_terms WHERE budget_id = $1"
    kept = await db.fetchval(count, budget)
    if recreate is not None:
        # An upsert of the existing id is an edit (its INSERT trigger sees no row): the history stays.
        if recreate in ("truncate", "delete"):
            await db.execute(f"{'TRUNCATE' if recreate == 'truncate' else 'DELETE FROM'} ai_organization_budgets")
        await db.execute(
            "INSERT INTO ai_organization_budgets (id, organization_id, amount, currency, thresholds, period, "
            "timezone) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, "
            "currency = excluded.currency, thresholds = excluded.thresholds, period = excluded.period, "
            "timezone = excluded.timezone",
            budget,
            org.id,
            *again,
        )
    row = await db.fetchrow(
        "SELECT amount, currency::text, thresholds, period::text, timezone::text FROM ai_organization_budgets "
        "WHERE id = $1",
        budget,
    )
    now = await db.fetchrow(
        "SELECT amount, currency, thresholds, period, timezone "
        "FROM cost_worker_budget_terms_at('organization', $1, now())",
        budget,
    )
    assert row is not None
    assert now is not None
    assert tuple(now) == tuple(row)
    versions = await db.fetchval(count, budget)
    if recreate in ("truncate", "delete"):
        assert versions == 1  # the budget loaded again holds its own terms only
    else:
        assert versions >= kept  # an edit (an upsert's too) keeps the versions before it


# Zones whose local midnight is off the UTC hour or moves with DST: New York (a 23-hour 8 March, a 25-hour 1
# November), London (29 March, 25 October), Lord Howe (+10:30/+11: its midnight is 13:30 or 13:00 UTC, a 30-minute
# change on 5 April and 4 October), Kathmandu (+05:45: 18:15 UTC) and Chatham (+12:45/+13:45: 11:15 or 10:15 UTC).
EDGE_ZONES = {
    "America/New_York": (datetime(2026, 3, 8, 7, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC)),
    "Europe/London": (datetime(2026, 3, 29, 1, tzinfo=UTC), datetime(2026, 10, 25, 1, tzinfo=UTC)),
    "Australia/Lord_Howe": (datetime(2026, 4, 4, 15, tzinfo=UTC), datetime(2026, 10, 3, 15, tzinfo=UTC)),
    "Asia/Kathmandu": (datetime(2026, 11, 1, 18, tzinfo=UTC),),
    "Pacific/Chatham": (datetime(2026, 4, 4, 14, tzinfo=UTC), datetime(2026, 9, 26, 14, tzinfo=UTC)),
}
edge_amounts = st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(50), places=6)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    zone_and_change=st.sampled_from([(z, c) for z, changes in EDGE_ZONES.items() for c in changes]),
    kind=st.sampled_from(("daily", "daily", "weekly", "monthly")),
    estimates=st.dictionaries(st.integers(-60, 60), edge_amounts, max_size=12),
    buckets=st.dictionaries(st.integers(-360, 360), edge_amounts, max_size=10),
)
async def test_periods_off_the_utc_hour_hold_exactly_their_rows_property(
    db: asyncpg.Connection,
    zone_and_change: tuple[str, datetime],
    kind: str,
    estimates: dict[int, Decimal],
    buckets: dict[int, Decimal],
) -> None:
    """Spend is kept per instant (spend_hourly.at: an estimate's hour, a provider row's window midpoint) and read per
    period from whole UTC days and the period's edges: for periods starting and ending off the UTC hour and across
    clock changes, every period holds exactly the estimates whose hour starts in it (an hour straddling a local
    midnight counts in the period of its start) and the 10-minute cost buckets whose midpoint lies in it, as the
    independent model (tests/spend_model.py's calendar) says; the aggregate and the full computation alike."""
    zone, change = zone_and_change
    await db.execute("TRUNCATE cost_data, project_metrics CASCADE")
    await db.execute("DELETE FROM projects")
    await db.execute("DELETE FROM users")
    await db.execute("DELETE FROM organizations")
    org = await make_org(db)
    project = org.projects["proj_a"]
    hours = {change + timedelta(hours=h): amount for h, amount in estimates.items()}  # the model never replaces these
    for hour, amount in sorted(hours.items()):
        await db.execute(
            "INSERT INTO project_metrics (organization_id, project_id, hour, request_count, estimated_cost_usd) "
            "VALUES ($1, $2, $3, 1, $4)",
            org.id,
            project,
            hour,
            amount,
        )
    windows = {change + timedelta(minutes=10 * k): amount for k, amount in buckets.items()}  # distinct 10-minute slots
    for start, amount in sorted(windows.items()):
        await db.execute(
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, ai_project_id, "
            "api_version, report, bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) "
            "VALUES ($1, $2, 'openai', $3, 'proj_a', 'costs_v1', 'openai.costs', $4, $5, 'x', 'USD', $6, $7)",
            org.id,
            project,
            org.ai_org,
            start,
            start + timedelta(minutes=10),
            amount,
            start + timedelta(hours=1),
        )
    instants = [*hours, *(s + timedelta(minutes=5) for s in windows), change]
    for start, end in sorted({model_period(kind, zone, at) for at in instants}):
        wanted = sum((a for h, a in hours.items() if start <= h < end), Decimal(0)) + sum(
            (a for s, a in windows.items() if start <= s + timedelta(minutes=5) < end), Decimal(0)
        )
        for fn in ("cost_worker_spend", "cost_worker_spend_full"):
            found = await db.fetchval(
                f"SELECT spend FROM {fn}('project', $1, $2, NULL, $3, $4, 'USD')", org.id, project, start, end
            )
            assert found == wanted, (fn, zone, kind, start, end)
        database_period = await db.fetchrow(
            "SELECT * FROM cost_worker_period($1::budget_period, $2, $3)", kind, zone, start
        )
        assert database_period is not None
        assert (database_period["period_start"], database_period["period_end"]) == (start, end)


async def test_upgrading_gives_a_budget_whose_newest_version_is_not_it_a_version_now(
    empty_database_url: str, tmp_path: Path
) -> None:
    """A database where 0033's triggers left stale versions (a transaction that started before another's change and
    committed after it; a budget loaded again with its id after TRUNCATE) and a budget written with triggers off (no
    version): after 0040 the version in force now is each budget as it is, and one whose newest version already was
    gets none."""
    schema = copy_schema(tmp_path)
    later = {path: path.read_text() for path in (schema / "migrations").glob("*.sql") if path.name >= "0040"}
    for path in later:
        path.unlink()
    await migrate(empty_database_url, directory=schema)
    db = await asyncpg.connect(empty_database_url)
    try:
        org = await make_org(db)
        ordered, truncated, untracked, fine = (uuid.uuid4() for _ in range(4))
        insert = "INSERT INTO ai_organization_budgets (id, organization_id, amount) VALUES ($1, $2, $3)"
        await db.execute(insert, ordered, org.id, 100)
        await db.execute(insert, fine, org.id, 5)
        operator = await asyncpg.connect(empty_database_url)
        try:
            async with operator.transaction():
                await operator.fetchval("SELECT now()")
                await db.execute("UPDATE ai_organization_budgets SET amount = 1000 WHERE id = $1", ordered)
                await operator.execute("UPDATE ai_organization_budgets SET amount = 100 WHERE id = $1", ordered)
        finally:
            await operator.close()
        await db.execute(insert, truncated, org.id, 50)
        await db.execute("UPDATE ai_organization_budgets SET thresholds = '{80}' WHERE id = $1", truncated)
        await db.execute("CREATE TEMP TABLE kept AS SELECT * FROM ai_organization_budgets WHERE id <> $1", truncated)
        await db.execute("TRUNCATE ai_organization_budgets")
        await db.execute("INSERT INTO ai_organization_budgets SELECT * FROM kept")
        await db.execute(insert, truncated, org.id, 50)  # thresholds {50,80,100} again; the stale version says {80}
        async with db.transaction():
            await db.execute("SET LOCAL session_replication_role = replica")
            await db.execute(insert, untracked, org.id, 7)
        now_terms = "SELECT amount, thresholds FROM cost_worker_budget_terms_at('organization', $1, now())"
        assert (await db.fetchrow(now_terms, ordered))["amount"] == 1000  # type: ignore[index]
        assert (await db.fetchrow(now_terms, truncated))["thresholds"] == [Decimal(80)]  # type: ignore[index]
        assert await db.fetchrow(now_terms, untracked) is None
        for path, text in later.items():
            path.write_text(text)
        await migrate(empty_database_url, directory=schema)
        for budget in (ordered, truncated, untracked, fine):
            row = await db.fetchrow("SELECT amount, thresholds FROM ai_organization_budgets WHERE id = $1", budget)
            assert row is not None
            assert tuple(await db.fetchrow(now_terms, budget) or ()) == tuple(row), budget
        versions = "SELECT count(*) FROM budget_terms WHERE budget_id = $1"
        assert [await db.fetchval(versions, b) for b in (ordered, truncated, untracked, fine)] == [4, 3, 1, 1]
    finally:
        await db.close()
