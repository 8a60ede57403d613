"""Budgets in any currency, and alerts that follow the budget (re-armed on change, resolved when spend falls).

The database's conversion, spend, alerts and resolved messages are compared with the independent Decimal model
in ``tests/currency_model.py``; the rates importer is checked on ECB-format fixtures.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import currency_model as model
from tests.factories import Org, change_budget, make_org
from tests.test_migrate import copy_schema
from worker import metrics
from worker.alerts import Alert, Resolution
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.errors import ConfigError
from worker.migrate import migrate
from worker.rates import parse
from worker.store import Database
from worker.touches import Touch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rates"
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
DECEMBER = datetime(2026, 12, 1, tzinfo=UTC)
SWEEP_AT = datetime(2026, 11, 20, tzinfo=UTC)  # inside November: the sweep evaluates November


# ------------------------------------------------------------------------------------------ the importer


def test_ecb_history_file_is_read_as_eur_rates() -> None:
    rates = parse((FIXTURES / "eurofxref-hist-2026-11.csv").read_text())
    by_key = {(r.base, r.quote, r.effective_date): r.rate for r in rates}
    assert by_key[("EUR", "USD", date(2026, 11, 3))] == Decimal("1.0800")
    assert by_key[("EUR", "JPY", date(2026, 11, 13))] == Decimal("165.12")
    assert {r.base for r in rates} == {"EUR"}
    assert not any(r.quote == "CYP" for r in rates)  # N/A cells are no rate, not an error
    assert len(rates) == 10 * 6


def test_ecb_daily_file_with_spelled_out_date() -> None:
    rates = parse((FIXTURES / "eurofxref-daily.csv").read_text())
    assert {(r.quote, r.effective_date, r.rate) for r in rates} >= {("USD", date(2026, 11, 13), Decimal("1.2500"))}
    assert len(rates) == 4


def test_an_empty_cell_in_the_last_column_is_no_rate_not_a_broken_line() -> None:
    """The ECB ends every line with a comma. Every trailing empty cell was dropped as that comma, so an empty cell of
    the last currency (no rate that day, like N/A) left the line a cell short and rejected the whole file."""
    rates = parse("Date,USD,ZAR,\n2026-11-27,1.08,,\n2026-11-26,1.07,20.1,\n")
    assert sorted((r.quote, r.effective_date, r.rate) for r in rates) == [
        ("USD", date(2026, 11, 26), Decimal("1.07")),
        ("USD", date(2026, 11, 27), Decimal("1.08")),
        ("ZAR", date(2026, 11, 26), Decimal("20.1")),
    ]
    without_the_comma = parse("Date,USD,ZAR\n2026-11-27,1.08,\n")
    assert [(r.quote, r.rate) for r in without_the_comma] == [("USD", Decimal("1.08"))]


def test_pairs_format() -> None:
    rates = parse("date,base,quote,rate\n2026-11-03,usd,GBP,0.79\n2026-11-04,USD,GBP,0.8\n", "pairs")
    assert [(r.base, r.quote, r.effective_date, r.rate) for r in rates] == [
        ("USD", "GBP", date(2026, 11, 3), Decimal("0.79")),
        ("USD", "GBP", date(2026, 11, 4), Decimal("0.8")),
    ]


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    text = "Date,USD,usd,GBP,\n2026-11-03,1.08,1,0,\nyesterday,1.08,1,1,\n2026-11-04,NaN,1,abc,\n2026-11-05,1,\n"
    with pytest.raises(ConfigError) as caught:
        parse(text)
    problems = caught.value.problems
    assert "line 1: not a currency code: 'usd'" in problems
    assert any(p.startswith("line 2, GBP: rate out of range") for p in problems)
    assert any(p.startswith("line 3: not a date") for p in problems)
    assert any(p.startswith("line 4, USD: rate out of range") for p in problems)
    assert any(p.startswith("line 4, GBP: not a number") for p in problems)
    assert "line 5: 2 cells, the header has 4" in problems
    with pytest.raises(ConfigError, match="Date"):
        parse("day,USD\n2026-11-03,1\n")
    with pytest.raises(ConfigError, match="given twice"):
        parse("date,base,quote,rate\n2026-11-03,USD,GBP,0.79\n2026-11-03,USD,GBP,0.8\n", "pairs")


# ------------------------------------------------------------------------------------------ messages


def sample_alert(**changes: Any) -> Alert:
    fields: dict[str, Any] = {
        "scope": "project",
        "budget_id": uuid.UUID(int=7),
        "budget_name": "Assistant",
        "organization_id": uuid.UUID(int=1),
        "project_id": uuid.UUID(int=2),
        "user_id": None,
        "period": "monthly",
        "timezone": "Europe/Berlin",
        "period_start": datetime(2026, 10, 31, 23, tzinfo=UTC),
        "period_end": datetime(2026, 11, 30, 23, tzinfo=UTC),
        "threshold": Decimal(80),
        "spend": Decimal("160.50"),
        "amount": Decimal(200),
        "currency": "EUR",
        "raised_at": datetime(2026, 11, 20, 10, tzinfo=UTC),
    }
    return Alert(**(fields | changes))


def test_the_alert_id_names_amount_currency_and_crossing() -> None:
    base = sample_alert()
    assert base.id == model.alert_id(
        "project", uuid.UUID(int=7), base.period_start, Decimal(80), Decimal(200), "EUR", 1
    )
    others = {
        sample_alert(amount=Decimal(100)).id,
        sample_alert(currency="USD").id,
        sample_alert(crossing=2).id,
        sample_alert(threshold=Decimal(100)).id,
    }
    assert base.id not in others
    assert len(others) == 4
    assert sample_alert(amount=Decimal("200.00"), spend=Decimal(1)).id == base.id  # same budget, same crossing


def test_triggered_and_resolved_messages() -> None:
    alert = sample_alert()
    triggered = json.loads(alert.message())
    assert triggered["type"] == "budget.alert.triggered"
    assert (triggered["alert_id"], triggered["crossing"]) == (str(alert.id), 1)
    assert (triggered["spend"], triggered["amount"], triggered["currency"]) == ("160.50", "200", "EUR")
    assert triggered["period_start"] == "2026-11-01T00:00:00+01:00"
    resolution = Resolution(alert.id, alert, Decimal("99.995"), datetime(2026, 11, 21, tzinfo=UTC))
    resolved = json.loads(resolution.message())
    assert resolution.key == alert.key == str(alert.budget_id).encode()
    assert resolution.delivery_id == f"{alert.id}:resolved"
    assert resolved == triggered | {
        "type": "budget.alert.resolved",
        "spend": "99.995",
        "percent_used": "50.00",  # 49.9975 rounded half-even at display
        "resolved_at": "2026-11-21T00:00:00+00:00",
    }


# ------------------------------------------------------------------------------------------ conversion


async def load_rates(db: asyncpg.Connection, rates: model.Rates) -> None:
    await db.execute("DELETE FROM exchange_rates")
    await db.executemany(
        "INSERT INTO exchange_rates (base, quote, effective_date, rate, source) VALUES ($1, $2, $3, $4, 'test')",
        [(b, q, d, r) for (b, q, d), r in rates.items()],
    )


CURRENCIES = ("USD", "EUR", "GBP", "JPY")
DAYS = [date(2026, 11, 1) + timedelta(days=n) for n in range(28)]

rate_values = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("500"), places=4)
rate_tables = st.dictionaries(
    st.tuples(st.sampled_from(CURRENCIES), st.sampled_from(CURRENCIES), st.sampled_from(DAYS[::3])).filter(
        lambda k: k[0] != k[1]
    ),
    rate_values,
    max_size=12,
)
money = st.decimals(min_value=Decimal("-5"), max_value=Decimal("80"), places=6)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rates=rate_tables, frm=st.sampled_from(CURRENCIES), to=st.sampled_from(CURRENCIES), amount=money)
async def test_conversion_equals_the_model(
    db: asyncpg.Connection, rates: model.Rates, frm: str, to: str, amount: Decimal
) -> None:
    await load_rates(db, rates)
    for day in DAYS[::2]:
        row = await db.fetchrow(
            "SELECT f.num, f.den, cost_worker_convert($4::numeric, f.num, f.den) AS converted "
            "FROM cost_worker_rate_factor($1, $2, $3) f",
            frm,
            to,
            day,
            amount,
        )
        wanted = model.factor(rates, frm, to, day)
        if wanted is None:
            assert row is None, (frm, to, day)
            continue
        assert row is not None, (frm, to, day)
        assert (row["num"], row["den"]) == wanted
        assert row["converted"] == model.convert(amount, *wanted)


# ------------------------------------------------------------------------------------------ the lifecycle


async def add_project_budget(
    db: asyncpg.Connection,
    org: Org,
    amount: Decimal,
    currency: str,
    thresholds: tuple[Decimal, ...],
    period: str = "monthly",
    timezone: str = "UTC",
) -> uuid.UUID:
    budget = uuid.uuid4()
    await db.execute(
        "INSERT INTO ai_project_budgets (id, organization_id, project_id, amount, currency, thresholds, period, "
        "timezone) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        budget,
        org.id,
        org.projects["proj_a"],
        amount,
        currency,
        list(thresholds),
        period,
        timezone,
    )
    return budget


async def write_ledger(db: asyncpg.Connection, org: Org, rows: dict[tuple[date, int], tuple[str, Decimal]]) -> None:
    """The project's provider cost rows, as the newest revision of each daily window says (one line each)."""
    await db.execute("DELETE FROM cost_data WHERE organization_id = $1", org.id)
    for (day, line), (currency, amount) in sorted(rows.items()):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        await db.execute(
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, ai_project_id, "
            "api_version, report, bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) "
            "VALUES ($1, $2, 'openai', $3, 'proj_a', 'costs_v1', 'openai.costs', $4, $5, $6, $7, $8, $9)",
            org.id,
            org.projects["proj_a"],
            org.ai_org,
            start,
            start + timedelta(days=1),
            f"line-{line}",
            currency,
            amount,
            start + timedelta(days=1, hours=2),
        )


