"""The spend aggregate (schema/migrations/0012_spend_aggregate.sql) against the model and the full computation.

Budget evaluation reads ``spend_hourly``, kept by triggers in the writing transaction, instead of every ledger line
and rollup row of a period. A hypothesis property test drives random sequences of API-usage events, provider
snapshots and their revisions (lines added, dropped, moved; open buckets; unpriced lines; late data for windows
already reported) and exchange-rate changes through the real pipeline, then checks for every budget scope, period
and currency (USD, EUR, GBP) that the spend read from the aggregate equals:
- the independent model (``tests/spend_model.py`` rows, converted by ``tests/currency_model.py``), exactly;
- the full computation (``cost_worker_spend_full``, the 0007 function kept as the reference), spend, converted
  rows and missing rates alike;
and that the aggregate kept incrementally equals the aggregate rebuilt from scratch.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import currency_model
from tests.factories import (
    api_event,
    dumps,
    envelope,
    make_org,
    migrate_before,
    openai_cost_bucket,
    openai_usage_bucket,
)
from tests.feeding import Feeder
from tests.kafka_helpers import worker_env
from tests.spend_model import Ledger, periods_overlapping
from tests.test_spend_rules import (
    BASE_DAYS,
    DAY,
    HOUR,
    Event,
    Expected,
    Snapshot,
    World,
    _iso,
    _org_of,
    add_prices_once,
    apply_step,
    events,
    make_world,
    payload_and_rows,
    snapshots,
)
from worker import metrics
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.migrate import migrate
from worker.store import Database

EXAMPLES = 40
REPLAY_EXAMPLES = 15
CURRENCIES = ("USD", "EUR", "GBP")


@dataclass(frozen=True)
class Rates:
    """A new content of exchange_rates (an import that adds, corrects or withdraws rates)."""

    table: tuple[tuple[str, str, int, Decimal], ...]  # (base, quote, day offset from the example's first day, rate)


rate_values = st.sampled_from([Decimal("0.8"), Decimal("0.8725"), Decimal("1.08"), Decimal("1.1"), Decimal("1.25")])
rate_changes = st.builds(
    Rates,
    st.lists(
        st.tuples(
            # EUR -> X: inverse and cross rates (every row truncated); USD -> GBP: a direct rate (sums convert whole)
            st.sampled_from([("EUR", "USD"), ("EUR", "GBP"), ("USD", "GBP"), ("GBP", "EUR")]),
            st.integers(-7, 3),
            rate_values,
        ).map(lambda t: (t[0][0], t[0][1], t[1], t[2])),
        max_size=8,
    ).map(tuple),
)

Step = Snapshot | Event | Rates


@st.composite
def plans(draw: st.DrawFn) -> list[Step]:
    first: list[Step] = list(draw(st.lists(events, min_size=2, max_size=8)))
    rest = draw(st.lists(st.one_of(snapshots(), snapshots(), events, rate_changes), min_size=1, max_size=12))
    return first + rest


async def load_rates(db: asyncpg.Connection, base: datetime, change: Rates) -> currency_model.Rates:
    rates: currency_model.Rates = {}
    for b, q, offset, rate in change.table:
        rates[(b, q, (base + offset * DAY).date())] = rate
    await db.execute("DELETE FROM exchange_rates")
    await db.executemany(
        "INSERT INTO exchange_rates (base, quote, effective_date, rate, source) VALUES ($1, $2, $3, $4, 'test')",
        [(b, q, d, r) for (b, q, d), r in rates.items()],
    )
    return rates


async def aggregate(db: asyncpg.Connection, org: uuid.UUID) -> tuple[dict[tuple[Any, ...], Any], set[Any]]:
    """The aggregate's rows that hold rows (their sum per key) and the coverage, of one organization."""
    rows = await db.fetch(
        "SELECT scope, subject, subject_project, at, rate_day, currency, authority, amount, n_rows "
        "FROM spend_hourly WHERE organization_id = $1 AND n_rows <> 0",
        org,
    )
    cover = await db.fetch("SELECT * FROM spend_cover WHERE organization_id = $1", org)
    return (
        {tuple(r)[:7]: (r["amount"], r["n_rows"]) for r in rows},
        {tuple(r) for r in cover},
    )


async def assert_incremental_equals_rebuilt(db: asyncpg.Connection, org: uuid.UUID) -> None:
    kept = await aggregate(db, org)
    tx = db.transaction()
    await tx.start()
    try:
        await db.execute("SELECT cost_worker_spend_rebuild(ARRAY[$1::uuid])", org)
        rebuilt = await aggregate(db, org)
    finally:
        await tx.rollback()
    assert kept[0] == rebuilt[0]
    assert kept[1] == rebuilt[1]


SPEND = "SELECT spend, foreign_rows, missing_rates FROM {fn}($1, $2, $3, $4, $5, $6, $7)"


