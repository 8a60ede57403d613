"""Retention (issue 18): whole monthly partitions of API-usage detail go, rollups and the ledger stay, the months
an open budget period starts in stay, replayed quarantine rows and finished notify deliveries age out; the command
line; and a retention run while a worker drains a backlog loses nothing the rules still need."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from structlog.testing import capture_logs

from tests.factories import api_event, dumps, envelope, make_org, openai_cost_bucket
from tests.feeding import Feeder
from tests.kafka_helpers import create_topics, produce
from tests.spend_model import Estimate, Row, SpendModel, periods_overlapping
from tests.test_admin import cli
from tests.test_budgets import add_budget
from tests.test_operations import eventually
from tests.test_partitions import at, drop_legacy, partitions
from worker import retention, sql
from worker.app import Worker
from worker.config import Settings
from worker.errors import CostWorkerError
from worker.partitions import add_months, month_of

NOW = datetime.now(UTC)
CURRENT = month_of(NOW)


async def history(db: asyncpg.Connection, feeder: Feeder, months: list[date]) -> Any:
    """An organization with two events and a provider cost line in each of these months (one partition each)."""
    await drop_legacy(db)
    org = await make_org(db)
    project = org.projects["proj_a"]
    events = [api_event(org, project=project, occurred_at=at(m, day)) for m in months for day in (3, 17)]
    outcome = await feeder.events(*events)
    assert outcome.messages[(feeder.settings.topic_api_usage, "inserted")] == len(events)
    buckets = [openai_cost_bucket(f"{m}T00:00:00", f"{m}T01:00:00", [("proj_a", "x", 1)]) for m in months]
    collected = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    outcome = await feeder.buckets(envelope("openai", org.ai_org, "costs_v1", buckets, collected_at=collected))
    assert not outcome.quarantine
    return org


async def kept_state(db: asyncpg.Connection) -> tuple[Any, ...]:
    """What retention must never change: the rollups and the ledger."""
    return (
        await db.fetch("SELECT * FROM project_metrics ORDER BY hour"),
        await db.fetch("SELECT * FROM user_metrics ORDER BY hour"),
        await db.fetch("SELECT organization_id, bucket_start_time, amount FROM cost_data ORDER BY bucket_start_time"),
    )


@pytest.mark.parametrize(("role", "as_owner"), [(None, True), ("cost_worker_writer", False)])
async def test_whole_old_months_are_dropped_and_rollups_and_ledger_stay(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings, role: str | None, as_owner: bool
) -> None:
    months = [add_months(CURRENT, -k) for k in range(7, 0, -1)]
    org = await history(db, feeder, months)
    before = await kept_state(db)

    found, result = await retention.run_once(
        settings, months=3, ages=retention.Ages(30, 90), execute_plan=False, role=role, try_owner=as_owner
    )
    assert result is None
    doomed = [f"api_usage_y{m.year}m{m.month:02d}" for m in months[:4]]
    assert [p.name for p in found.drop] == doomed
    assert set(doomed) <= set(await partitions(db)), "a dry run changes nothing"
    assert "dry run: nothing changed" in retention.report(found, result)

    found, result = await retention.run_once(
        settings, months=3, ages=retention.Ages(30, 90), execute_plan=True, role=role, try_owner=as_owner
    )
    assert result is not None
    assert result.dropped == doomed
    print(
        f"\nretention ({'owner: DETACH CONCURRENTLY' if as_owner else 'writer: plain DETACH'}): "
        f"dropped 4 in {result.seconds:.3f} s"
    )
    assert result.kept_from == add_months(CURRENT, -3)
    left = await partitions(db)
    assert not set(doomed) & set(left)
    assert await db.fetchval("SELECT min(occurred_at) FROM api_usage") >= datetime.fromisoformat(at(months[4], 1))
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 6
    assert await kept_state(db) == before, "rollups and the ledger are never touched"
    assert await db.fetchval("SELECT kept_from FROM api_usage_retention") == add_months(CURRENT, -3)

    # An event of a dropped month is not counted again; one of a kept month is.
    topic = settings.topic_api_usage
    outcome = await feeder.events(
        api_event(org, occurred_at=at(months[0], 20)), api_event(org, occurred_at=at(months[5]))
    )
    assert outcome.quarantined[(topic, "invalid_timestamp")] == 1
    assert outcome.messages[(topic, "inserted")] == 1
    # Nothing left to do: a second run drops nothing.
    _, again = await retention.run_once(
        settings, months=3, ages=retention.Ages(30, 90), execute_plan=True, role=role, try_owner=as_owner
    )
    assert again is not None
    assert again.dropped == []


async def test_an_open_budget_period_keeps_the_months_it_starts_in(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    months = [add_months(CURRENT, -k) for k in range(14, 0, -1)]
    org = await history(db, feeder, months)
    await add_budget(db, "organization", org, "1000", period="yearly")
    await add_budget(db, "organization", org, "1000", period="yearly", timezone="Pacific/Kiritimati")  # UTC+14
    found, _ = await retention.run_once(
        settings, months=3, ages=retention.Ages(30, 90), execute_plan=False, role=None, try_owner=True
    )
    # The oldest open period: this year's, starting at midnight in Kiritimati (the previous day, 10:00 UTC).
    year_start = datetime(NOW.year, 1, 1, tzinfo=UTC) - timedelta(hours=14)
    assert found.oldest_open_period == year_start
    guard = datetime(year_start.year, year_start.month, 1, tzinfo=UTC)
    wanted = add_months(CURRENT, -3)
    names = {m: f"api_usage_y{m.year}m{m.month:02d}" for m in months}
    older = [m for m in months if add_months(m, 1) <= wanted]  # wholly before the kept months
    drop = [names[m] for m in older if datetime.combine(add_months(m, 1), time(), UTC) <= guard]
    kept = [names[m] for m in older if names[m] not in drop]
    assert [p.name for p in found.drop] == drop
    assert [p.name for p in found.kept_for_budgets] == kept
    assert kept, "the yearly budget holds at least this year's months before the kept ones"
    assert "keep: an open budget period" in retention.report(found, None)


async def test_replayed_quarantine_rows_age_out_and_pending_ones_stay(
    db: asyncpg.Connection, settings: Settings
) -> None:
    for offset, status, replayed_days_ago in ((1, "replayed", 40), (2, "replayed", 1), (3, "pending", None)):
        await db.execute(
            "INSERT INTO quarantine (reason, source_topic, source_partition, source_offset, payload, status, "
            "quarantined_at, replayed_at) VALUES ('unknown_project', 't', 0, $1, 'x', $2, now() - interval '100 days', "
            "now() - make_interval(days => $3))",
            offset,
            status,
            replayed_days_ago,
        )
    await db.execute("UPDATE quarantine SET replayed_at = NULL WHERE status = 'pending'")
    found, _ = await retention.run_once(
        settings, months=0, ages=retention.Ages(30, 90), execute_plan=False, role="cost_worker_writer", try_owner=False
    )
    assert found.quarantine_rows == 1
    assert not found.drop
    _, result = await retention.run_once(
        settings, months=0, ages=retention.Ages(30, 90), execute_plan=True, role="cost_worker_writer", try_owner=False
    )
    assert result is not None
    assert result.quarantine_deleted == 1
    assert sorted(r["source_offset"] for r in await db.fetch("SELECT source_offset FROM quarantine")) == [2, 3]


async def test_finished_notify_deliveries_age_out_and_pending_ones_stay(
    db: asyncpg.Connection, settings: Settings
) -> None:
    org = await make_org(db)
    destination = await db.fetchval(
        "INSERT INTO notify_destinations (organization_id, name, kind, url_origin, url_sealed) "
        "VALUES ($1, 'ops', 'slack', 'https://hooks.slack.com', '\\x00') RETURNING id",
        org.id,
    )
    # (webhook id, status, days since delivered, days since the last attempt, days since created)
    rows = [
        ("old-delivered", "delivered", 100, 100, 101),
        ("new-delivered", "delivered", 5, 5, 6),
        ("old-failed", "failed", None, 95, 120),
        ("disabled-unattempted", "failed", None, None, 200),  # its destination was disabled before any attempt
        ("old-pending", "pending", None, 150, 200),  # still the work queue: never deleted, whatever its age
    ]
    for webhook_id, status, delivered, attempted, created in rows:
        await db.execute(
            "INSERT INTO notify_deliveries (organization_id, destination_id, webhook_id, event_type, payload, status, "
            "delivered_at, last_attempt_at, created_at) VALUES ($1, $2, $3, 'budget.alert', '{}', $4, "
            "now() - make_interval(days => $5), now() - make_interval(days => $6), now() - make_interval(days => $7))",
            org.id,
            destination,
            webhook_id,
            status,
            delivered,
            attempted,
            created,
        )
    found, _ = await retention.run_once(
        settings, months=0, ages=retention.Ages(0, 90), execute_plan=False, role="cost_worker_writer", try_owner=False
    )
    assert (found.deliveries_rows, found.quarantine_cutoff) == (3, None)
    assert "notify deliveries finished before" in retention.report(found, None)
    _, result = await retention.run_once(
        settings, months=0, ages=retention.Ages(0, 90), execute_plan=True, role="cost_worker_writer", try_owner=False
    )
    assert result is not None
    assert result.deliveries_deleted == 3
    left = await db.fetch("SELECT webhook_id FROM notify_deliveries ORDER BY webhook_id")
    assert [r["webhook_id"] for r in left] == ["new-delivered", "old-pending"]
    _, again = await retention.run_once(
        settings, months=0, ages=retention.Ages(0, 0), execute_plan=True, role="cost_worker_writer", try_owner=False
    )
    assert again is not None
    assert again.deliveries_deleted == 0, "0 days keeps them"


async def test_the_command_line_plans_by_default_and_says_what_is_wrong_in_one_line(settings: Settings) -> None:
    planned = cli(settings, "retention", "--months", "3")
    assert planned.returncode == 0, planned.stderr
    assert "api_usage_legacy" in planned.stdout
    assert "dry run: nothing changed" in planned.stdout

    negative = cli(settings, "retention", "--months", "-1")
    assert negative.returncode == 2
    assert negative.stderr.strip() == "cost-worker: usage error: --months: must be 0 (keep everything) or more, not -1"

    both = cli(settings, "retention", "--execute", "--dry-run")
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr
    assert len(both.stderr.strip().splitlines()) == 1

    nowhere = settings.model_copy(
        update={"database_url": SecretStr("postgresql://nobody@127.0.0.1:1/none"), "database_connect_timeout": 2.0}
    )
    unreachable = cli(nowhere, "retention")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("cost-worker: error: ")
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert "Traceback" not in unreachable.stderr


async def test_retention_during_a_drain_loses_nothing_the_rules_still_need(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """A worker drains a backlog while retention drops the old months: every event of a kept month lands exactly
    once, the rollups of the dropped months stay as they were, and late events of dropped months are refused."""
    await drop_legacy(db)
    await create_topics(settings)
    org = await make_org(db, users=2)
    project = org.projects["proj_a"]
    old_months = [add_months(CURRENT, -k) for k in (5, 4, 3)]
    kept_months = [add_months(CURRENT, -k) for k in (2, 1)]
    old = [api_event(org, project=project, occurred_at=at(m, d, h)) for m in old_months for d in (2, 9) for h in (1, 5)]
    kept = [
        api_event(org, project=project, user=org.users[i % 2], occurred_at=at(kept_months[i % 2], 1 + i % 27, i % 24))
        for i in range(3000)
    ]
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        await produce(settings, settings.topic_api_usage, [dumps(e) for e in old])

        async def landed(n: int) -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM api_usage") == n)

        await eventually(lambda: landed(len(old)))
        old_rollups = await db.fetch(
            "SELECT hour, request_count, estimated_cost_usd FROM project_metrics WHERE hour < $1 ORDER BY hour",
            datetime(kept_months[0].year, kept_months[0].month, 1, tzinfo=UTC),
        )
        backlog = asyncio.create_task(produce(settings, settings.topic_api_usage, [dumps(e) for e in kept]))
        await eventually(lambda: _some(db, len(old) + 1))  # the worker is draining
        _, result = await retention.run_once(
            settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role=None, try_owner=True
        )
        assert result is not None
        assert len(result.dropped) == 3
        print(f"\nretention during the drain: dropped 3 partitions in {result.seconds:.3f} s (DETACH CONCURRENTLY)")
        late = [api_event(org, project=project, occurred_at=at(m, 20)) for m in old_months]
        await backlog
        await produce(settings, settings.topic_api_usage, [dumps(e) for e in late])

        async def drained() -> bool:
            quarantined = await db.fetchval("SELECT count(*) FROM quarantine")
            return bool(await landed(len(kept)) and quarantined == len(late))

        await eventually(drained, timeout=120)
    finally:
        worker.stop.set()
        assert await asyncio.wait_for(task, 60) == 0
    ids = {row["event_id"] for row in await db.fetch("SELECT event_id FROM api_usage")}
    assert ids == {e["event_id"] for e in kept}
    assert await db.fetchval("SELECT sum(request_count) FROM project_metrics") == len(old) + len(kept)
    assert await db.fetchval("SELECT sum(request_count) FROM user_metrics") == len(kept)
    assert (
        await db.fetch(
            "SELECT hour, request_count, estimated_cost_usd FROM project_metrics WHERE hour < $1 ORDER BY hour",
            datetime(kept_months[0].year, kept_months[0].month, 1, tzinfo=UTC),
        )
        == old_rollups
    )
    reasons = await db.fetch("SELECT reason FROM quarantine")
    assert {row["reason"] for row in reasons} == {"invalid_timestamp"}


async def _some(db: asyncpg.Connection, n: int) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM api_usage") >= n)


async def test_budgets_read_the_same_spend_after_retention_as_before_and_as_the_model(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """Budgets read the rollups and the ledger only: dropping the old months' detail changes no period's spend,
    in any time zone or period kind, at organization or project scope; both equal the independent model."""
    months = [add_months(CURRENT, -k) for k in range(6, -1, -1)]
    org = await history(db, feeder, [])  # no partition of the legacy table left; nothing fed yet
    project = org.projects["proj_a"]
    events, buckets, rows, estimates = [], [], [], []
    collected = NOW.replace(microsecond=0)
    for m in months:
        for day, amount in ((3, "0.25"), (17, "1.5")):
            if datetime.fromisoformat(at(m, day)) > NOW:
                continue
            events.append(api_event(org, project=project, occurred_at=at(m, day), cost=amount))
            estimates.append(
                Estimate(org.id, project, None, datetime.fromisoformat(at(m, day)), "openai", Decimal(amount))
            )
        # A cost line covering the hour of the day-3 event (it replaces that estimate) and one of its own hour.
        for day, hour, amount in ((3, 12, "2"), (1, 0, "3.125")):
            start = datetime.fromisoformat(at(m, day, hour))
            if start + timedelta(hours=1) > NOW:
                continue
            iso = start.strftime("%Y-%m-%dT%H:%M:%S")
            end = (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
            buckets.append(openai_cost_bucket(iso, end, [("proj_a", "x", amount)]))
            rows.append(
                Row(
                    org.id,
                    project,
                    "openai",
                    org.ai_org,
                    "costs",
                    "cost",
                    start,
                    start + timedelta(hours=1),
                    "x",
                    Decimal(amount),
                    collected,
                )
            )
    await feeder.events(*events)
    envelope_ = envelope(
        "openai", org.ai_org, "costs_v1", buckets, collected_at=collected.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    assert not (await feeder.buckets(envelope_)).quarantine
    await add_budget(db, "organization", org, "1000", period="monthly", timezone="Pacific/Kiritimati")
    model = SpendModel(rows, estimates, {project: ("openai", org.ai_org)})

    first = datetime.combine(months[0], time(), UTC) - timedelta(days=1)
    asked = [
        (scope, p)
        for tz in ("UTC", "Pacific/Kiritimati", "America/Los_Angeles", "Europe/Berlin")
        for kind in ("daily", "weekly", "monthly")
        for p in periods_overlapping(kind, tz, first, NOW)
        for scope in ("organization", "project")
    ]
    asked += [(scope, (first, NOW + timedelta(days=1))) for scope in ("organization", "project")]

    async def spends() -> list[Decimal]:
        found = await db.fetch(
            "SELECT ord, spend FROM cost_worker_spend_many($1::text[], $2::uuid[], $3::uuid[], $4::uuid[], "
            "$5::timestamptz[], $6::timestamptz[], $7::text[]) ORDER BY ord",
            [scope for scope, _ in asked],
            [org.id] * len(asked),
            [project if scope == "project" else None for scope, _ in asked],
            [None] * len(asked),
            [p[0] for _, p in asked],
            [p[1] for _, p in asked],
            ["USD"] * len(asked),
        )
        return [r["spend"] for r in found]

    before = await spends()
    expected = [model.spend(scope, org.id, project, None, *p) for scope, p in asked]
    assert before == expected
    assert before[-1] > 0

    found, result = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role=None, try_owner=True
    )
    assert result is not None
    assert len(result.dropped) == 4, result.dropped  # months[0..3]: the Kiritimati period keeps only this month
    assert not found.kept_for_budgets
    assert await spends() == before
    rebuilt = await asyncio.to_thread(cli, settings, "budgets", "rebuild-spend", "--organization", str(org.id))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert await spends() == before, "rebuilt from the ledger and the rollups: the same spend"


async def test_a_quarantined_event_of_a_dropped_month_stays_quarantined_on_replay_saying_why(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    months = [add_months(CURRENT, -k) for k in range(4, 0, -1)]
    org = await history(db, feeder, months)
    unknown = uuid.uuid4()
    await feeder.events(api_event(org, project=unknown, occurred_at=at(months[0], 20), cost="7"))
    before = await kept_state(db)
    _, result = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role=None, try_owner=True
    )
    assert result is not None
    assert result.kept_from == months[2]
    await db.execute("INSERT INTO projects (id, organization_id, name) VALUES ($1, $2, 'late')", unknown, org.id)
    replay = await asyncio.to_thread(cli, settings, "quarantine", "replay")
    assert replay.returncode == 0, replay.stderr
    assert "replayed 0 message(s); 1 still quarantined" in replay.stdout
    row = await db.fetchrow("SELECT reason, detail, status FROM quarantine")
    assert row is not None
    assert (row["reason"], row["status"]) == ("invalid_timestamp", "pending")
    assert f"is before {months[2].isoformat()}: retention dropped the per-request detail" in row["detail"]
    assert await kept_state(db) == before


# ---------------------------------------------------------------------------------------- interrupted runs


async def _leave_detach_pending(database_url: str, partition: str) -> None:
    """A ``DETACH PARTITION ... CONCURRENTLY`` cancelled during its wait (as when a run's connection is killed):
    a reader holds the parent, the detach marks the partition pending and waits for it, and is cancelled."""
    reader = await asyncpg.connect(database_url)
    detacher = await asyncpg.connect(database_url)
    try:
        async with reader.transaction():
            await reader.execute("SELECT count(*) FROM api_usage")
            detach = asyncio.create_task(
                detacher.execute(f"ALTER TABLE api_usage DETACH PARTITION {partition} CONCURRENTLY")
            )

            async def pending() -> bool:
                return bool(
                    await reader.fetchval(
                        "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = $1::regclass", partition
                    )
                )

            await eventually(pending)
            assert await reader.fetchval("SELECT pg_cancel_backend($1)", detacher.get_server_pid())
            with pytest.raises(asyncpg.QueryCanceledError):
                await detach
    finally:
        await reader.close()
        await detacher.close()
    assert await _pending(database_url) == [partition]


async def _pending(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT inhrelid::regclass::text AS name FROM pg_inherits "
            "WHERE inhparent = 'api_usage'::regclass AND inhdetachpending"
        )
        return [r["name"] for r in rows]
    finally:
        await conn.close()


async def _tables(db: asyncpg.Connection) -> set[str]:
    rows = await db.fetch(
        "SELECT relname::text AS name FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' "
        "AND relname ~ '^api_usage_y'"
    )
    return {r["name"] for r in rows}


def _name(month: date) -> str:
    return f"api_usage_y{month.year}m{month.month:02d}"


@pytest.mark.parametrize(("role", "as_owner"), [(None, True), ("cost_worker_writer", False)])
async def test_a_detach_left_pending_on_a_month_that_is_not_the_oldest_is_finished_by_the_next_run(
    db: asyncpg.Connection,
    feeder: Feeder,
    settings: Settings,
    database_url: str,
    role: str | None,
    as_owner: bool,
) -> None:
    """An interrupted run had moved the first month kept forward and left a later month's detach pending: the
    next run finishes it first (a pending detach makes every other ``DETACH ... CONCURRENTLY`` fail), says so, and
    drops the rest."""
    months = [add_months(CURRENT, -k) for k in range(7, 0, -1)]
    await history(db, feeder, months)
    before = await kept_state(db)
    await db.execute("SELECT cost_worker_retention_advance($1)", months[4])  # the interrupted run's first step
    await _leave_detach_pending(database_url, _name(months[2]))
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 12, "a pending partition is no longer read"

    found, result = await retention.run_once(
        settings, months=3, ages=retention.Ages(30, 90), execute_plan=False, role=role, try_owner=as_owner
    )
    assert result is None
    assert await _pending(database_url) == [_name(months[2])], "a dry run changes nothing"
    planned = found

    found, result = await retention.run_once(
        settings, months=3, ages=retention.Ages(30, 90), execute_plan=True, role=role, try_owner=as_owner
    )
    assert result is not None
    assert await _pending(database_url) == []
    assert not {_name(m) for m in months[:4]} & await _tables(db)
    assert await kept_state(db) == before
    assert result.dropped == [_name(m) for m in (months[0], months[1], months[3])]
    assert result.finished == [(_name(months[2]), "detach pending")]
    assert planned.leftovers == [retention.Leftover(_name(months[2]), "detach pending")]
    assert "detach pending: finished by --execute" in retention.report(planned, None)
    _, again = await retention.run_once(
        settings, months=3, ages=retention.Ages(30, 90), execute_plan=True, role=role, try_owner=as_owner
    )
    assert again is not None
    assert (again.dropped, again.finished) == ([], [])


async def test_a_pending_detach_of_a_month_a_budget_now_needs_is_finished_not_reattached(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings, database_url: str
) -> None:
    """The run that chose the month moved the first month kept past it (its events are refused since), and a
    pending partition is no longer read through api_usage: a budget made since then does not bring it back (budgets
    read the rollups and the ledger only), and the later owner runs are not stuck behind it."""
    months = [add_months(CURRENT, -k) for k in range(4, 0, -1)]
    org = await history(db, feeder, months)
    before = await kept_state(db)
    await db.execute("SELECT cost_worker_retention_advance($1)", months[2])
    await _leave_detach_pending(database_url, _name(months[1]))
    await add_budget(db, "organization", org, "1000", period="yearly", timezone="Pacific/Kiritimati")
    found, result = await retention.run_once(
        settings, months=1, ages=retention.Ages(30, 90), execute_plan=True, role="cost_worker_writer", try_owner=False
    )
    assert result is not None
    assert await _pending(database_url) == []
    assert _name(months[1]) not in await _tables(db)
    assert await kept_state(db) == before
    assert result.finished == [(_name(months[1]), "detach pending")]
    # Months kept for the budget and never started on stay (attached, read through api_usage).
    if months[0].year == CURRENT.year and months[0].month > 1:
        assert _name(months[0]) in {p.name for p in found.kept_for_budgets}
        assert _name(months[0]) in await partitions(db)


async def test_a_table_detached_but_not_dropped_is_dropped_by_the_next_run_and_a_human_one_never(
    db: asyncpg.Connection,
    feeder: Feeder,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The connection dies between the detach and the drop: the next run (the worker's, as the writer) drops the
    table it detached, and reports it; a table a human made under a partition's name is never dropped, only named."""
    months = [add_months(CURRENT, -k) for k in range(5, 0, -1)]
    await history(db, feeder, months)
    before = await kept_state(db)
    real_query = sql.query
    drops = []

    def dying(name: str) -> str:  # the process dies right where it would drop the second detached table
        if name == "retention_finish_drop":
            drops.append(name)
            if len(drops) == 2:
                return "SELECT pg_terminate_backend(pg_backend_pid())"
        return real_query(name)

    monkeypatch.setattr(retention, "query", dying)
    with pytest.raises(CostWorkerError):
        await retention.run_once(
            settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role=None, try_owner=True
        )
    monkeypatch.setattr(retention, "query", real_query)
    left = _name(months[1])
    assert left in await _tables(db), "detached, not dropped"
    assert left not in await partitions(db)
    assert _name(months[0]) not in await _tables(db)
    # A human's copy, named like a partition retention would drop: never retention's to drop.
    human = _name(add_months(months[0], -2))
    await db.execute(f"CREATE TABLE {human} (LIKE api_usage)")
    with pytest.raises(asyncpg.RaiseError, match="not a table retention detached"):
        await db.execute("SELECT cost_worker_retention_finish_drop($1)", human)

    planned, _ = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=False, role="cost_worker_writer", try_owner=False
    )
    resumed_before = _sample("cost_worker_retention_resumed_total", {"state": "detached"})
    found, result = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role="cost_worker_writer", try_owner=False
    )
    assert result is not None
    assert _sample("cost_worker_retention_resumed_total", {"state": "detached"}) == resumed_before + 1
    assert _sample("cost_worker_retention_tables_left_alone", {}) == 1
    assert await _tables(db) & {left, human} == {human}
    assert await kept_state(db) == before
    assert result.dropped == [_name(months[2])]
    assert result.finished == [(left, "detached, not dropped")]
    assert planned.leftovers == [
        retention.Leftover(human, "not detached by retention: left alone"),
        retention.Leftover(left, "detached, not dropped"),
    ]
    report = retention.report(found, result)
    assert f"{human}: not detached by retention: left alone" in report
    _, again = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role="cost_worker_writer", try_owner=False
    )
    assert again is not None
    assert again.finished == []
    assert human in await _tables(db)


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_two_runs_at_once_are_serialized(db: asyncpg.Connection, settings: Settings) -> None:
    """The worker's periodic run and the CLI: the second one is refused while the first holds the lock."""
    holder = await asyncpg.connect(settings.dsn())
    try:
        assert await holder.fetchval(sql.query("retention_try_lock"))
        with pytest.raises(retention.Busy):
            await retention.run_once(
                settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role=None, try_owner=True
            )
        busy = await asyncio.to_thread(cli, settings, "retention", "--execute")
        assert busy.returncode == 1
        assert "another retention run holds the lock" in busy.stderr
    finally:
        await holder.close()