async def write_estimates(db: asyncpg.Connection, org: Org, estimates: dict[datetime, Decimal]) -> None:
    """The project's hourly estimate (USD) from API-usage events of a model of no known provider: never replaced
    by provider rows, so it always counts, converted at its hour's rate."""
    await db.execute("DELETE FROM project_metrics WHERE organization_id = $1", org.id)
    for hour, amount in sorted(estimates.items()):
        await db.execute(
            "INSERT INTO project_metrics (organization_id, project_id, hour, request_count, estimated_cost_usd) "
            "VALUES ($1, $2, $3, 1, $4)",
            org.id,
            org.projects["proj_a"],
            hour,
            amount,
        )


def model_rows(
    rows: dict[tuple[date, int], tuple[str, Decimal]],
    estimates: dict[datetime, Decimal] | None = None,
    within: tuple[datetime, datetime] = (NOVEMBER, DECEMBER),
) -> list[model.Row]:
    """The rows that count in the period ``within``: a daily provider row in the period of its window's midpoint
    (noon UTC), an estimate in its hour's; each converted at its window start's or its hour's rate."""
    start, end = within
    return [
        model.Row(currency, datetime(day.year, day.month, day.day, tzinfo=UTC), amount)
        for (day, _), (currency, amount) in rows.items()
        if start <= datetime(day.year, day.month, day.day, 12, tzinfo=UTC) < end
    ] + [model.Row("USD", hour, amount) for hour, amount in (estimates or {}).items() if start <= hour < end]