async def assert_matches(db: asyncpg.Connection, world: World, expected: Expected, rates: currency_model.Rates) -> int:
    model = expected.model()
    checked = 0
    for budget in world.budgets:
        for start, end in periods_overlapping(
            budget["period"], budget["timezone"], world.base - DAY, world.base + 4 * DAY
        ):
            args = (budget["scope"], world.org, budget["project"], budget["user"], start, end)
            for currency in CURRENCIES:
                fast = await db.fetchrow(SPEND.format(fn="cost_worker_spend"), *args, currency)
                full = await db.fetchrow(SPEND.format(fn="cost_worker_spend_full"), *args, currency)
                assert fast is not None
                assert full is not None
                where = (budget["scope"], budget["period"], budget["timezone"], start, currency)
                assert fast["spend"] == full["spend"], (*where, fast["spend"], full["spend"])
                assert json.loads(fast["foreign_rows"]) == json.loads(full["foreign_rows"]), where
                assert json.loads(fast["missing_rates"]) == json.loads(full["missing_rates"]), where
                rows = [
                    currency_model.Row(c, at, amount)
                    for c, at, amount in model.spend_rows(
                        budget["scope"], world.org, budget["project"], budget["user"], start, end
                    )
                ]
                wanted = currency_model.spend(rows, currency, rates)
                assert fast["spend"] == wanted, (*where, fast["spend"], wanted)
                if currency == "USD":
                    assert fast["spend"] == expected.spend(budget, start, end), where
                checked += 1
    return checked


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(base=st.sampled_from(BASE_DAYS), plan=plans(), register_at=st.integers(0, 25))
async def test_spend_from_the_aggregate_equals_the_model_and_the_full_computation(
    base: datetime, plan: list[Step], register_at: int, db: asyncpg.Connection, feeder: Feeder
) -> None:
    """Also the user scopes' registration (0016): the world's user budget (the user's scope) is registered by the
    worker's first evaluation of it; the user's scope within proj_a, which no budget names, is registered by hand
    before step ``register_at`` (after every step, or never when that is past the end: computed in full)."""
    await add_prices_once(db)
    world = await make_world(db, base)
    within = {**world.budgets[-1], "scope": "user", "project": world.projects["proj_a"], "period": "monthly"}
    world.budgets.append(within)
    expected = Expected(world)
    rates: currency_model.Rates = await load_rates(db, base, Rates(()))
    for index, step in enumerate(plan):
        if index == register_at:
            await track(db, world.org, world.user, within["project"])
        if isinstance(step, Rates):
            rates = await load_rates(db, base, step)
        else:
            await apply_step(feeder, world, expected, base, step)
    if register_at == len(plan):
        await track(db, world.org, world.user, within["project"])
    registered = await db.fetchval(
        "SELECT count(*) FROM spend_subjects WHERE subject = $1 AND subject_project = $2", world.user, within["project"]
    )
    assert registered == (1 if register_at <= len(plan) else 0)
    if any(isinstance(step, Event) for step in plan):
        user_scope = "SELECT count(*) FROM spend_subjects WHERE scope = 'user' AND subject = $1"
        assert await db.fetchval(user_scope, world.user) == 1  # the worker's evaluation registered it
    assert await assert_matches(db, world, expected, rates) > 0
    await assert_incremental_equals_rebuilt(db, world.org)


async def track(db: asyncpg.Connection, org: uuid.UUID, user: uuid.UUID, project: uuid.UUID | None) -> int:
    """Register a user budget's scope (what the worker does for the budgets it evaluates)."""
    return int(await db.fetchval("SELECT cost_worker_spend_track('{user}', $1, $2, $3)", [org], [project], [user]))


async def _spend_values(db: asyncpg.Connection, world: World) -> list[Any]:
    """Every budget's spend, converted rows and missing rates in every period and currency, as the aggregate says."""
    values = []
    for budget in world.budgets:
        for start, end in periods_overlapping(
            budget["period"], budget["timezone"], world.base - DAY, world.base + 4 * DAY
        ):
            args = (budget["scope"], world.org, budget["project"], budget["user"], start, end)
            for currency in CURRENCIES:
                values.append(tuple(await db.fetchrow(SPEND.format(fn="cost_worker_spend"), *args, currency) or ()))
    return values


