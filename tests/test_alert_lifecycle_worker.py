"""Currencies and the alert lifecycle through the real worker: the broker in, the alerts topic out; rates
loaded and budgets inspected with the real CLI."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from tests.factories import Org, change_budget, dumps, envelope, make_org, openai_cost_bucket
from tests.kafka_helpers import consume_all, create_topics, produce, run_worker
from tests.test_admin import cli
from worker.config import Settings

ECB_FILE = Path(__file__).resolve().parent / "fixtures" / "rates" / "eurofxref-hist-2026-11.csv"


async def budget(db: asyncpg.Connection, org: Org, amount: str, currency: str, thresholds: list[int]) -> uuid.UUID:
    budget_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO ai_project_budgets (id, organization_id, project_id, name, amount, currency, thresholds) "
        "VALUES ($1, $2, $3, 'Assistant', $4, $5, $6)",
        budget_id,
        org.id,
        org.projects["proj_a"],
        Decimal(amount),
        currency,
        [Decimal(t) for t in thresholds],
    )
    return budget_id


async def costs(settings: Settings, org: Org, day: str, following: str, amount: str, collected_at: str) -> None:
    """One revision of the project's OpenAI cost bucket for ``day`` (USD), through the broker."""
    page = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket(day, following, [("proj_a", "completions", amount)])],
        collected_at=collected_at,
    )
    await produce(settings, settings.topic_provider_buckets, [dumps(page)], keys=[org.ai_org.encode()])
    assert await run_worker(settings) == 0


async def messages(settings: Settings, expect: int) -> list[dict[str, Any]]:
    records = await consume_all(settings, settings.topic_budget_alerts, expect=expect)
    return [json.loads(r.value) | {"_key": r.key.decode()} for r in records]


async def test_eur_budget_converts_usd_costs_at_the_ecb_rate(db: asyncpg.Connection, settings: Settings) -> None:
    await create_topics(settings)
    org = await make_org(db)
    budget_id = await budget(db, org, "100", "EUR", [50, 100])
    loaded = await asyncio.to_thread(cli, settings, "rates", "import", str(ECB_FILE))
    assert loaded.returncode == 0, loaded.stderr
    assert "60 rate(s) of 6 pair(s), 2026-11-02 .. 2026-11-13, source ECB: 60 new" in loaded.stdout
    again = await asyncio.to_thread(cli, settings, "rates", "import", str(ECB_FILE))
    assert "0 new, 0 changed, 60 unchanged" in again.stdout
    listed = await asyncio.to_thread(cli, settings, "rates", "list", "--quote", "usd")  # any case, as in files
    assert "EUR   USD    2026-11-02  2026-11-13  10    1.2500" in listed.stdout
    # 54 USD on 3 November, when 1 EUR = 1.08 USD: 50 EUR, 50 % of the budget.
    await costs(settings, org, "2026-11-03", "2026-11-04", "54.00", "2026-11-04T06:00:00Z")
    (alert,) = await messages(settings, 1)
    assert alert["_key"] == str(budget_id)
    assert (alert["type"], alert["threshold_percent"], alert["spend"], alert["amount"], alert["currency"]) == (
        "budget.alert.triggered",
        "50",
        "50",
        "100",
        "EUR",
    )
    assert alert["percent_used"] == "50.00"