async def test_a_detach_a_human_left_pending_is_left_alone_and_the_owner_run_still_drops(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings, database_url: str
) -> None:
    """A detach pending on a month retention keeps was not started by retention: it is not finished (a human
    decides), it is reported, and the owner's run, whose concurrent detaches would all fail behind it, detaches the
    old months plainly instead."""
    months = [add_months(CURRENT, -k) for k in range(6, 0, -1)]
    await history(db, feeder, months)
    kept = _name(months[4])
    await _leave_detach_pending(database_url, kept)
    found, result = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role=None, try_owner=True
    )
    assert result is not None
    assert result.dropped == [_name(m) for m in months[:4]]
    assert result.finished == []
    assert await _pending(database_url) == [kept]
    assert found.leftovers == [retention.Leftover(kept, retention.FOREIGN_PENDING)]
    assert f"{kept}: {retention.FOREIGN_PENDING}" in retention.report(found, result)


@pytest.mark.parametrize(("role", "as_owner"), [(None, True), ("cost_worker_writer", False)])
async def test_the_partition_from_the_start_goes_with_the_months_after_it(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings, role: str | None, as_owner: bool
) -> None:
    """The table of before 0011 starts at MINVALUE (read back as a naive datetime.min): dropped first, in order."""
    months = [add_months(CURRENT, -k) for k in range(4, 0, -1)]
    await history(db, feeder, months)
    async with db.transaction():
        await db.execute("SET LOCAL ROLE cost_worker_owner")
        await db.execute(
            "CREATE TABLE api_usage_legacy PARTITION OF api_usage "
            f"FOR VALUES FROM (MINVALUE) TO ('{months[0].isoformat()} 00:00:00+00')"
        )
    _, result = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role=role, try_owner=as_owner
    )
    assert result is not None
    assert result.dropped == ["api_usage_legacy", _name(months[0]), _name(months[1])]