@settings(
    max_examples=REPLAY_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(base=st.sampled_from(BASE_DAYS), plan=plans())
async def test_a_replay_or_a_redelivery_changes_nothing_in_the_aggregate(
    base: datetime, plan: list[Step], db: asyncpg.Connection, feeder: Feeder
) -> None:
    """Every message of a run delivered again, first at its own offsets (a consumer that re-reads after a
    rebalance: the batch's offsets are stored, nothing is applied), then as new records (a producer's retry: the
    event's id and the line's revision are stored): the aggregate's rows, its coverage and every budget's spend
    stay exactly as they were, and equal to a rebuild."""
    await add_prices_once(db)
    world = await make_world(db, base)
    await load_rates(db, base, Rates((("EUR", "USD", 0, Decimal("1.1")), ("USD", "GBP", 0, Decimal("0.8")))))
    delivered: list[list[Any]] = []
    payloads: list[tuple[str, bytes]] = []
    windows = Ledger()  # the windows stored, for the overlap rule (README rule 1)
    for step in plan:
        if isinstance(step, Rates):
            continue
        overlapping = False
        if isinstance(step, Snapshot):
            message, rows, window = payload_and_rows(world, step)
            overlapping = windows.overlaps(window)
            if not overlapping:
                windows.apply([window], rows, window[3] + HOUR * step.collected_after)
            topic, value = feeder.settings.topic_provider_buckets, dumps(message)
        else:
            at = base + HOUR * step.hour + timedelta(minutes=30)
            project = world.projects[step.project] if step.project else None
            event = api_event(
                _org_of(world),
                project=project,
                user=world.user,
                occurred_at=_iso(at),
                cost=str(step.cost),
                model=step.model,
            )
            topic, value = feeder.settings.topic_api_usage, dumps(event)
        records = [feeder.record(topic, value)]
        outcome = await feeder.apply(records)
        assert [q.reason.value for q in outcome.quarantine] == (["overlapping_window"] if overlapping else [])
        delivered.append(records)
        payloads.append((topic, value))
    kept = await aggregate(db, world.org)
    spent = await _spend_values(db, world)
    for records in delivered:  # the same records at the same offsets
        await feeder.apply(records)
    assert await aggregate(db, world.org) == kept
    for topic, value in payloads:  # the same messages at new offsets
        await feeder.apply([feeder.record(topic, value)])
    assert await aggregate(db, world.org) == kept
    assert await _spend_values(db, world) == spent
    await assert_incremental_equals_rebuilt(db, world.org)


# ------------------------------------------------------------------------------------------------- named cases


async def spend(
    db: asyncpg.Connection,
    fn: str,
    scope: str,
    org: Any,
    project: Any,
    currency: str = "USD",
    period: tuple[datetime, datetime] = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
) -> Any:
    return await db.fetchval(
        f"SELECT spend FROM {fn}($1, $2, $3, NULL, $5, $6, $4)", scope, org, project, currency, *period
    )


async def test_a_rate_import_changes_spend_at_once(db: asyncpg.Connection) -> None:
    """Rates are applied when a budget is evaluated, never stored in the aggregate."""
    org = await make_org(db)
    a = org.projects["proj_a"]
    await db.execute(
        "INSERT INTO project_metrics (organization_id, project_id, hour, request_count, estimated_cost_usd) "
        "VALUES ($1, $2, '2026-11-03T10:00Z', 1, 108)",
        org.id,
        a,
    )
    assert await spend(db, "cost_worker_spend", "project", org.id, a, "GBP") is None  # no rate: unconvertible
    await db.execute(
        "INSERT INTO exchange_rates (base, quote, effective_date, rate, source) VALUES ('USD', 'GBP', '2026-11-02', "
        "0.8, 'test')"
    )
    assert await spend(db, "cost_worker_spend", "project", org.id, a, "GBP") == Decimal("86.4")
    await db.execute("UPDATE exchange_rates SET rate = 0.75")
    assert await spend(db, "cost_worker_spend", "project", org.id, a, "GBP") == Decimal(81)
    assert await spend(db, "cost_worker_spend_full", "project", org.id, a, "GBP") == Decimal(81)


async def estimate_beside_an_ungrouped_cost(db: asyncpg.Connection, org: Any, project: uuid.UUID) -> None:
    """A 5 USD estimate of ``project`` at 10:00 on 3 Nov, and a 7 USD ungrouped cost row of the organization's
    account for that day (it covers the estimate in organization scope)."""
    await db.execute(
        "INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, estimated_cost_usd) "
        "VALUES ($1, $2, '2026-11-03T10:00Z', 'openai', 1, 5)",
        org.id,
        project,
    )
    await db.execute(
        "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
        "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) "
        "VALUES ($1, NULL, 'openai', $2, 'costs_v1', '2026-11-03Z', '2026-11-04Z', 'all', 'USD', 7, '2026-11-05Z')",
        org.id,
        org.ai_org,
    )


async def test_a_project_mapped_to_another_account_changes_what_covers_its_estimates(db: asyncpg.Connection) -> None:
    """An ungrouped cost row of an account covers the estimates of the projects mapped to it (organization scope):
    moving a project to another account is seen by the aggregate (rebuilt for its organization)."""
    org = await make_org(db, project_ids=("proj_a",))
    a = org.projects["proj_a"]
    await estimate_beside_an_ungrouped_cost(db, org, a)
    assert await spend(db, "cost_worker_spend", "organization", org.id, None) == 7  # the estimate is covered
    await db.execute("UPDATE projects SET ai_organization_id = 'elsewhere' WHERE id = $1", a)
    assert await spend(db, "cost_worker_spend", "organization", org.id, None) == 12
    assert await spend(db, "cost_worker_spend_full", "organization", org.id, None) == 12


async def test_the_migration_backfills_the_aggregate(empty_database_url: str, tmp_path: Path) -> None:
    """A database before 0012 with ledger lines, rollups and user rollups: after the migration the aggregate gives
    what the full computation gives, and later writes keep it so."""
    await migrate_before(empty_database_url, tmp_path, 12)
    db = await asyncpg.connect(empty_database_url)
    try:
        org = await make_org(db, project_ids=("proj_a", "proj_b"))
        a, b = org.projects["proj_a"], org.projects["proj_b"]
        user = org.users[0]
        lines = (
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
            "bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, collected_at) VALUES "
            "($1, $2, 'openai', $3, 'usage_v1', '2026-11-03T10:00Z', '2026-11-03T11:00Z', 'm', 'USD', 4, 4, "
            "'2026-11-04Z'), "
            "($1, $2, 'openai', $3, 'costs_v1', '2026-11-03Z', '2026-11-04Z', 'x', 'USD', 30, NULL, "
            "'2026-11-04T06:00Z'), "
            "($1, $4, 'openai', $3, 'usage_v1', '2026-11-05Z', '2026-11-06Z', 'm', 'EUR', 2.5, 9, '2026-11-06Z')"
        )
        await db.execute(lines, org.id, a, org.ai_org, b)
        await db.execute(
            "INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, "
            "estimated_cost_usd) VALUES ($1, $2, '2026-11-03T10:00Z', 'openai', 1, 5), "
            "($1, $3, '2026-11-05T10:00Z', 'openai', 1, 1.25), ($1, NULL, '2026-11-07T10:00Z', NULL, 1, 0.5)",
            org.id,
            a,
            b,
        )
        await db.execute(
            "INSERT INTO user_metrics (organization_id, user_id, project_id, hour, provider, request_count, "
            "estimated_cost_usd) VALUES ($1, $2, $3, '2026-11-03T10:00Z', 'openai', 1, 5), "
            "($1, $2, NULL, '2026-11-07T10:00Z', NULL, 1, 0.5)",
            org.id,
            user,
            a,
        )
        await db.execute(
            "INSERT INTO exchange_rates (base, quote, effective_date, rate, source) VALUES "
            "('EUR', 'USD', '2026-11-03', 1.1, 'test')"
        )

        await migrate(empty_database_url)

        async def both(scope: str, project: Any, usr: Any, currency: str) -> tuple[Any, Any]:
            values = []
            for fn in ("cost_worker_spend", "cost_worker_spend_full"):
                values.append(
                    tuple(
                        await db.fetchrow(
                            f"SELECT * FROM {fn}($1, $2, $3, $4, '2026-11-01Z', '2026-12-01Z', $5)",
                            scope,
                            org.id,
                            project,
                            usr,
                            currency,
                        )
                        or ()
                    )
                )
            return values[0], values[1]

        cases = [
            ("organization", None, None),
            ("project", a, None),
            ("project", b, None),
            ("user", None, user),
            ("user", a, user),
        ]
        for scope, project, usr in cases:
            for currency in ("USD", "EUR"):
                fast, full = await both(scope, project, usr, currency)
                assert fast == full, (scope, project, currency)
        # cost 30 (it replaces proj_a's usage of that day) + usage 2.5 EUR at 1.1 + the estimate without a project;
        # both projects' estimates are covered by their provider lines.
        assert (await both("organization", None, None, "USD"))[0][0] == Decimal("33.25")
        assert (await both("user", None, user, "USD"))[0][0] == Decimal("5.5")
        # A write after the migration keeps it (the triggers): the cost row of proj_b's day replaces its usage.
        await db.execute(
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
            "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) VALUES "
            "($1, $2, 'openai', $3, 'costs_v1', '2026-11-05Z', '2026-11-06Z', 'x', 'USD', 3, '2026-11-06T06:00Z')",
            org.id,
            b,
            org.ai_org,
        )
        for scope, project, usr in cases:
            fast, full = await both(scope, project, usr, "USD")
            assert fast == full, (scope, project)
        assert (await both("project", b, None, "USD"))[0][0] == 3
    finally:
        await db.close()


async def test_a_cost_line_retires_overlapping_usage_outside_its_own_window(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """A daily usage line counts at its midpoint (12:00) and covers the day's estimates; an hourly cost line of
    03:00 replaces it (both scopes; an ungrouped one, the organization's): the aggregate recomputes the usage's
    whole window, not only the cost line's hour."""
    await add_prices_once(db)
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    a = org.projects["proj_a"]
    await feeder.events(
        *(api_event(org, project=a, cost="1", occurred_at=f"2026-11-03T{h:02d}:10:00Z", model="gpt-4o") for h in (3, 9))
    )
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "usage_v1",
            [
                openai_usage_bucket(
                    "2026-11-03",
                    "2026-11-04",
                    [
                        {"project_id": "proj_a", "model": "m1", "input_tokens": 30},
                        {"project_id": "proj_b", "model": "m1", "input_tokens": 20},
                    ],
                )
            ],
            collected_at="2026-11-04T02:00:00Z",
        )
    )

    async def check(org_spend: int, project_spend: int) -> None:
        for fn in ("cost_worker_spend", "cost_worker_spend_full"):
            assert await spend(db, fn, "organization", org.id, None) == org_spend, fn
            assert await spend(db, fn, "project", org.id, a) == project_spend, fn

    await check(50, 30)
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-03T03:00:00", "2026-11-03T04:00:00", [("proj_a", "x", "7")])],
            collected_at="2026-11-03T05:00:00Z",
        )
    )
    await check(7 + 20 + 1, 7 + 1)  # proj_a's usage replaced: its 09:00 estimate counts again
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-03T15:00:00", "2026-11-03T16:00:00", [(None, "all", "4")])],
            collected_at="2026-11-03T17:00:00Z",
        )
    )
    await check(7 + 4 + 1, 7 + 1)  # the ungrouped cost replaces proj_b's usage too (organization scope only)