async def spend_of(
    db: asyncpg.Connection, org: Org, currency: str, within: tuple[datetime, datetime] = (NOVEMBER, DECEMBER)
) -> tuple[Decimal | None, dict[str, Any]]:
    row = await db.fetchrow(
        "SELECT spend, missing_rates FROM cost_worker_spend('project', $1, $2, NULL, $3, $4, $5)",
        org.id,
        org.projects["proj_a"],
        *within,
        currency,
    )
    assert row is not None
    return row["spend"], json.loads(row["missing_rates"])


async def touch(
    database: Database, engine: BudgetEngine, org: Org, touched: list[model.Touched] | None = None
) -> list[Alert | Resolution]:
    """What a batch with new or revised November rows of the project does (at SWEEP_AT unless ``touched`` says
    which data changed): evaluate its budgets (in the worker's role and tenant scope)."""
    project = org.projects["proj_a"]
    touches = [
        Touch(org.id, project, None, t.at, *(t.span or (None, None))) for t in (touched or [model.Touched(SWEEP_AT)])
    ]
    async with database.transaction() as tx:
        await tx.set_tenants({org.id})
        return await engine.evaluate(tx, touches)


async def published(db: asyncpg.Connection, settings: Settings) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT key, value, headers FROM outbox WHERE topic = $1 ORDER BY id", settings.topic_budget_alerts
    )
    return [json.loads(r["value"]) | {"_key": r["key"].decode(), "_headers": json.loads(r["headers"])} for r in rows]