async def test_a_drop_that_fails_holds_back_neither_the_months_ahead_nor_the_aged_rows(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings, database_url: str
) -> None:
    """The plain DETACH queues at most 5 s behind a long reader, then the run fails (the next one tries again): the
    partitions ahead are made and the aged rows deleted all the same."""
    months = [add_months(CURRENT, -k) for k in range(4, 0, -1)]
    await history(db, feeder, months)
    ahead = _name(add_months(CURRENT, 2))
    await db.execute(f"ALTER TABLE api_usage DETACH PARTITION {ahead}")
    await db.execute(f"DROP TABLE {ahead}")
    await db.execute(
        "INSERT INTO quarantine (reason, source_topic, source_partition, source_offset, payload, status, replayed_at) "
        "VALUES ('unknown_project', 't', 0, 1, 'x', 'replayed', now() - interval '40 days')"
    )
    reader = await asyncpg.connect(database_url)
    try:
        async with reader.transaction():
            await reader.execute("SELECT count(*) FROM api_usage")
            with pytest.raises(CostWorkerError, match="lock"):
                await retention.run_once(
                    settings,
                    months=2,
                    ages=retention.Ages(30, 90),
                    execute_plan=True,
                    role="cost_worker_writer",
                    try_owner=False,
                )
    finally:
        await reader.close()
    assert ahead in await partitions(db)
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    _, result = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role="cost_worker_writer", try_owner=False
    )
    assert result is not None
    assert result.dropped == [_name(months[0]), _name(months[1])]