async def test_rows_loaded_with_triggers_off_are_counted_after_rebuild_spend(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """A restore or a bulk load with triggers off (session_replication_role = replica) leaves the aggregate behind
    the ledger; `cost-worker budgets rebuild-spend` brings it back to the full computation."""
    org = await make_org(db, project_ids=("proj_a",))
    a = org.projects["proj_a"]
    await db.execute(
        "INSERT INTO ai_organization_budgets (organization_id, name, amount, period, timezone, thresholds) "
        "VALUES ($1, 'Monthly', 100, 'monthly', 'UTC', '{50}')",
        org.id,
    )
    await db.execute(
        "INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, estimated_cost_usd) "
        "VALUES ($1, $2, '2026-11-03T10:00Z', 'openai', 1, 5)",
        org.id,
        a,
    )
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, report, "
        "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) VALUES "
        "($1, $2, 'openai', $3, 'costs_v1', 'openai.costs', '2026-11-03T10:00Z', '2026-11-03T11:00Z', 'x', 'USD', 7, "
        "'2026-11-03T12:00Z')",
        org.id,
        a,
        org.ai_org,
    )
    await db.execute("SET session_replication_role = origin")
    # A second organization without any budget that a migration queued: rebuilt (and dequeued) as well.
    queued = await make_org(db, ai_org="org-queued")
    await db.execute("INSERT INTO spend_rebuilds (organization_id, reason) VALUES ($1, 'test')", queued.id)
    assert await spend(db, "cost_worker_spend_full", "organization", org.id, None) == 7  # the cost covers the hour
    assert await spend(db, "cost_worker_spend", "organization", org.id, None) == 5  # the aggregate never saw it

    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "budgets", "rebuild-spend"],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "rebuilt for 2 organization(s)" in result.stdout
    assert await db.fetchval("SELECT count(*) FROM spend_rebuilds") == 0
    for scope, project in (("organization", None), ("project", a)):
        assert await spend(db, "cost_worker_spend", scope, org.id, project) == 7
    await assert_incremental_equals_rebuilt(db, org.id)