async def test_eur_budget_without_a_rate_is_unconvertible_and_never_alerts(
    db: asyncpg.Connection, settings: Settings
) -> None:
    await create_topics(settings)
    org = await make_org(db)
    await budget(db, org, "10", "EUR", [50])
    # Far over the budget in USD, but no EUR rate has been loaded at all.
    await costs(settings, org, "2026-11-03", "2026-11-04", "500", "2026-11-04T06:00:00Z")
    assert await db.fetchval("SELECT count(*) FROM budget_alerts") == 0
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0
    spend = await db.fetchrow(
        "SELECT spend, missing_rates FROM cost_worker_spend('project', $1, $2, NULL, "
        "'2026-11-01Z', '2026-12-01Z', 'EUR')",
        org.id,
        org.projects["proj_a"],
    )
    assert spend is not None
    assert spend["spend"] is None  # never shown as 0
    assert json.loads(spend["missing_rates"]) == {"USD": {"rows": 1, "first": "2026-11-03", "last": "2026-11-03"}}
    # The same in the running period, as `budgets status` shows it: unconvertible, and which rate is missing.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    await costs(
        settings,
        org,
        today.strftime("%Y-%m-%d"),
        (today + timedelta(days=1)).strftime("%Y-%m-%d"),
        "7",
        datetime.now(UTC).isoformat(),
    )
    status = await asyncio.to_thread(cli, settings, "budgets", "status", "--organization", str(org.id))
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if "Assistant" in line)
    assert "unconvertible / 10 EUR" in line
    assert f"missing USD->EUR {today:%Y-%m-%d}..{today:%Y-%m-%d} (1 rows)" in line
    assert await db.fetchval("SELECT count(*) FROM budget_alerts") == 0


async def test_raising_a_budget_from_100_to_200_re_arms_its_thresholds(
    db: asyncpg.Connection, settings: Settings
) -> None:
    await create_topics(settings)
    org = await make_org(db)
    budget_id = await budget(db, org, "100", "USD", [80])
    await costs(settings, org, "2026-11-03", "2026-11-04", "85", "2026-11-04T06:00:00Z")
    # Raised during November (the period, which has ended by now, is judged by the terms in force at its end).
    await change_budget(
        db, "UPDATE ai_project_budgets SET amount = 200 WHERE id = $1", budget_id, at=datetime(2026, 11, 4, tzinfo=UTC)
    )
    await costs(settings, org, "2026-11-04", "2026-11-05", "75", "2026-11-05T06:00:00Z")  # 160: 80 % of 200
    first, second = await messages(settings, 2)
    assert (first["amount"], first["spend"], second["amount"], second["spend"]) == ("100", "85", "200", "160")
    assert first["threshold_percent"] == second["threshold_percent"] == "80"
    assert first["alert_id"] != second["alert_id"]