async def test_a_run_killed_while_its_concurrent_detach_waits_is_finished_by_the_workers_next_run(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings, database_url: str
) -> None:
    """The owner's run (the CLI) is killed while its DETACH ... CONCURRENTLY waits for a long reader: the worker's
    next run (as the writer) drops that month, then the rest."""
    months = [add_months(CURRENT, -k) for k in range(5, 0, -1)]
    await history(db, feeder, months)
    before = await kept_state(db)
    reader = await asyncpg.connect(database_url)
    try:
        async with reader.transaction():
            await reader.execute("SELECT count(*) FROM api_usage")
            run = asyncio.create_task(
                retention.run_once(
                    settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role=None, try_owner=True
                )
            )

            async def waiting() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query LIKE '%ALTER TABLE api_usage DETACH PARTITION % CONCURRENTLY%' "
                        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                    )
                )

            await eventually(waiting)
            with pytest.raises(CostWorkerError):
                await run
    finally:
        await reader.close()
    assert await _pending(database_url) == [_name(months[0])]
    _, result = await retention.run_once(
        settings, months=2, ages=retention.Ages(30, 90), execute_plan=True, role="cost_worker_writer", try_owner=False
    )
    assert result is not None
    assert result.finished == [(_name(months[0]), "detach pending")]
    assert result.dropped == [_name(months[1]), _name(months[2])]
    assert await _pending(database_url) == []
    assert not {_name(m) for m in months[:3]} & await _tables(db)
    assert await db.fetchval("SELECT count(*) FROM api_usage_retention_drops") == 0
    assert await kept_state(db) == before