async def test_a_user_scope_is_kept_once_a_user_budget_names_it(db: asyncpg.Connection, feeder: Feeder) -> None:
    """0016: the aggregate keeps a user's scopes only once a user budget names them. Spend of a user no budget names
    is computed in full; the first evaluation of a new user budget registers its scope and builds it from the
    rollups, earlier events included, in the batch's transaction."""
    org = await make_org(db, users=2)
    a = org.projects["proj_a"]
    budgeted, other = org.users
    at = "2026-11-21T10:00:00Z"
    await feeder.events(
        api_event(org, project=a, user=budgeted, occurred_at=at, cost="3"),
        api_event(org, project=a, user=other, occurred_at=at, cost="2"),
    )
    user_rows = "SELECT count(*) FROM spend_hourly WHERE scope IN ('user', 'user_project') AND subject = $1"
    assert await db.fetchval(user_rows, budgeted) == 0
    assert await db.fetchval(user_rows, other) == 0
    budget = await db.fetchval(
        "INSERT INTO ai_budgets (organization_id, user_id, name, amount, period, timezone, thresholds) "
        "VALUES ($1, $2, 'Monthly', 10, 'monthly', 'UTC', '{50,100}') RETURNING id",
        org.id,
        budgeted,
    )
    await feeder.events(api_event(org, project=a, user=budgeted, occurred_at="2026-11-21T11:00:00Z", cost="2.5"))
    assert await db.fetchval("SELECT count(*) FROM spend_subjects WHERE scope = 'user' AND subject = $1", budgeted) == 1
    assert await db.fetchval(user_rows, budgeted) == 2  # its two hours, the first from before the budget
    assert await db.fetchval(user_rows, other) == 0
    alerts = await db.fetch("SELECT threshold, spend FROM budget_alerts WHERE budget_id = $1", budget)
    assert [(r["threshold"], r["spend"]) for r in alerts] == [(50, Decimal("5.5"))]
    for user, wanted in ((budgeted, Decimal("5.5")), (other, Decimal(2))):
        for fn in ("cost_worker_spend", "cost_worker_spend_full"):
            value = await db.fetchval(
                f"SELECT spend FROM {fn}('user', $1, NULL, $2, '2026-11-01Z', '2026-12-01Z', 'USD')", org.id, user
            )
            assert value == wanted, (fn, user)
    await assert_incremental_equals_rebuilt(db, org.id)