# One step of a budget's month: new rows or a revision of some (which may lower spend), rates loaded or
# withdrawn, or the budget edited (amount, currency, thresholds, and sometimes its period kind or time zone) during
# November or today. After each, a batch's evaluation of the data it changed (and of SWEEP_AT and the 6th's row).
ledger_changes = st.dictionaries(
    st.tuples(st.sampled_from(DAYS[1:20]), st.integers(0, 1)),
    st.one_of(st.none(), st.tuples(st.sampled_from(("USD", "USD", "USD", "EUR", "GBP", "JPY")), money)),
    min_size=1,
    max_size=4,
)
budget_edits = st.tuples(
    st.sampled_from((Decimal(50), Decimal(100), Decimal(200), Decimal("120.5"))),
    st.sampled_from(("USD", "USD", "EUR", "GBP")),
    st.sets(st.sampled_from((Decimal(50), Decimal(80), Decimal(100), Decimal(150))), min_size=1).map(
        lambda s: tuple(sorted(s))
    ),
)
# Period kinds and zones: November's days, weeks (ISO, from Monday) and month have ended, the quarter has not; the
# zones put a day's start at 00:00 UTC, 05:00 UTC (New York in November; 04:00 on the 1st, a 25-hour day), 18:30 UTC
# and 11:00 UTC the day before, and off the UTC hour at 18:15 (Kathmandu, +05:45) and 10:15 (Chatham, +13:45): an
# estimate hour straddling such a midnight counts in the day it starts.
kinds_and_zones = st.tuples(
    st.sampled_from(("monthly", "monthly", "daily", "weekly", "quarterly")),
    st.sampled_from(
        ("UTC", "UTC", "America/New_York", "Asia/Kolkata", "Pacific/Auckland", "Asia/Kathmandu", "Pacific/Chatham")
    ),
)
# A budget edited during November (on the step's day: it judges the periods that ended after it) or today (it
# judges none that has ended); one edit in two also changes the period kind or zone (sometimes to the same).
budget_changes = st.tuples(
    budget_edits, st.one_of(st.none(), kinds_and_zones), st.sampled_from(("during", "during", "today"))
)
# Rates for every day of the month (so most steps convert), with some dates withdrawn or pairs added.
FULL_RATES: model.Rates = {
    ("EUR", quote, day): rate
    for day in DAYS[::3]
    for quote, rate in (("USD", Decimal("1.08")), ("GBP", Decimal("0.8725")), ("JPY", Decimal("162.4")))
}
month_rates = st.tuples(st.sets(st.sampled_from(sorted(FULL_RATES)), max_size=3), rate_tables).map(
    lambda change: {k: v for k, v in FULL_RATES.items() if k not in change[0]} | change[1]
)
# A revision of one USD window by a large amount: spend swings across several thresholds, up or down.
SWING_DAY = DAYS[5]
swings = st.sampled_from((Decimal(0), Decimal(30), Decimal(90), Decimal(170), Decimal(250))).map(
    lambda amount: {(SWING_DAY, 0): ("USD", amount)}
)
# The platform's estimate for some hours of days without provider rows (USD, converted at the hour's rate); 10:00 and
# 18:00 straddle a local midnight (Chatham 10:15, Kathmandu 18:15, Kolkata 18:30 UTC): they count in the day they start.
ESTIMATE_HOURS = [datetime(2026, 11, day, hour, tzinfo=UTC) for day in (21, 24, 27) for hour in (0, 10, 13, 18, 23)]
estimate_changes = st.dictionaries(
    st.sampled_from(ESTIMATE_HOURS), st.decimals(min_value=Decimal(0), max_value=Decimal(60), places=6), max_size=4
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("estimates"), estimate_changes),
        st.tuples(st.just("ledger"), swings),
        st.tuples(st.just("ledger"), swings),
        st.tuples(st.just("ledger"), swings),
        st.tuples(st.just("ledger"), ledger_changes),
        st.tuples(st.just("rates"), month_rates),
        st.tuples(st.just("budget"), budget_changes),
        st.tuples(st.just("budget"), budget_changes),
    ),
    min_size=1,
    max_size=10,
)