async def test_the_workers_periodic_run_finishes_a_leftover_and_logs_it_and_the_table_left_alone(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings, database_url: str
) -> None:
    months = [add_months(CURRENT, -k) for k in range(4, 0, -1)]
    await history(db, feeder, months)
    await db.execute("SELECT cost_worker_retention_advance($1)", months[2])
    await _leave_detach_pending(database_url, _name(months[1]))
    human = _name(add_months(months[0], -3))
    await db.execute(f"CREATE TABLE {human} (LIKE api_usage)")
    periodic = settings.model_copy(update={"retention_interval": 3600.0, "api_usage_retention_months": 2})
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(retention.run_periodically(periodic, stop))

        async def finished() -> bool:
            return not await _pending(database_url)

        await eventually(finished)
        await eventually(lambda: _true(any(e["event"] == "retention_run" for e in logs)))
        stop.set()
        await asyncio.wait_for(task, 10)
    events = {e["event"]: e for e in logs}
    assert events["retention_interrupted_run_finished"]["partition"] == _name(months[1])
    assert events["retention_interrupted_run_finished"]["log_level"] == "warning"
    assert events["retention_table_left_alone"]["table"] == human
    assert events["retention_run"]["finished"] == [(_name(months[1]), "detach pending")]
    assert events["retention_run"]["dropped"] == [_name(months[0])]
    assert human in await _tables(db)