async def test_registration_builds_at_most_max_new_scopes_per_call(db: asyncpg.Connection) -> None:
    """A bulk import of user budgets is registered a few at a time (worker.budgets.REGISTRATIONS_PER_EVALUATION);
    a scope not registered yet is computed in full meanwhile; organization and project budgets need none."""
    org = await make_org(db, project_ids=("proj_a",), users=3)
    a = org.projects["proj_a"]
    for user, cost in zip(org.users, (5, 6, 7), strict=True):
        await db.execute(
            "INSERT INTO user_metrics (organization_id, user_id, project_id, hour, provider, request_count, "
            "estimated_cost_usd) VALUES ($1, $2, $3, '2026-11-03T10:00Z', 'openai', 1, $4)",
            org.id,
            user,
            a,
            cost,
        )
    register = "SELECT cost_worker_spend_track('{organization,project,user,user,user}', $1, $2, $3, 1)"
    args = ([org.id] * 5, [None, a, None, None, a], [None, None, *org.users[:2], org.users[2]])
    registered = "SELECT count(*) FROM spend_subjects WHERE organization_id = $1"
    for expected in (1, 2, 3):
        assert await db.fetchval(register, *args) == 1
        assert await db.fetchval(registered, org.id) == expected
        for user, wanted in zip(org.users, (5, 6, 7), strict=True):
            fast = await db.fetchval(
                "SELECT spend FROM cost_worker_spend('user', $1, NULL, $2, '2026-11-01Z', '2026-12-01Z', 'USD')",
                org.id,
                user,
            )
            assert fast == wanted
    assert await db.fetchval(register, *args) == 0
    await assert_incremental_equals_rebuilt(db, org.id)


async def test_a_project_moved_to_another_organization_and_account_rebuilds_both(db: asyncpg.Connection) -> None:
    """A project's mapping and organization changed in one update (migration 0026): the organization it leaves keeps
    its rows (they name their organization) and their estimates lose the ungrouped row that covered them, so its
    aggregate is rebuilt too, not only the new organization's (it said 7, the full computation 12)."""
    org = await make_org(db, project_ids=("proj_a",))
    other = await make_org(db, project_ids=())
    a = org.projects["proj_a"]
    await estimate_beside_an_ungrouped_cost(db, org, a)
    assert await spend(db, "cost_worker_spend", "organization", org.id, None) == 7
    await db.execute(
        "UPDATE projects SET organization_id = $2, ai_organization_id = $3 WHERE id = $1", a, other.id, other.ai_org
    )
    assert await spend(db, "cost_worker_spend_full", "organization", org.id, None) == 12
    assert await spend(db, "cost_worker_spend", "organization", org.id, None) == 12
    await assert_incremental_equals_rebuilt(db, org.id)


async def test_a_deleted_project_takes_its_rows_out_of_the_aggregate(db: asyncpg.Connection) -> None:
    """Deleting a project deletes its ledger lines and rollups (ON DELETE CASCADE). PostgreSQL runs the cascade as the
    tables' owner, to whom row-level security applies (FORCE), with no tenant set: the triggers saw none of the rows'
    organizations and left the project's spend in the aggregate (the organization read 16 USD, the full computation
    and a rebuild 1), so its budgets kept alerts open on spend that no longer counts (migration 0028)."""
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    a, b = org.projects["proj_a"], org.projects["proj_b"]
    await db.execute(
        "INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, estimated_cost_usd) "
        "VALUES ($1, $2, '2026-11-03T10:00Z', 'openai', 1, 5), ($1, $3, '2026-11-03T11:00Z', 'openai', 1, 1)",
        org.id,
        a,
        b,
    )
    await db.execute(
        "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
        "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) "
        "VALUES ($1, $2, 'openai', $3, 'costs_v1', '2026-11-04Z', '2026-11-05Z', 'x', 'USD', 10, '2026-11-05T06:00Z')",
        org.id,
        a,
        org.ai_org,
    )
    assert await spend(db, "cost_worker_spend", "organization", org.id, None) == 16
    async with db.transaction():
        await db.execute("DELETE FROM projects WHERE id = $1", a)
        # The tenants the triggers widened for their own work are set back (none here).
        assert await db.fetchval("SELECT current_setting('cost_worker.organization_ids', true)") in (None, "")
    assert await db.fetchval("SELECT count(*) FROM cost_data WHERE organization_id = $1", org.id) == 0
    assert await spend(db, "cost_worker_spend_full", "organization", org.id, None) == 1
    assert await spend(db, "cost_worker_spend", "organization", org.id, None) == 1
    assert await spend(db, "cost_worker_spend", "project", org.id, b) == 1
    await assert_incremental_equals_rebuilt(db, org.id)
    # Deleting the organization takes the rest (and its aggregate) with it, as before.
    await db.execute("DELETE FROM organizations WHERE id = $1", org.id)
    assert await db.fetchval("SELECT count(*) FROM spend_hourly WHERE organization_id = $1", org.id) == 0
    assert await db.fetchval("SELECT count(*) FROM spend_daily WHERE organization_id = $1", org.id) == 0