def provider_row(day: date) -> model.Touched:
    """A daily provider row's change: its window's midpoint, and its window (from the UTC hour it starts in)."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return model.Touched(start + timedelta(hours=12), (start, start + timedelta(days=1)))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(start=budget_edits, kind=kinds_and_zones, initial_rates=month_rates, plan=steps)
async def test_alerts_and_resolutions_equal_the_model(
    db: asyncpg.Connection,
    database: Database,
    settings: Settings,
    start: tuple[Decimal, str, tuple[Decimal, ...]],
    kind: tuple[str, str],
    initial_rates: model.Rates,
    plan: list[tuple[str, Any]],
) -> None:
    await db.execute(
        "TRUNCATE cost_data, project_metrics, budget_alerts, outbox, exchange_rates, ai_project_budgets CASCADE"
    )
    await db.execute("DELETE FROM projects")
    await db.execute("DELETE FROM users")
    await db.execute("DELETE FROM organizations")
    org = await make_org(db)
    budget = await add_project_budget(db, org, *start, *kind)
    rates = dict(initial_rates)
    await load_rates(db, rates)
    rows: dict[tuple[date, int], tuple[str, Decimal]] = {}
    estimates: dict[datetime, Decimal] = {}
    life = model.Lifecycle("project", budget)
    terms = model.Terms(model.BudgetTerms(*start, *kind))
    engine = BudgetEngine(settings)
    for step, (what, change) in enumerate(plan):
        touched = [model.Touched(SWEEP_AT), provider_row(SWING_DAY)]
        if what == "ledger":
            for key, value in change.items():
                if value is None:
                    rows.pop(key, None)
                else:
                    rows[key] = value
                touched.append(provider_row(key[0]))
            await write_ledger(db, org, rows)
        elif what == "estimates":
            touched.extend(model.Touched(hour) for hour in sorted(set(estimates) | set(change)))
            estimates = dict(change)
            await write_estimates(db, org, estimates)
        elif what == "rates":
            rates = dict(change)
            await load_rates(db, rates)
        else:
            edit, moved, when = change
            new = model.BudgetTerms(*edit, *(moved or (terms.current.period, terms.current.timezone)))
            statement = (
                "UPDATE ai_project_budgets SET amount = $2, currency = $3, thresholds = $4, period = $5, "
                "timezone = $6 WHERE id = $1"
            )
            args = (budget, new.amount, new.currency, list(new.thresholds), new.period, new.timezone)
            if when == "during" and terms.versions[-1][0] < DECEMBER:  # time runs forward: none after a today's
                at = NOVEMBER + timedelta(days=2 * step, hours=7)  # in the order they are made
                await change_budget(db, statement, *args, at=at)
            else:
                await db.execute(statement, *args)
                at = datetime.now(UTC)
            terms.change(at, new)
        judged = sorted(terms.judged(touched, datetime.now(UTC)))
        totals = []
        for period in judged:
            total = model.spend(model_rows(rows, estimates, (period.start, period.end)), period.terms.currency, rates)
            spend, missing = await spend_of(db, org, period.terms.currency, (period.start, period.end))
            assert spend == total, period
            assert bool(missing) == (total is None), period
            totals.append(total)
            event(f"a period judged {period.why}")
        await touch(database, engine, org, touched)
        for period, total in zip(judged, totals, strict=True):
            life.evaluate(period, total)

        stored = await db.fetch(
            "SELECT id, resolved_at, resolved_spend, amount, currency, period_start, period_end, threshold, spend "
            "FROM budget_alerts"
        )
        assert {r["id"] for r in stored} == set(life.raised), (judged, [dict(r) for r in stored])
        assert {r["id"] for r in stored if r["resolved_at"] is not None} == set(life.resolved)
        for row in stored:
            period, threshold, spend = life.alerts[row["id"]]
            assert (row["period_start"], row["period_end"], row["amount"], row["currency"].strip()) == (
                period.start,
                period.end,
                period.terms.amount,
                period.terms.currency,
            )
            assert (row["threshold"], row["spend"]) == (threshold, spend)
            assert row["resolved_spend"] == life.resolved_spend.get(row["id"])
        messages = await published(db, settings)
        sent = Counter((m["type"], m["alert_id"]) for m in messages)
        wanted = Counter(("budget.alert.triggered", str(i)) for i in life.raised) + Counter(
            ("budget.alert.resolved", str(i)) for i in life.resolved
        )
        assert sent == wanted  # each exactly once
        assert {m["_headers"]["delivery_id"] for m in messages} == {str(i) for i in life.raised} | {
            f"{i}:resolved" for i in life.resolved
        }
        for message in messages:
            assert message["_key"] == str(budget)
            row = next(r for r in stored if str(r["id"]) == message["alert_id"])
            assert (Decimal(message["amount"]), message["currency"]) == (row["amount"], row["currency"].strip())
            period, threshold, spend = life.alerts[uuid.UUID(message["alert_id"])]
            assert (message["period"], message["timezone"]) == (period.period, period.timezone)
            # The payload's money and period: the spend that raised it (a resolved message: the spend that resolved
            # it), its percentage of the amount rounded half-even once, the threshold, the period in the budget's zone.
            if message["type"] == "budget.alert.resolved":
                spend = life.resolved_spend[uuid.UUID(message["alert_id"])]
            local = ZoneInfo(period.timezone)
            assert (Decimal(message["spend"]), Decimal(message["threshold_percent"])) == (spend, threshold)
            assert Fraction(Decimal(message["percent_used"])) == round(
                Fraction(spend) * 100 / Fraction(period.terms.amount), 2
            )
            assert (message["period_start"], message["period_end"]) == (
                period.start.astimezone(local).isoformat(),
                period.end.astimezone(local).isoformat(),
            )


# ------------------------------------------------------------------------------------------ named cases


async def lifecycle_setup(db: asyncpg.Connection, amount: str, currency: str, thresholds: tuple[int, ...]) -> Any:
    org = await make_org(db)
    budget = await add_project_budget(db, org, Decimal(amount), currency, tuple(Decimal(t) for t in thresholds))
    return org, budget


async def test_raising_the_amount_re_arms_and_lowering_spend_resolves_then_re_crosses(
    db: asyncpg.Connection, database: Database, settings: Settings
) -> None:
    org, budget = await lifecycle_setup(db, "100", "USD", (80,))
    engine = BudgetEngine(settings)
    await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(85))})
    first = await touch(database, engine, org)
    assert [(type(a), a.threshold) for a in first] == [(Alert, Decimal(80))]
    assert isinstance(first[0], Alert)
    # 100 -> 200: 85 is 42.5 % of 200, nothing; at 160 (80 % of 200) the threshold alerts again, new id.
    await change_budget(db, "UPDATE ai_project_budgets SET amount = 200 WHERE id = $1", budget, at=SWEEP_AT)
    assert await engine.sweep(database, at=SWEEP_AT) == []
    await write_ledger(
        db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(85)), (date(2026, 11, 4), 0): ("USD", Decimal(75))}
    )
    second = await touch(database, engine, org)
    assert len(second) == 1
    assert isinstance(second[0], Alert)
    assert (second[0].amount, second[0].crossing) == (Decimal(200), 1)
    assert second[0].id != first[0].id
    # A revision lowers the 4th to 10: 95 < 160, the alert at 80 % of 200 is resolved, once.
    await write_ledger(
        db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(85)), (date(2026, 11, 4), 0): ("USD", Decimal(10))}
    )
    third = await touch(database, engine, org)
    assert len(third) == 1
    assert isinstance(third[0], Resolution)
    assert third[0].alert_id == second[0].id
    assert await touch(database, engine, org) == []
    # Spend rises again: the second crossing at 80 % of 200, with a new id.
    await write_ledger(
        db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(85)), (date(2026, 11, 4), 0): ("USD", Decimal(90))}
    )
    fourth = await touch(database, engine, org)
    assert len(fourth) == 1
    assert isinstance(fourth[0], Alert)
    assert fourth[0].crossing == 2
    assert fourth[0].id not in {first[0].id, second[0].id}
    messages = await published(db, settings)
    assert [(m["type"], m["amount"], m.get("crossing")) for m in messages] == [
        ("budget.alert.triggered", "100", 1),
        ("budget.alert.triggered", "200", 1),
        ("budget.alert.resolved", "200", 1),
        ("budget.alert.triggered", "200", 2),
    ]
    resolved = messages[2]
    assert resolved["alert_id"] == str(second[0].id)
    assert (resolved["spend"], resolved["percent_used"], resolved["threshold_percent"]) == ("95", "47.50", "80")
    assert resolved["raised_at"] == messages[1]["raised_at"]
    assert resolved["resolved_at"] >= resolved["raised_at"]
    assert resolved["_key"] == str(budget)


async def test_an_open_alert_of_a_removed_threshold_resolves_when_spend_falls_below_it(
    db: asyncpg.Connection, database: Database, settings: Settings
) -> None:
    """50 and 80 % of 100 USD alerted at spend 85; the budget keeps only 50 %; a revision lowers spend to 10: both
    alerts resolve (the 80 % one stayed open with spend 10, as only current thresholds were evaluated)."""
    org, budget = await lifecycle_setup(db, "100", "USD", (50, 80))
    engine = BudgetEngine(settings)
    await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(85))})
    raised = await touch(database, engine, org)
    assert [(type(a), a.threshold) for a in raised] == [(Alert, Decimal(50)), (Alert, Decimal(80))]
    await change_budget(db, "UPDATE ai_project_budgets SET thresholds = '{50}' WHERE id = $1", budget, at=SWEEP_AT)
    assert await touch(database, engine, org) == []  # spend unchanged: nothing
    await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(10))})
    resolved = await touch(database, engine, org)
    assert sorted((type(r), r.threshold, r.spend) for r in resolved) == [
        (Resolution, Decimal(50), Decimal(10)),
        (Resolution, Decimal(80), Decimal(10)),
    ]
    assert await db.fetchval("SELECT count(*) FROM budget_alerts WHERE resolved_at IS NULL") == 0
    # Spend rises again: 50 % alerts (its second crossing); 80 % is not a threshold any more.
    await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(90))})
    again = await touch(database, engine, org)
    assert [(type(a), a.threshold, a.crossing) for a in again if isinstance(a, Alert)] == [(Alert, Decimal(50), 2)]


async def test_eur_budget_converts_usd_spend_and_without_a_rate_is_unconvertible(
    db: asyncpg.Connection, database: Database, settings: Settings
) -> None:
    org, budget = await lifecycle_setup(db, "100", "EUR", (50, 100))
    engine = BudgetEngine(settings)
    # 108 USD on Nov 3 (1 EUR = 1.08 USD) = 100 EUR. Nov 25: the newest rate (Nov 13) is too old.
    for text in ((FIXTURES / "eurofxref-hist-2026-11.csv").read_text(),):
        for rate in parse(text):
            await db.execute(
                "INSERT INTO exchange_rates (base, quote, effective_date, rate, source) VALUES ($1, $2, $3, $4, 'ECB')",
                rate.base,
                rate.quote,
                rate.effective_date,
                rate.rate,
            )
    await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(54))})
    assert await spend_of(db, org, "EUR") == (Decimal(50), {})
    assert await spend_of(db, org, "GBP") == (Decimal("43.65"), {})  # the cross rate 0.8730 / 1.0800 (README)
    assert await spend_of(db, org, "USD") == (Decimal(54), {})
    raised = await engine.sweep(database, at=SWEEP_AT)
    assert [(a.threshold, a.spend, a.currency) for a in raised if isinstance(a, Alert)] == [
        (Decimal(50), Decimal(50), "EUR")
    ]
    assert len(raised) == 1
    await write_ledger(
        db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(54)), (date(2026, 11, 25), 0): ("USD", Decimal(500))}
    )
    spend, missing = await spend_of(db, org, "EUR")
    assert spend is None  # never 0, never the partial 50
    counted = metrics.UNCONVERTIBLE.labels(budget_currency="EUR", row_currency="USD")
    before = counted._value.get()
    assert missing == {"USD": {"rows": 1, "first": "2026-11-25", "last": "2026-11-25"}}
    assert await engine.sweep(database, at=SWEEP_AT) == []  # no alert (100 %) and no resolution from a partial sum
    assert counted._value.get() == before + 1
    assert await db.fetchval("SELECT count(*) FROM budget_alerts WHERE budget_id = $1", budget) == 1


async def test_an_alert_raised_before_0007_keeps_its_id_counts_as_open_and_resolves(
    empty_database_url: str, tmp_path: Path, settings: Settings
) -> None:
    """Upgrading a database with alerts: they keep their (old-formula) ids, are not raised again, and a
    revision that lowers spend resolves them like any other; the next crossing has a new id."""
    schema = copy_schema(tmp_path)
    later = {path: path.read_text() for path in (schema / "migrations").glob("*.sql") if path.name >= "0007"}
    for path in later:
        path.unlink()
    await migrate(empty_database_url, directory=schema)
    db = await asyncpg.connect(empty_database_url)
    database = await Database.open(empty_database_url, role="cost_worker_writer")
    try:
        org, budget = await lifecycle_setup(db, "100", "USD", (80,))
        await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(85))})
        old_id = uuid.uuid5(model.ALERT_NAMESPACE, f"project:{budget}:{NOVEMBER.isoformat()}:80")
        await db.execute(
            "INSERT INTO budget_alerts (id, scope, budget_id, organization_id, project_id, period_start, period_end, "
            "threshold, spend, amount, currency, percent_used) "
            "VALUES ($1, 'project', $2, $3, $4, $5, $6, 80, 85, 100, 'USD', 85)",
            old_id,
            budget,
            org.id,
            org.projects["proj_a"],
            NOVEMBER,
            datetime(2026, 12, 1, tzinfo=UTC),
        )
        for path, text in later.items():
            path.write_text(text)
        await migrate(empty_database_url, directory=schema)
        engine = BudgetEngine(settings)
        assert await touch(database, engine, org) == []  # still open: not raised again
        await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(50))})
        (resolved,) = await touch(database, engine, org)
        assert isinstance(resolved, Resolution)
        assert (resolved.alert_id, resolved.alert.crossing) == (old_id, 1)
        await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(90))})
        (again,) = await touch(database, engine, org)
        assert isinstance(again, Alert)
        assert again.crossing == 2
        assert again.id == model.alert_id("project", budget, NOVEMBER, Decimal(80), Decimal(100), "USD", 2)
    finally:
        await database.close()
        await db.close()


async def test_a_revision_of_an_ended_month_resolves_at_the_amount_in_force_then(
    db: asyncpg.Connection, database: Database, settings: Settings
) -> None:
    """80 % of 100 USD alerted at 85 in November; the budget is raised to 1000 today (after November ended); then a
    revision lowers November to 50: the alert at 100 resolves (it was looked up at today's 1000, and stayed open
    with spend 50, forever)."""
    org, budget = await lifecycle_setup(db, "100", "USD", (80,))
    engine = BudgetEngine(settings)
    await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(85))})
    [raised] = await touch(database, engine, org)
    assert isinstance(raised, Alert)
    await db.execute("UPDATE ai_project_budgets SET amount = 1000 WHERE id = $1", budget)
    await write_ledger(db, org, {(date(2026, 11, 3), 0): ("USD", Decimal(50))})
    [resolved] = await touch(database, engine, org)
    assert isinstance(resolved, Resolution)
    assert (resolved.alert_id, resolved.alert.amount, resolved.spend) == (raised.id, Decimal(100), Decimal(50))
    assert await db.fetchval("SELECT count(*) FROM budget_alerts WHERE resolved_at IS NULL") == 0