async def _true(value: bool) -> bool:
    return value


async def test_a_detach_left_pending_is_dropped_while_a_long_transaction_elsewhere_holds_an_old_snapshot(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings, database_url: str
) -> None:
    """A session idle in a transaction, a long report elsewhere: ``DETACH ... FINALIZE`` waits for every older
    snapshot in the database, whatever it reads, and failed at the 5 s lock_timeout, run after run; a DROP does
    not."""
    months = [add_months(CURRENT, -k) for k in range(4, 0, -1)]
    await history(db, feeder, months)
    await db.execute("SELECT cost_worker_retention_advance($1)", months[2])
    await _leave_detach_pending(database_url, _name(months[1]))
    backup = await asyncpg.connect(database_url)
    try:
        async with backup.transaction(isolation="repeatable_read", readonly=True):
            await backup.fetchval("SELECT 1")  # a snapshot, no lock on any table
            started = asyncio.get_running_loop().time()
            _, result = await retention.run_once(
                settings,
                months=2,
                ages=retention.Ages(30, 90),
                execute_plan=True,
                role="cost_worker_writer",
                try_owner=False,
            )
            took = asyncio.get_running_loop().time() - started
    finally:
        await backup.close()
    assert result is not None
    assert result.finished == [(_name(months[1]), "detach pending")]
    assert result.dropped == [_name(months[0])]
    assert took < 4, took