async def test_a_users_spend_keeps_the_usage_of_a_deleted_project(db: asyncpg.Connection) -> None:
    """A user budget is the money the user spent (their estimates): deleting a project the user worked in does not
    give it back. The user's rollups (`user_metrics`, no foreign key to projects) and the user's scope in the
    aggregate keep the deleted project's usage, and the full computation agrees; the organization's and the
    project's figures drop (their rows cascade, 0028), and a user budget within the deleted project is deleted with
    it (README "What counts as spend", scopes)."""
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    a, b = org.projects["proj_a"], org.projects["proj_b"]
    user = org.users[0]
    for project, cost in ((a, 5), (b, 1)):  # what the worker writes for one event: both rollups
        await db.execute(
            "INSERT INTO project_metrics (organization_id, project_id, hour, request_count, estimated_cost_usd) "
            "VALUES ($1, $2, '2026-11-03T10:00Z', 1, $3)",
            org.id,
            project,
            cost,
        )
        await db.execute(
            "INSERT INTO user_metrics (organization_id, user_id, project_id, hour, request_count, estimated_cost_usd) "
            "VALUES ($1, $2, $3, '2026-11-03T10:00Z', 1, $4)",
            org.id,
            user,
            project,
            cost,
        )
    await db.execute(
        "INSERT INTO ai_budgets (organization_id, user_id, project_id, amount) "
        "VALUES ($1, $2, NULL, 5), ($1, $2, $3, 5)",
        org.id,
        user,
        a,
    )
    assert await track(db, org.id, user, None) == 1
    assert await track(db, org.id, user, a) == 1

    async def user_spend(fn: str) -> Any:
        return await db.fetchval(
            f"SELECT spend FROM {fn}('user', $1, NULL, $2, '2026-11-01Z', '2026-12-01Z', 'USD')", org.id, user
        )

    assert (await user_spend("cost_worker_spend"), await user_spend("cost_worker_spend_full")) == (6, 6)
    await db.execute("DELETE FROM projects WHERE id = $1", a)
    assert await spend(db, "cost_worker_spend", "organization", org.id, None) == 1
    assert await spend(db, "cost_worker_spend_full", "organization", org.id, None) == 1
    # The user's figure keeps the 5 USD spent in the deleted project, in the aggregate and in full.
    assert (await user_spend("cost_worker_spend"), await user_spend("cost_worker_spend_full")) == (6, 6)
    assert await db.fetchval("SELECT count(*) FROM user_metrics WHERE project_id = $1", a) == 1
    # The user's budget within the deleted project went with it; the one over the whole organization stays.
    assert await db.fetchval("SELECT count(*) FROM ai_budgets WHERE user_id = $1", user) == 1
    await assert_incremental_equals_rebuilt(db, org.id)


@pytest.mark.parametrize("case", ["unpriced", "cost"])
async def test_a_line_deciding_usage_in_the_hour_beyond_its_window_recomputes_that_usage(
    db: asyncpg.Connection, case: str
) -> None:
    """A cost line covers the whole hours that start in its window, and an unpriced usage line marks every hour its
    window overlaps (README rule 2): both decide usage lines of their account that overlap those hours without
    overlapping their window. Written after such a usage line, they must take it out of the aggregate, as the full
    computation does: an unpriced 10:05 minute line stops a priced 10:30-11:30 line (both overlap the hour 10:00), a
    10:30-11:30 cost line replaces an 11:40-12:40 line (it covers the hour 11:00). Each line counts at its midpoint,
    outside the hours of the line written after it."""
    org = await make_org(db, project_ids=("proj_a",))
    a = org.projects["proj_a"]

    async def line(kind: str, start: str, end: str, item: str, amount: str | None, collected: str) -> None:
        await db.execute(
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
            "bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, collected_at) "
            "VALUES ($1, $2, 'openai', $3, $4, $5::text::timestamptz, $6::text::timestamptz, $7, 'USD', "
            "$8::text::numeric, $9, $10::text::timestamptz)",
            org.id,
            a,
            org.ai_org,
            kind,
            start,
            end,
            item,
            amount,
            Decimal(5) if kind == "usage_v1" else None,
            collected,
        )

    async def check(wanted: int) -> None:
        for fn in ("cost_worker_spend", "cost_worker_spend_full"):
            assert await spend(db, fn, "organization", org.id, None) == wanted, fn
            assert await spend(db, fn, "project", org.id, a) == wanted, fn
        await assert_incremental_equals_rebuilt(db, org.id)

    if case == "unpriced":
        await line("usage_v1", "2026-11-03T10:30Z", "2026-11-03T11:30Z", "m1:input", "3", "2026-11-03T12:00Z")
        await check(3)
        await line("usage_v1", "2026-11-03T10:05Z", "2026-11-03T10:06Z", "mx:input", None, "2026-11-03T12:00Z")
        await check(0)  # the hour 10:00 holds unpriced calls: its estimate counts (none here), not the priced line
        return
    await line("usage_v1", "2026-11-04T11:40Z", "2026-11-04T12:40Z", "m1:input", "4", "2026-11-04T13:00Z")
    await check(4)
    await line("costs_v1", "2026-11-04T10:30Z", "2026-11-04T11:30Z", "x", "7", "2026-11-04T12:00Z")
    await check(7)  # the cost line covers the hour 11:00: the 11:40-12:40 usage stops counting