async def test_a_revision_that_lowers_spend_resolves_and_a_new_crossing_alerts_again(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    await create_topics(settings)
    org = await make_org(db)
    budget_id = await budget(db, org, "100", "USD", [80])
    await costs(settings, org, "2026-11-03", "2026-11-04", "85", "2026-11-04T06:00:00Z")
    await costs(settings, org, "2026-11-03", "2026-11-04", "50", "2026-11-05T06:00:00Z")  # the provider corrects
    await costs(settings, org, "2026-11-03", "2026-11-04", "50", "2026-11-05T06:00:00Z")  # the same revision again
    await costs(settings, org, "2026-11-03", "2026-11-04", "90", "2026-11-06T06:00:00Z")  # and then spend rises
    triggered, resolved, again = await messages(settings, 3)
    assert [m["type"] for m in (triggered, resolved, again)] == [
        "budget.alert.triggered",
        "budget.alert.resolved",
        "budget.alert.triggered",
    ]
    assert {m["_key"] for m in (triggered, resolved, again)} == {str(budget_id)}
    assert resolved["alert_id"] == triggered["alert_id"]
    assert (resolved["spend"], resolved["percent_used"], resolved["crossing"]) == ("50", "50.00", 1)
    assert again["alert_id"] != triggered["alert_id"]
    assert again["crossing"] == 2
    rows = await db.fetch("SELECT id, crossing, resolved_at FROM budget_alerts ORDER BY crossing")
    assert [(str(r["id"]), r["crossing"], r["resolved_at"] is not None) for r in rows] == [
        (triggered["alert_id"], 1, True),
        (again["alert_id"], 2, False),
    ]
    status = await asyncio.to_thread(cli, settings, "budgets", "status", "--organization", str(org.id))
    assert status.returncode == 0, status.stderr
    assert "Assistant" in status.stdout


async def test_rates_import_reports_every_problem_and_loads_nothing(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "eurofxref.csv"
    bad.write_text("Date,USD,GBP,\n2026-11-03,1.08,0.87,\n2026-11-04,-1,0.87,\nlater,1.08,0.87,\n")
    result = await asyncio.to_thread(cli, settings, "rates", "import", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "cost-worker: config error: line 3, USD: rate out of range: '-1' (must be > 0 and < 1e12)",
        "cost-worker: config error: line 4: not a date: 'later' (expected 2026-11-27 or 27 November 2026)",
    ]
    assert await db.fetchval("SELECT count(*) FROM exchange_rates") == 0
    missing = await asyncio.to_thread(cli, settings, "rates", "import", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("date,base,quote,rate\n2026-11-03,USD,GBP,0.79\n")
    loaded = await asyncio.to_thread(cli, settings, "rates", "import", "--format", "pairs", str(pairs))
    assert loaded.returncode == 0, loaded.stderr
    assert "source pairs.csv: 1 new" in loaded.stdout


def last_month(day: int) -> str:
    """A day of the month before the running one (UTC), as YYYY-MM-DD: a period that has ended."""
    first = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first - timedelta(days=1)).replace(day=day).strftime("%Y-%m-%d")


async def test_late_data_of_an_ended_month_is_judged_by_the_amount_in_force_then(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """1000 USD a month, 400 spent last month (no alert); lowered to 100 this month. Last month's late 100 USD make
    500: 50 % of the 1000 in force when that month ended (one alert), not 500 % of today's 100 (three)."""
    await create_topics(settings)
    org = await make_org(db)
    budget_id = await budget(db, org, "1000", "USD", [50, 80, 100])
    await costs(settings, org, last_month(3), last_month(4), "400", f"{last_month(4)}T06:00:00Z")
    assert await db.fetchval("SELECT count(*) FROM budget_alerts") == 0
    await db.execute("UPDATE ai_project_budgets SET amount = 100 WHERE id = $1", budget_id)
    await costs(settings, org, last_month(5), last_month(6), "100", datetime.now(UTC).isoformat())
    (alert,) = await messages(settings, 1)
    assert (alert["threshold_percent"], alert["spend"], alert["amount"], alert["currency"]) == (
        "50",
        "500",
        "1000",
        "USD",
    )
    assert alert["period_start"].startswith(last_month(1))
    assert await db.fetchval("SELECT count(*) FROM budget_alerts") == 1


async def test_late_data_of_an_ended_month_alerts_at_the_lower_amount_in_force_then(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """The reverse: 100 USD a month, 40 spent last month; raised to 1000 this month. Last month's late 45 USD make 85:
    50 % and 80 % of the 100 in force then (8.5 % of today's 1000 alerted nothing)."""
    await create_topics(settings)
    org = await make_org(db)
    budget_id = await budget(db, org, "100", "USD", [50, 80, 100])
    await costs(settings, org, last_month(3), last_month(4), "40", f"{last_month(4)}T06:00:00Z")
    await db.execute("UPDATE ai_project_budgets SET amount = 1000 WHERE id = $1", budget_id)
    await costs(settings, org, last_month(5), last_month(6), "45", datetime.now(UTC).isoformat())
    alerts = await messages(settings, 2)
    assert sorted((a["threshold_percent"], a["spend"], a["amount"]) for a in alerts) == [
        ("50", "85", "100"),
        ("80", "85", "100"),
    ]
    # This month is judged by today's amount, as before: 85 USD more now is 8.5 % of 1000, nothing.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    await costs(
        settings,
        org,
        today.strftime("%Y-%m-%d"),
        (today + timedelta(days=1)).strftime("%Y-%m-%d"),
        "85",
        datetime.now(UTC).isoformat(),
    )
    assert len(await messages(settings, 2)) == 2
    assert await db.fetchval("SELECT count(*) FROM budget_alerts") == 2