async def test_the_migration_queues_every_organization_for_a_spend_rebuild(
    empty_database_url: str, tmp_path: Path
) -> None:
    """0044 queues every organization that exists when it runs (aggregates kept before 0035 and 0036 hold their
    error until rebuilt); the writer finds them across tenants, the reader only within its tenants."""
    await migrate_before(empty_database_url, tmp_path, 44)
    db = await asyncpg.connect(empty_database_url)
    try:
        orgs = {(await make_org(db)).id, (await make_org(db, ai_org="org-second")).id}
        await migrate(empty_database_url)
        rows = await db.fetch("SELECT organization_id, reason FROM spend_rebuilds")
        assert {row["organization_id"] for row in rows} == orgs
        assert all(row["reason"].startswith("migration 0044") for row in rows)
        async with db.transaction():
            await db.execute("SET LOCAL ROLE cost_worker_writer")
            assert await db.fetchval("SELECT count(*) FROM spend_rebuilds") == 2
        async with db.transaction():
            await db.execute("SET LOCAL ROLE cost_worker_reader")
            assert await db.fetchval("SELECT count(*) FROM spend_rebuilds") == 0  # no tenant set
        # An organization created after the migration is not queued: its aggregate is kept from its first row.
        await make_org(db, ai_org="org-third")
        assert await db.fetchval("SELECT count(*) FROM spend_rebuilds") == 2
    finally:
        await db.close()


async def test_the_sweep_rebuilds_a_queued_organization_before_it_evaluates(
    db: asyncpg.Connection, database: Database, settings: Settings
) -> None:
    """An organization whose aggregate holds an error (here: a cost line loaded with triggers off, as aggregates
    written before 0035/0036 held theirs) and that a migration queued: the worker's sweep rebuilds it, takes it off
    the queue and then raises the alert the corrected spend crosses. Before 0044 the sweep read the stale 5 of 10
    and raised nothing until someone ran `budgets rebuild-spend`."""
    org = await make_org(db, project_ids=("proj_a",))
    a = org.projects["proj_a"]
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    month = (start, (start + timedelta(days=32)).replace(day=1))
    await db.execute(
        "INSERT INTO ai_organization_budgets (organization_id, name, amount, period, timezone, thresholds) "
        "VALUES ($1, 'Monthly', 10, 'monthly', 'UTC', '{100}')",
        org.id,
    )
    await db.execute(
        "INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, estimated_cost_usd) "
        "VALUES ($1, $2, $3, 'openai', 1, 5)",
        org.id,
        a,
        start,
    )
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, report, "
        "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) VALUES "
        "($1, $2, 'openai', $3, 'costs_v1', 'openai.costs', $4, $5, 'x', 'USD', 12, $5)",
        org.id,
        a,
        org.ai_org,
        start,
        start + timedelta(hours=1),
    )
    await db.execute("SET session_replication_role = origin")
    await db.execute("INSERT INTO spend_rebuilds (organization_id, reason) VALUES ($1, 'test')", org.id)
    assert await spend(db, "cost_worker_spend", "organization", org.id, None, period=month) == 5  # stale: under 10

    engine = BudgetEngine(settings)
    stop = asyncio.Event()
    raised: list[Any] = []

    async def on_alerts(alerts: list[Any]) -> None:
        raised.extend(alerts)
        stop.set()

    sweeps = asyncio.create_task(engine.run_sweeps(database, stop, on_alerts=on_alerts))
    try:
        await asyncio.wait_for(stop.wait(), timeout=30)
    finally:
        stop.set()
        await sweeps
    assert [(a.threshold, a.spend, a.amount) for a in raised] == [(Decimal(100), Decimal(12), Decimal(10))]
    assert await db.fetchval("SELECT count(*) FROM spend_rebuilds") == 0
    assert metrics.SPEND_REBUILDS_QUEUED._value.get() == 0
    assert await spend(db, "cost_worker_spend", "organization", org.id, None, period=month) == 12
    await assert_incremental_equals_rebuilt(db, org.id)
    assert await engine.rebuild_queued(database) == 0  # nothing queued: nothing rebuilt twice
