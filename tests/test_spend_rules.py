"""What counts as spend, on realistic provider data: the database against the independent model.

A hypothesis property test feeds random mixes of provider snapshots (hourly and daily windows, minute usage buckets
not on the hour, costs and usage, grouped and ungrouped lines, revisions that add, drop and move lines, open buckets,
unpriced lines, Anthropic's Priority Tier) and API-usage events (several providers, unknown models) through the
real pipeline, one message per batch, and compares every budget's spend in every period, and the set of alerts
raised, with ``tests/spend_model.py`` exactly. Budgets are daily and monthly in UTC, America/Los_Angeles, Europe/Berlin,
Asia/Kolkata, Pacific/Chatham, America/Havana and Atlantic/Azores, around DST changes (the last two repeat a
local midnight).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import (
    add_price,
    anthropic_cost_bucket,
    anthropic_usage_bucket,
    api_event,
    dumps,
    envelope,
    make_org,
    migrate_before,
    openai_cost_bucket,
    openai_usage_bucket,
    ts,
)
from tests.feeding import Feeder
from tests.kafka_helpers import create_topics, produce, run_worker
from tests.spend_model import Estimate, Ledger, Row, SpendModel, periods_overlapping, sum_lines
from worker.config import Settings
from worker.migrate import migrate
from worker.providers import COMPLETION_TOKEN_TYPES

EXAMPLES = 60
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# First days of the generated data: each puts a DST change of one of the budgets' zones inside the three days.
BASE_DAYS = (
    datetime(2026, 3, 7, tzinfo=UTC),  # America/Los_Angeles springs forward on the 8th
    datetime(2026, 3, 28, tzinfo=UTC),  # Europe/Berlin on the 29th
    datetime(2026, 4, 4, tzinfo=UTC),  # Pacific/Chatham falls back on the 5th (03:45 -> 02:45 local)
    datetime(2026, 10, 24, tzinfo=UTC),  # Europe/Berlin falls back on the 25th, the Azores at midnight
    datetime(2026, 10, 30, tzinfo=UTC),  # month end in every zone; Los Angeles and Havana fall back on 1 November
)
# Havana (1 November) and the Azores (25 October) turn their clocks back across midnight: it happens twice.
ZONES = (
    "UTC",
    "America/Los_Angeles",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Pacific/Chatham",
    "America/Havana",
    "Atlantic/Azores",
)
MODELS = {  # API-usage event model -> the provider the catalogue gives it (None: unknown)
    "gpt-4o": "openai",
    "claude-sonnet-4-0": "anthropic",
    "gemini-1.5-pro": "google",
    "mystery-model-7": None,
}
OPENAI_ZERO_TYPES = tuple(t for t, _ in COMPLETION_TOKEN_TYPES if t != "input_text_tokens")
ANTHROPIC_ZERO_TYPES = (
    "cache_read_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_creation_5m_input_tokens",
    "output_tokens",
)


# ------------------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Snapshot:
    """One provider message: one bucket of one report."""

    report: str  # openai.costs | openai.usage | anthropic.costs | anthropic.usage
    day: int
    hour: int | None  # None: a daily window
    collected_after: int  # hours after the window start
    lines: tuple[tuple[str | None, str, int], ...]  # (project, item / model / tier, amount or tokens)
    minute: int | None = None  # a usage bucket of bucket_width=1m at this minute of the hour (not on the hour)


@dataclass(frozen=True)
class Event:
    project: str | None
    model: str
    hour: int  # hours after the first day's start
    cost: int


Step = Snapshot | Event

openai_projects = st.sampled_from(["proj_a", "proj_b", None])
anthropic_projects = st.sampled_from(["ws_c", None])


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    report = draw(st.sampled_from(["openai.costs", "openai.usage", "anthropic.costs", "anthropic.usage"]))
    daily = draw(st.booleans()) if report.endswith("usage") else draw(st.sampled_from([True, True, False]))
    hour = None if daily else draw(st.integers(0, 23))
    collected_after = draw(st.sampled_from([1, 5, 12, 21, 24, 30]) if daily else st.sampled_from([1, 2]))
    if report == "openai.costs":
        line = st.tuples(openai_projects, st.sampled_from(["x", "y"]), st.integers(0, 9))
    elif report == "openai.usage":
        line = st.tuples(openai_projects, st.sampled_from(["m1", "m1", "mx"]), st.integers(1, 9))
    elif report == "anthropic.costs":
        line = st.tuples(anthropic_projects, st.sampled_from(["x", "y"]), st.integers(0, 9))
    else:
        line = st.tuples(anthropic_projects, st.sampled_from(["standard", "priority"]), st.integers(1, 9))
    lines = draw(st.lists(line, min_size=0 if draw(st.integers(0, 5)) == 0 else 1, max_size=3))
    day = draw(st.sampled_from([0, 0, 1]))
    minute = draw(st.sampled_from([None, None, 5, 40])) if hour is not None and report.endswith("usage") else None
    if minute is not None:  # often in an hour holding a local midnight (Chatham 10:15 or 11:15, Kolkata 18:30 UTC)
        hour = draw(st.sampled_from([hour, 10, 11, 18]))
    return Snapshot(report, day, hour, collected_after, tuple(lines), minute)


# Events cluster on a few hours (early, late, across midnight UTC) so that coverage decisions meet them often.
EVENT_HOURS = (0, 3, 7, 10, 11, 16, 18, 20, 23, 24, 26, 31)
events = st.builds(
    Event,
    project=st.sampled_from(["proj_a", "proj_a", "proj_b", "ws_c", "ws_c", None]),
    model=st.sampled_from(
        ["gpt-4o", "gpt-4o", "claude-sonnet-4-0", "claude-sonnet-4-0", "gemini-1.5-pro", "mystery-model-7"]
    ),
    hour=st.sampled_from(EVENT_HOURS),
    cost=st.integers(1, 9),
)


@st.composite
def steps(draw: st.DrawFn) -> list[Step]:
    """Some estimates first (what the provider data then has to replace), then snapshots and events mixed."""
    first: list[Step] = list(draw(st.lists(events, min_size=2, max_size=8)))
    return first + draw(st.lists(st.one_of(snapshots(), snapshots(), events), min_size=1, max_size=10))


# ------------------------------------------------------------------------------------------------- world


@dataclass
class World:
    """One organization per example: two projects on an OpenAI account, a workspace on an Anthropic one."""

    org: uuid.UUID
    user: uuid.UUID
    openai_account: str
    anthropic_account: str
    projects: dict[str, uuid.UUID]
    base: datetime
    budgets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def account_of_project(self) -> dict[uuid.UUID, tuple[str, str]]:
        return {
            self.projects["proj_a"]: ("openai", self.openai_account),
            self.projects["proj_b"]: ("openai", self.openai_account),
            self.projects["ws_c"]: ("anthropic", self.anthropic_account),
        }


async def make_world(db: asyncpg.Connection, base: datetime) -> World:
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    anthropic_account = f"anth-{uuid.uuid4().hex[:8]}"
    workspace = uuid.uuid4()
    await db.execute(
        "INSERT INTO projects (id, organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
        "VALUES ($1, $2, 'ws_c', 'anthropic', $3, 'ws_c')",
        workspace,
        org.id,
        anthropic_account,
    )
    world = World(org.id, org.users[0], org.ai_org, anthropic_account, {**org.projects, "ws_c": workspace}, base)
    specs: list[tuple[str, str | None, str, str]] = [
        *(("organization", None, "daily", zone) for zone in ZONES),
        ("organization", None, "monthly", "America/Los_Angeles"),
        ("project", "proj_a", "daily", "Europe/Berlin"),
        ("project", "proj_b", "daily", "Pacific/Chatham"),
        ("project", "ws_c", "daily", "Asia/Kolkata"),
        ("user", None, "daily", "UTC"),
    ]
    for scope, project, kind, zone in specs:
        budget = uuid.uuid4()
        project_id = world.projects[project] if project else None
        table = {"organization": "ai_organization_budgets", "project": "ai_project_budgets", "user": "ai_budgets"}
        columns = "id, organization_id, amount, period, timezone, thresholds"
        values = [budget, org.id, Decimal(20), kind, zone, [Decimal(10), Decimal(50), Decimal(100)]]
        if scope == "project":
            columns += ", project_id"
            values.append(project_id)
        if scope == "user":
            columns += ", user_id"
            values.append(world.user)
        placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        await db.execute(f"INSERT INTO {table[scope]} ({columns}) VALUES ({placeholders})", *values)
        world.budgets.append(
            {
                "id": budget,
                "scope": scope,
                "project": project_id,
                "user": world.user if scope == "user" else None,
                "period": kind,
                "timezone": zone,
                "amount": Decimal(20),
                "thresholds": (Decimal(10), Decimal(50), Decimal(100)),
            }
        )
    return world


async def add_prices(db: asyncpg.Connection) -> None:
    """One USD per token of the priced models (``mx`` has no price: its lines stay unpriced)."""
    await add_price(db, "openai", "m1", "input_text_tokens", "1000000")
    await add_price(db, "anthropic", "a1", "uncached_input_tokens", "1000000")
    await add_price(db, "anthropic", "a1", "uncached_input_tokens/service_tier=priority", "1000000")


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def window_of(world: World, snap: Snapshot) -> tuple[datetime, datetime]:
    start = world.base + snap.day * DAY + (HOUR * snap.hour if snap.hour is not None else timedelta(0))
    if snap.minute is not None:
        start += timedelta(minutes=snap.minute)
        return start, start + timedelta(minutes=1)
    return start, start + (HOUR if snap.hour is not None else DAY)


Window = tuple[str, str, str, datetime, datetime]


def payload_and_rows(world: World, snap: Snapshot) -> tuple[dict[str, Any], list[Row], Window]:
    """The provider message as a producer sends it, and the ledger rows the model expects from it."""
    start, end = window_of(world, snap)
    collected = start + HOUR * snap.collected_after
    provider = snap.report.split(".")[0]
    account = world.openai_account if provider == "openai" else world.anthropic_account
    rows: list[Row] = []

    def row(project: str | None, report: str, kind: str, item: str, amount: Decimal | None, **extra: Any) -> Row:
        return Row(
            world.org,
            world.projects[project] if project else None,
            provider,
            account,
            report,
            kind,
            start,
            end,
            item,
            amount,
            collected,
            **extra,
        )

    if snap.report == "openai.costs":
        bucket = openai_cost_bucket(_iso(start)[:-1], _iso(end)[:-1], [(p, i, str(a)) for p, i, a in snap.lines])
        rows = [row(p, "openai.costs", "cost", i, Decimal(a)) for p, i, a in snap.lines]
        api = "costs_v1"
    elif snap.report == "openai.usage":
        results = [{"project_id": p, "model": m, "input_tokens": n} for p, m, n in snap.lines]
        bucket = openai_usage_bucket(_iso(start)[:-1], _iso(end)[:-1], results)
        for p, m, n in snap.lines:
            rows.append(
                row(
                    p,
                    "openai.usage.completions",
                    "usage",
                    f"{m}:input_text_tokens",
                    Decimal(n) if m == "m1" else None,
                    quantity=Decimal(n),
                )
            )
            rows += [
                row(p, "openai.usage.completions", "usage", f"{m}:{t}", Decimal(0), quantity=Decimal(0))
                for t in OPENAI_ZERO_TYPES
            ]
        api = "usage_v1"
    elif snap.report == "anthropic.costs":
        results = [
            {"amount": str(a * 100), "currency": "USD", "description": i, **({"workspace_id": p} if p else {})}
            for p, i, a in snap.lines
        ]
        bucket = anthropic_cost_bucket(_iso(start), _iso(end), results)
        rows = [row(p, "anthropic.cost_report", "cost", i, Decimal(a)) for p, i, a in snap.lines]
        api = "costs_v1"
    else:
        results = [
            {"uncached_input_tokens": n, "model": "a1", "workspace_id": p, "service_tier": tier}
            for p, tier, n in snap.lines
        ]
        bucket = anthropic_usage_bucket(_iso(start), _iso(end), results)
        for p, tier, n in snap.lines:
            suffix = ":priority" if tier == "priority" else ""
            outside = tier == "priority"
            rows.append(
                row(
                    p,
                    "anthropic.usage_report.messages",
                    "usage",
                    f"a1:uncached_input_tokens{suffix}",
                    Decimal(n),
                    quantity=Decimal(n),
                    outside_cost_report=outside,
                )
            )
            rows += [
                row(
                    p,
                    "anthropic.usage_report.messages",
                    "usage",
                    f"a1:{t}{suffix}",
                    Decimal(0),
                    quantity=Decimal(0),
                    outside_cost_report=outside,
                )
                for t in ANTHROPIC_ZERO_TYPES
            ]
        api = "usage_v1"
    report = rows[0].report if rows else _report_name(snap.report)
    message = envelope(provider, account, api, [bucket], collected_at=_iso(collected))
    return message, sum_lines(rows), (provider, account, report, start, end)


def _report_name(short: str) -> str:
    return {
        "openai.costs": "openai.costs",
        "openai.usage": "openai.usage.completions",
        "anthropic.costs": "anthropic.cost_report",
        "anthropic.usage": "anthropic.usage_report.messages",
    }[short]


# ------------------------------------------------------------------------------------------------- the model


@dataclass
class Expected:
    """The model's view of one example, advanced step by step like the worker."""

    world: World
    ledger: Ledger = field(default_factory=Ledger)
    estimates: list[Estimate] = field(default_factory=list)
    alerts: dict[tuple[uuid.UUID, datetime, Decimal], Decimal] = field(default_factory=dict)

    def model(self) -> SpendModel:
        return SpendModel(self.ledger.current(), self.estimates, self.world.account_of_project)

    def spend(self, budget: dict[str, Any], start: datetime, end: datetime) -> Decimal:
        return self.model().spend(budget["scope"], self.world.org, budget["project"], budget["user"], start, end)

    def spends(self) -> dict[tuple[int, datetime, datetime], Decimal]:
        """Every budget's spend in each of its periods over the example's days."""
        model = self.model()
        found = {}
        for index, budget in enumerate(self.world.budgets):
            for start, end in example_periods(self.world, budget):
                found[(index, start, end)] = model.spend(
                    budget["scope"], self.world.org, budget["project"], budget["user"], start, end
                )
        return found

    def decide(self, before: dict[tuple[int, datetime, datetime], Decimal]) -> None:
        """Every period whose spend the step changed is decided again: the worker must evaluate each of them,
        whatever row the change came through (this does not restate which periods the worker touches)."""
        for (index, start, end), spend in sorted(self.spends().items(), key=lambda item: (item[0][0], item[0][1])):
            if spend == before[(index, start, end)]:
                continue
            budget = self.world.budgets[index]
            for threshold in budget["thresholds"]:
                key = (budget["id"], start, threshold)
                reached = Fraction(spend) * 100 >= Fraction(budget["amount"]) * Fraction(threshold)  # exact
                if key not in self.alerts and reached:
                    self.alerts[key] = spend
                elif key in self.alerts and not reached:  # resolved (issue 12): spend fell below it
                    del self.alerts[key]

    def snapshot(self, rows: list[Row], window: tuple[str, str, str, datetime, datetime], collected: datetime) -> None:
        before = self.spends()
        self.ledger.apply([window], rows, collected)
        self.decide(before)

    def event(self, estimate: Estimate) -> None:
        before = self.spends()
        self.estimates.append(estimate)
        self.decide(before)


def example_periods(world: World, budget: dict[str, Any]) -> list[tuple[datetime, datetime]]:
    """The budget's periods over the days an example's data can reach."""
    return list(periods_overlapping(budget["period"], budget["timezone"], world.base - DAY, world.base + 4 * DAY))


# ------------------------------------------------------------------------------------------------- the test

RECORD = {"examples": 0, "steps": 0, "seconds": 0.0}


async def run_steps(db: asyncpg.Connection, feeder: Feeder, base: datetime, plan: list[Step]) -> tuple[World, Expected]:
    world = await make_world(db, base)
    expected = Expected(world)
    for step in plan:
        await apply_step(feeder, world, expected, base, step)
    return world, expected


async def apply_step(feeder: Feeder, world: World, expected: Expected, base: datetime, step: Step) -> None:
    """Feed one step (a provider snapshot or an API-usage event) to the worker and to the model."""
    if isinstance(step, Snapshot):
        message, rows, window = payload_and_rows(world, step)
        outcome = await feeder.buckets(message)
        if expected.ledger.overlaps(window):  # another width of a stored window of its report (rule 1)
            assert [q.reason.value for q in outcome.quarantine] == ["overlapping_window"]
            return
        assert not outcome.quarantine, [q.detail for q in outcome.quarantine]
        expected.snapshot(rows, window, window[3] + HOUR * step.collected_after)
        return
    at = base + HOUR * step.hour + timedelta(minutes=30)
    project = world.projects[step.project] if step.project else None
    payload = api_event(
        _org_of(world),
        project=project,
        user=world.user,
        occurred_at=_iso(at),
        cost=str(step.cost),
        model=step.model,
    )
    outcome = await feeder.events(payload)
    assert not outcome.quarantine, [q.detail for q in outcome.quarantine]
    expected.event(Estimate(world.org, project, world.user, at, MODELS[step.model], Decimal(step.cost)))


def _org_of(world: World) -> Any:
    from tests.factories import Org  # noqa: PLC0415

    return Org(world.org, world.openai_account)


async def assert_matches_model(db: asyncpg.Connection, world: World, expected: Expected) -> None:
    for budget in world.budgets:
        for start, end in example_periods(world, budget):
            actual = await db.fetchval(
                "SELECT spend FROM cost_worker_spend($1, $2, $3, $4, $5, $6, 'USD')",
                budget["scope"],
                world.org,
                budget["project"],
                budget["user"],
                start,
                end,
            )
            wanted = expected.spend(budget, start, end)
            assert actual == wanted, (budget["scope"], budget["period"], budget["timezone"], start, actual, wanted)
    rows = await db.fetch(
        "SELECT budget_id, period_start, threshold, spend FROM budget_alerts "
        "WHERE organization_id = $1 AND resolved_at IS NULL",  # the open alerts (issue 12 resolves the others)
        world.org,
    )
    actual_alerts = {(r["budget_id"], r["period_start"], r["threshold"]): r["spend"] for r in rows}
    assert actual_alerts == expected.alerts


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(base=st.sampled_from(BASE_DAYS), plan=steps())
async def test_spend_and_alerts_equal_the_model(
    base: datetime, plan: list[Step], db: asyncpg.Connection, feeder: Feeder
) -> None:
    started = time.monotonic()
    await add_prices_once(db)
    world, expected = await run_steps(db, feeder, base, plan)
    await assert_matches_model(db, world, expected)
    RECORD["examples"] += 1
    RECORD["steps"] += len(plan)
    RECORD["seconds"] += time.monotonic() - started


async def add_prices_once(db: asyncpg.Connection) -> None:
    if not await db.fetchval("SELECT count(*) FROM model_prices WHERE model = 'm1'"):
        await add_prices(db)


# ------------------------------------------------------------------------------------------------- regressions
# The audit's rows (issue 11), each through the pipeline and the budget evaluation on a real database.


async def spend_of(
    db: asyncpg.Connection, scope: str, org: Any, project: uuid.UUID | None, start: str, end: str
) -> Decimal:
    value = await db.fetchval(
        "SELECT spend FROM cost_worker_spend($1, $2, $3, NULL, $4::text::timestamptz, $5::text::timestamptz, 'USD')",
        scope,
        org.id,
        project,
        start,
        end,
    )
    assert isinstance(value, Decimal)
    return value


async def test_row1_daily_costs_replace_hourly_usage_of_the_same_day(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    await add_prices(db)
    hourly = [
        openai_usage_bucket(
            f"2026-11-03T{h:02d}:00:00",
            f"2026-11-03T{h + 1:02d}:00:00",
            [{"project_id": "proj_a", "model": "m1", "input_tokens": 4}],
        )
        for h in range(23)
    ] + [
        openai_usage_bucket(
            "2026-11-03T23:00:00", "2026-11-04T00:00:00", [{"project_id": "proj_a", "model": "m1", "input_tokens": 8}]
        )
    ]
    await feeder.buckets(envelope("openai", org.ai_org, "usage_v1", hourly, collected_at="2026-11-04T02:00:00Z"))
    assert await spend_of(db, "project", org, org.projects["proj_a"], "2026-11-03Z", "2026-11-04Z") == 100
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", "100")])],
            collected_at="2026-11-04T03:00:00Z",
        )
    )
    assert await spend_of(db, "project", org, org.projects["proj_a"], "2026-11-03Z", "2026-11-04Z") == 100  # not 196
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 100


async def test_row2_org_level_costs_cover_every_project_of_the_account(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    await add_prices(db)
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
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-03", "2026-11-04", [(None, "all", "50")])],
            collected_at="2026-11-04T03:00:00Z",
        )
    )
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 50  # not 100
    # A project budget sees its own rows: its usage, not the account's ungrouped total.
    assert await spend_of(db, "project", org, org.projects["proj_a"], "2026-11-03Z", "2026-11-04Z") == 30


async def test_row3_a_regrouped_or_moved_line_replaces_the_earlier_snapshot(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    day = ("2026-11-03", "2026-11-04")
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [("proj_a", "GPT-4o input", "30")])],
            collected_at="2026-11-04T01:00:00Z",
        )
    )
    # Re-polled with another grouping (no line items) and the spend moved to project B.
    outcome = await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [("proj_b", None, "30")])],
            collected_at="2026-11-04T05:00:00Z",
        )
    )
    assert outcome.ledger_lines[("costs_v1", "superseded")] == 1
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 30  # not 60
    assert await spend_of(db, "project", org, org.projects["proj_a"], "2026-11-03Z", "2026-11-04Z") == 0
    # The retired line is kept, marked superseded; an older revision arriving late changes nothing.
    kept = await db.fetch("SELECT project_id, superseded_at IS NOT NULL AS retired FROM cost_data ORDER BY 2")
    assert [(r["project_id"], r["retired"]) for r in kept] == [
        (org.projects["proj_b"], False),
        (org.projects["proj_a"], True),
    ]
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [("proj_a", "GPT-4o input", "30")])],
            collected_at="2026-11-04T01:00:00Z",
        )
    )
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 30
    # Another report over the same window (usage) never retires the cost report's lines.
    await feeder.buckets(
        envelope("openai", org.ai_org, "usage_v1", [openai_usage_bucket(*day, [])], collected_at="2026-11-04T09:00:00Z")
    )
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 30


async def test_row4_an_open_bucket_covers_only_the_hours_before_its_collection(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    org = await make_org(db)
    a = org.projects["proj_a"]
    await feeder.events(
        *(
            api_event(org, project=a, cost="1", occurred_at=f"2026-11-03T{h:02d}:10:00Z", model="gpt-4o")
            for h in range(24)
        )
    )
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", "6")])],
            collected_at="2026-11-03T06:00:00Z",
        )
    )
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 24  # 6 + 18 estimated hours


async def test_row5_an_unpriced_usage_line_covers_nothing(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    a = org.projects["proj_a"]
    await feeder.events(
        *(
            api_event(org, project=a, cost="1", occurred_at=f"2026-11-03T{h:02d}:10:00Z", model="gpt-4o")
            for h in range(24)
        )
    )
    outcome = await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "usage_v1",
            [
                openai_usage_bucket(
                    "2026-11-03",
                    "2026-11-04",
                    [{"project_id": "proj_a", "model": "no-price-yet", "input_tokens": 1000}],
                )
            ],
            collected_at="2026-11-04T02:00:00Z",
        )
    )
    assert outcome.unpriced["openai"] == 1
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 24  # not 0


async def test_an_unpriced_model_beside_a_priced_one_keeps_the_estimate_of_its_hour(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """README rule 2: where a usage line of the hour is unpriced, the usage lines of that (account, project, hour)
    neither count nor cover the estimate, which holds every model's calls. Before, the priced model's line (3 USD)
    replaced the whole hour's estimate (9 USD) and the unpriced model's calls counted nothing: 3 where they cost 9."""
    org = await make_org(db)
    await add_prices(db)
    a = org.projects["proj_a"]
    await feeder.events(
        api_event(org, project=a, cost="3", occurred_at="2026-11-03T10:10:00Z", model="gpt-4o"),
        api_event(org, project=a, cost="6", occurred_at="2026-11-03T10:20:00Z", model="gpt-4o"),
    )
    outcome = await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "usage_v1",
            [
                openai_usage_bucket(
                    "2026-11-03T10:00:00",
                    "2026-11-03T11:00:00",
                    [
                        {"project_id": "proj_a", "model": "m1", "input_tokens": 3},
                        {"project_id": "proj_a", "model": "mx", "input_tokens": 6},
                    ],
                )
            ],
            collected_at="2026-11-03T12:00:00Z",
        )
    )
    assert outcome.unpriced["openai"] == 1
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 9  # not 3
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 9
    full = await db.fetchval(
        "SELECT spend FROM cost_worker_spend_full('project', $1, $2, NULL, '2026-11-03Z', '2026-11-04Z', 'USD')",
        org.id,
        a,
    )
    assert full == 9
    # The provider's cost report still beats both: it replaces the usage and the estimate of its hours.
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", "8")])],
            collected_at="2026-11-04T02:00:00Z",
        )
    )
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 8


async def test_an_unpriced_line_stops_a_daily_usage_line_in_another_local_period(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """An unpriced hourly line at 20:00 UTC (Kolkata's next day; of the embeddings report: another width of the
    completions report would be an overlapping window) stops the priced daily usage line of its UTC day
    counting; that line counts in the Kolkata day of its midpoint (12:00 UTC), whose spend goes from 4 (the usage)
    to 9 (the estimate of 10:00 it no longer covers). That period is evaluated (the alert is raised) and the
    aggregate kept incrementally equals the one rebuilt and the full computation."""
    from tests.test_spend_aggregate import assert_incremental_equals_rebuilt  # noqa: PLC0415

    org = await make_org(db)
    await add_prices(db)
    a = org.projects["proj_a"]
    budget = uuid.uuid4()
    await db.execute(
        "INSERT INTO ai_organization_budgets (id, organization_id, amount, period, timezone, thresholds) "
        "VALUES ($1, $2, 8, 'daily', 'Asia/Kolkata', '{100}')",
        budget,
        org.id,
    )
    await feeder.events(api_event(org, project=a, cost="9", occurred_at="2026-11-03T10:10:00Z", model="gpt-4o"))
    daily = [{"project_id": "proj_a", "model": "m1", "input_tokens": 4}]
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "usage_v1",
            [openai_usage_bucket("2026-11-03", "2026-11-04", daily)],
            collected_at="2026-11-04T02:00:00Z",
        )
    )
    kolkata_nov3 = ("2026-11-02T18:30:00Z", "2026-11-03T18:30:00Z")
    assert await spend_of(db, "organization", org, None, *kolkata_nov3) == 4
    open_alerts = "SELECT period_start, spend FROM budget_alerts WHERE budget_id = $1 AND resolved_at IS NULL"
    assert not await db.fetch(open_alerts, budget)  # the estimate's alert (9) was resolved by the usage (4)

    def embeddings(results: list[dict[str, Any]]) -> dict[str, Any]:
        bucket = {"object": "bucket", "start_time": ts("2026-11-03T20:00:00"), "end_time": ts("2026-11-03T21:00:00")}
        shape = {"object": "organization.usage.embeddings.result", "num_model_requests": 1, "user_id": None}
        return {**bucket, "results": [{**shape, "api_key_id": None, **result} for result in results]}

    unpriced = [{"project_id": "proj_a", "model": "mx", "input_tokens": 6}]
    unpriced_hour = envelope(
        "openai", org.ai_org, "usage_v1", [embeddings(unpriced)], collected_at="2026-11-03T22:00:00Z"
    )
    outcome = await feeder.buckets({**unpriced_hour, "endpoint": "embeddings"})
    assert not outcome.quarantine, [q.detail for q in outcome.quarantine]
    assert await spend_of(db, "organization", org, None, *kolkata_nov3) == 9
    full = await db.fetchval(
        "SELECT spend FROM cost_worker_spend_full('organization', $1, NULL, NULL, $2::text::timestamptz, "
        "$3::text::timestamptz, 'USD')",
        org.id,
        *kolkata_nov3,
    )
    assert full == 9
    await assert_incremental_equals_rebuilt(db, org.id)
    alerts = await db.fetch(open_alerts, budget)
    assert [(r["period_start"], r["spend"]) for r in alerts] == [(datetime(2026, 11, 2, 18, 30, tzinfo=UTC), 9)]
    # A re-poll of the hour without the unpriced line: the daily usage counts and covers again.
    empty = envelope("openai", org.ai_org, "usage_v1", [embeddings([])], collected_at="2026-11-03T23:00:00Z")
    outcome = await feeder.buckets({**empty, "endpoint": "embeddings"})  # without it, an empty bucket is completions'
    assert not outcome.quarantine, [q.detail for q in outcome.quarantine]
    assert await spend_of(db, "organization", org, None, *kolkata_nov3) == 4
    await assert_incremental_equals_rebuilt(db, org.id)


async def test_row6_provider_rows_count_in_the_local_period_of_their_midpoint(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    org = await make_org(db)
    budgets = {}
    for kind, zone in (
        ("daily", "America/Los_Angeles"),
        ("monthly", "America/Los_Angeles"),
        ("daily", "Asia/Kolkata"),
        ("daily", "Europe/Berlin"),
    ):
        budget = uuid.uuid4()
        await db.execute(
            "INSERT INTO ai_organization_budgets (id, organization_id, amount, period, timezone, thresholds) "
            "VALUES ($1, $2, 10, $3, $4, '{100}')",
            budget,
            org.id,
            kind,
            zone,
        )
        budgets[(kind, zone)] = budget
    # The UTC day 1 November (16:00 31 October to 16:00 1 November in Los Angeles; midpoint 12:00 UTC = 05:00 PDT
    # on 1 November) counts on 1 November and in November there, not on 31 October nor in October.
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", "10")])],
            collected_at="2026-11-02T03:00:00Z",
        )
    )
    raised = {r["budget_id"]: r["period_start"] for r in await db.fetch("SELECT * FROM budget_alerts")}
    assert raised == {
        budgets[("daily", "America/Los_Angeles")]: datetime(2026, 11, 1, 7, tzinfo=UTC),  # midnight PDT
        budgets[("monthly", "America/Los_Angeles")]: datetime(2026, 11, 1, 7, tzinfo=UTC),
        budgets[("daily", "Asia/Kolkata")]: datetime(2026, 10, 31, 18, 30, tzinfo=UTC),  # 1 Nov 00:00 IST
        budgets[("daily", "Europe/Berlin")]: datetime(2026, 10, 31, 23, tzinfo=UTC),  # 1 Nov 00:00 CET
    }
    assert await spend_of(db, "organization", org, None, "2026-10-31T07:00:00Z", "2026-11-01T07:00:00Z") == 0
    assert await spend_of(db, "organization", org, None, "2026-10-01T07:00:00Z", "2026-11-01T07:00:00Z") == 0


async def test_row10_estimates_are_replaced_only_by_their_provider(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    a = org.projects["proj_a"]
    await feeder.events(
        api_event(org, project=a, cost="5", occurred_at="2026-11-03T10:00:00Z", model="gpt-4o"),
        api_event(org, project=a, cost="7", occurred_at="2026-11-03T10:20:00Z", model="claude-sonnet-4-0"),
        api_event(org, project=a, cost="3", occurred_at="2026-11-03T10:40:00Z", model="gemini-1.5-pro"),
        api_event(org, project=a, cost="2", occurred_at="2026-11-03T10:50:00Z", model="an-unknown-model"),
    )
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 17
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", "6")])],
            collected_at="2026-11-04T03:00:00Z",
        )
    )
    # OpenAI's cost replaces the gpt-4o estimate only; Claude, Gemini and the unknown model still count.
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 6 + 7 + 3 + 2


async def test_anthropic_priority_tier_usage_counts_once_next_to_the_cost_report(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    org = await make_org(db, provider="anthropic", project_ids=("ws_c",))
    await add_prices(db)
    day = ("2026-11-03T00:00:00Z", "2026-11-04T00:00:00Z")
    await feeder.buckets(
        envelope(
            "anthropic",
            org.ai_org,
            "usage_v1",
            [
                anthropic_usage_bucket(
                    *day,
                    [
                        {
                            "workspace_id": "ws_c",
                            "model": "a1",
                            "uncached_input_tokens": 40,
                            "service_tier": "standard",
                        },
                        {"workspace_id": "ws_c", "model": "a1", "uncached_input_tokens": 9, "service_tier": "priority"},
                    ],
                )
            ],
            collected_at="2026-11-04T02:00:00Z",
        )
    )
    await feeder.buckets(
        envelope(
            "anthropic",
            org.ai_org,
            "costs_v1",
            [
                anthropic_cost_bucket(
                    *day,
                    [
                        {"workspace_id": "ws_c", "amount": "4000", "currency": "USD", "description": "tokens"},
                    ],
                )
            ],
            collected_at="2026-11-04T03:00:00Z",
        )
    )
    # The cost report (40) replaces the standard usage; the Priority Tier usage (9) it omits counts on top.
    assert await spend_of(db, "project", org, org.projects["ws_c"], "2026-11-03Z", "2026-11-04Z") == 49


async def test_priority_tier_usage_beside_an_unpriced_model_counts_once(db: asyncpg.Connection, feeder: Feeder) -> None:
    """Without the cost report, an unpriced model's line stops the Priority Tier usage of its hours counting (the
    estimate, 20, holds those calls); the cost report then beats both and the usage it omits counts on top."""
    org = await make_org(db, provider="anthropic", project_ids=("ws_c",))
    await add_prices(db)
    ws = org.projects["ws_c"]
    day = ("2026-11-03T00:00:00Z", "2026-11-04T00:00:00Z")
    await feeder.events(
        api_event(org, project=ws, cost="20", occurred_at="2026-11-03T10:00:00Z", model="claude-sonnet-4-0")
    )
    lines = [
        {"workspace_id": "ws_c", "model": "a-new", "uncached_input_tokens": 40, "service_tier": "standard"},
        {"workspace_id": "ws_c", "model": "a1", "uncached_input_tokens": 9, "service_tier": "priority"},
    ]
    usage = envelope(
        "anthropic", org.ai_org, "usage_v1", [anthropic_usage_bucket(*day, lines)], collected_at="2026-11-04T02:00:00Z"
    )
    assert (await feeder.buckets(usage)).unpriced["anthropic"] == 1
    assert await spend_of(db, "project", org, ws, "2026-11-03Z", "2026-11-04Z") == 20  # not 9, not 29
    cost = [{"workspace_id": "ws_c", "amount": "4000", "currency": "USD", "description": "tokens"}]
    await feeder.buckets(
        envelope(
            "anthropic",
            org.ai_org,
            "costs_v1",
            [anthropic_cost_bucket(*day, cost)],
            collected_at="2026-11-04T03:00:00Z",
        )
    )
    assert await spend_of(db, "project", org, ws, "2026-11-03Z", "2026-11-04Z") == 49
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 49


async def test_usage_of_zero_tokens_covers_no_estimate(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    await add_prices(db)
    a = org.projects["proj_a"]
    await feeder.events(api_event(org, project=a, cost="3", occurred_at="2026-11-03T10:00:00Z", model="gpt-4o"))
    # Every token type is reported, most with zero tokens: priced at 0, they say nothing about the hour.
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "usage_v1",
            [
                openai_usage_bucket(
                    "2026-11-03T10:00:00",
                    "2026-11-03T11:00:00",
                    [{"project_id": "proj_a", "model": "mx", "input_tokens": 5}],
                )
            ],
            collected_at="2026-11-03T12:00:00Z",
        )
    )
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 3


async def test_migration_0006_moves_an_existing_database_to_the_new_rules(
    empty_database_url: str, tmp_path: Path
) -> None:
    """A database at 0005 with data written by the old worker: lines get their report, lines an old re-poll no
    longer had are marked superseded (kept), rollups get their project's provider, alerts stay as they were."""
    await migrate_before(empty_database_url, tmp_path, 6)
    db = await asyncpg.connect(empty_database_url)
    try:
        org = await make_org(db, project_ids=("proj_a", "proj_b"))
        a = org.projects["proj_a"]
        common = "organization_id, project_id, provider, ai_organization_id, api_version, bucket_start_time, "
        insert = (
            f"INSERT INTO cost_data ({common}bucket_end_time, line_item, currency, amount, collected_at, metadata) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'USD', $9, $10, $11)"
        )
        day = (datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 11, 4, tzinfo=UTC))
        first, second = datetime(2026, 11, 4, 1, tzinfo=UTC), datetime(2026, 11, 4, 5, tzinfo=UTC)
        # The old worker kept proj_a's line of the first poll although the re-poll moved the spend to proj_b.
        await db.execute(insert, org.id, a, "openai", org.ai_org, "costs_v1", *day, "x", Decimal(30), first, "{}")
        await db.execute(
            insert,
            org.id,
            org.projects["proj_b"],
            "openai",
            org.ai_org,
            "costs_v1",
            *day,
            "x",
            Decimal(30),
            second,
            "{}",
        )
        await db.execute(
            insert,
            org.id,
            None,
            "anthropic",
            "anth-1",
            "usage_v1",
            *day,
            "a1:output_tokens:priority",
            Decimal(2),
            second,
            '{"service_tier": "priority"}',
        )
        await db.execute(
            "INSERT INTO project_metrics (organization_id, project_id, hour, request_count, estimated_cost_usd) "
            "VALUES ($1, $2, '2026-11-03T10:00Z', 1, 5), ($1, $2, '2026-11-05T10:00Z', 1, 7)",
            org.id,
            a,
        )
        budget = uuid.uuid4()
        await db.execute(
            "INSERT INTO budget_alerts (id, scope, budget_id, organization_id, period_start, period_end, threshold, "
            "spend, amount, currency, percent_used) VALUES ($1, 'organization', $2, $3, '2026-11-01Z', "
            "'2026-12-01Z', 50, 67, 100, 'USD', 67)",
            uuid.uuid4(),
            budget,
            org.id,
        )
        old_spend = await spend_of(db, "organization", org, None, "2026-11-01Z", "2026-12-01Z")
        assert old_spend == 30 + 30 + 2 + 7  # the old rule: both polls' lines, Nov 3's estimate covered

        await migrate(empty_database_url)

        rows = await db.fetch(
            "SELECT project_id, report, superseded_at IS NOT NULL AS retired, outside_cost_report FROM cost_data "
            "ORDER BY provider, collected_at"
        )
        assert [tuple(r) for r in rows] == [
            (None, "anthropic.usage_report.messages", False, True),
            (a, "openai.costs", True, False),  # kept, no longer counted
            (org.projects["proj_b"], "openai.costs", False, False),
        ]
        assert await db.fetchval("SELECT count(*) FROM cost_windows") == 2
        assert set(await db.fetchval("SELECT array_agg(DISTINCT provider) FROM project_metrics")) == {"openai"}
        assert await db.fetchval("SELECT count(*) FROM budget_alerts") == 1  # alerts already raised stay
        # proj_a's retired line no longer covers its estimate of Nov 3 (absent lines cover nothing).
        assert await spend_of(db, "organization", org, None, "2026-11-01Z", "2026-12-01Z") == 30 + 2 + 5 + 7
        # Data written by the new worker after the upgrade meets the migrated rows.
        await db.execute(
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
            "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) "
            "VALUES ($1, $2, 'openai', $3, 'costs_v1', '2026-11-05Z', '2026-11-06Z', 'x', 'USD', 1, now())",
            org.id,
            a,
            org.ai_org,
        )
        assert await db.fetchval("SELECT report FROM cost_data WHERE amount = 1") == "openai.costs"
        assert await spend_of(db, "organization", org, None, "2026-11-01Z", "2026-12-01Z") == 30 + 2 + 5 + 1
    finally:
        await db.close()


async def test_rows_1_to_6_and_10_through_the_worker(db: asyncpg.Connection, settings: Settings) -> None:
    """The audit's rows again, each in its own organization, produced to the broker and consumed by the worker."""
    await create_topics(settings)
    await add_prices(db)
    day = ("2026-11-03", "2026-11-04")
    buckets: list[dict[str, Any]] = []
    events_out: list[dict[str, Any]] = []
    row1, row2, row3, row4, row5, row6, row10 = [await make_org(db, project_ids=("proj_a", "proj_b")) for _ in range(7)]
    # 1: hourly usage (100) and the daily cost (100) of the same day.
    hourly = [
        openai_usage_bucket(
            f"2026-11-03T{h:02d}:00:00",
            f"2026-11-03T{h + 1:02d}:00:00",
            [{"project_id": "proj_a", "model": "m1", "input_tokens": 4}],
        )
        for h in range(23)
    ] + [
        openai_usage_bucket(
            "2026-11-03T23:00:00", "2026-11-04T00:00:00", [{"project_id": "proj_a", "model": "m1", "input_tokens": 8}]
        )
    ]
    buckets += [
        envelope("openai", row1.ai_org, "usage_v1", hourly, collected_at="2026-11-04T02:00:00Z"),
        envelope(
            "openai",
            row1.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [("proj_a", "x", "100")])],
            collected_at="2026-11-04T03:00:00Z",
        ),
    ]
    # 2: org-level costs (50) plus the projects' usage (30 + 20) of that day.
    buckets += [
        envelope(
            "openai",
            row2.ai_org,
            "usage_v1",
            [
                openai_usage_bucket(
                    *day,
                    [
                        {"project_id": "proj_a", "model": "m1", "input_tokens": 30},
                        {"project_id": "proj_b", "model": "m1", "input_tokens": 20},
                    ],
                )
            ],
            collected_at="2026-11-04T02:00:00Z",
        ),
        envelope(
            "openai",
            row2.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [(None, "all", "50")])],
            collected_at="2026-11-04T03:00:00Z",
        ),
    ]
    # 3: a re-poll moves the line to project B and drops the grouping by line item.
    buckets += [
        envelope(
            "openai",
            row3.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [("proj_a", "GPT-4o", "30")])],
            collected_at="2026-11-04T01:00:00Z",
        ),
        envelope(
            "openai",
            row3.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [("proj_b", None, "30")])],
            collected_at="2026-11-04T05:00:00Z",
        ),
    ]
    # 4: today's bucket polled at 06:00; 5: a usage line without a price. One estimate of 1 per hour each.
    for org in (row4, row5):
        events_out += [
            api_event(
                org, project=org.projects["proj_a"], cost="1", occurred_at=f"2026-11-03T{h:02d}:10:00Z", model="gpt-4o"
            )
            for h in range(24)
        ]
    buckets.append(
        envelope(
            "openai",
            row4.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [("proj_a", "x", "6")])],
            collected_at="2026-11-03T06:00:00Z",
        )
    )
    buckets.append(
        envelope(
            "openai",
            row5.ai_org,
            "usage_v1",
            [openai_usage_bucket(*day, [{"project_id": "proj_a", "model": "no-price", "input_tokens": 1000}])],
            collected_at="2026-11-04T02:00:00Z",
        )
    )
    # 6: a daily Los Angeles budget and the UTC-day bucket of 1 November.
    la_budget = uuid.uuid4()
    await db.execute(
        "INSERT INTO ai_organization_budgets (id, organization_id, amount, period, timezone, thresholds) "
        "VALUES ($1, $2, 10, 'daily', 'America/Los_Angeles', '{100}')",
        la_budget,
        row6.id,
    )
    buckets.append(
        envelope(
            "openai",
            row6.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", "10")])],
            collected_at="2026-11-02T03:00:00Z",
        )
    )
    # 10: estimates of three providers and an unknown model; OpenAI reports the day.
    events_out += [
        api_event(row10, project=row10.projects["proj_a"], cost=cost, occurred_at="2026-11-03T10:00:00Z", model=m)
        for cost, m in (("5", "gpt-4o"), ("7", "claude-sonnet-4-0"), ("3", "gemini-1.5-pro"), ("2", "unknown-x"))
    ]
    buckets.append(
        envelope(
            "openai",
            row10.ai_org,
            "costs_v1",
            [openai_cost_bucket(*day, [("proj_a", "x", "6")])],
            collected_at="2026-11-04T03:00:00Z",
        )
    )

    await produce(settings, settings.topic_api_usage, [dumps(e) for e in events_out])
    await produce(settings, settings.topic_provider_buckets, [dumps(b) for b in buckets])
    assert await run_worker(settings) == 0

    nov3 = ("2026-11-03Z", "2026-11-04Z")
    assert await spend_of(db, "organization", row1, None, *nov3) == 100
    assert await spend_of(db, "organization", row2, None, *nov3) == 50
    assert await spend_of(db, "organization", row3, None, *nov3) == 30
    assert await spend_of(db, "project", row4, row4.projects["proj_a"], *nov3) == 24
    assert await spend_of(db, "project", row5, row5.projects["proj_a"], *nov3) == 24
    assert await db.fetchval("SELECT period_start FROM budget_alerts WHERE budget_id = $1", la_budget) == datetime(
        2026, 11, 1, 7, tzinfo=UTC
    )
    assert await spend_of(db, "project", row10, row10.projects["proj_a"], *nov3) == 6 + 7 + 3 + 2
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0


async def test_parts_of_one_revision_add_up_and_a_replay_changes_nothing(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """README "What producers must do": a bucket split across messages carries one collected_at in every part."""
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    day = ("2026-11-03", "2026-11-04")
    part_1 = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket(*day, [("proj_a", "x", "3")])],
        collected_at="2026-11-04T01:00:00Z",
    )
    part_2 = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket(*day, [("proj_b", "x", "4")])],
        collected_at="2026-11-04T01:00:00Z",
    )
    await feeder.buckets(part_1)
    await feeder.buckets(part_2)
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 7
    outcome = await feeder.buckets(part_1, part_2)  # redelivered: the same revision changes nothing
    assert set(outcome.ledger_lines) == {("costs_v1", "unchanged")}
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 7
    # An empty bucket of a later poll retires both (kept, marked superseded).
    empty = envelope(
        "openai", org.ai_org, "costs_v1", [openai_cost_bucket(*day, [])], collected_at="2026-11-04T06:00:00Z"
    )
    outcome = await feeder.buckets(empty)
    assert outcome.ledger_lines[("costs_v1", "superseded")] == 2
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 0
    assert await db.fetchval("SELECT count(*) FROM cost_data WHERE superseded_at IS NOT NULL") == 2


async def test_a_line_quarantined_then_replayed_joins_its_revision(db: asyncpg.Connection, feeder: Feeder) -> None:
    """A line that could not be attributed is quarantined; its message's other lines land at that revision. Once
    the mapping exists, the replayed message (same revision) adds the missing line instead of being ignored."""
    org = await make_org(db)
    message = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", "3"), ("proj_new", "x", "4")])],
        collected_at="2026-11-04T01:00:00Z",
    )
    outcome = await feeder.buckets(message)
    assert [q.reason.value for q in outcome.quarantine] == ["unattributed"]
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 3
    await db.execute(
        "INSERT INTO projects (organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
        "VALUES ($1, 'new', 'openai', $2, 'proj_new')",
        org.id,
        org.ai_org,
    )
    await feeder.buckets(message)
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 7


async def test_a_message_quarantined_whole_changes_nothing_in_its_windows(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """A later poll whose page names one line item in two currencies is quarantined whole (`inconsistent_data`),
    like a message that fails decoding: it is no revision of its windows, so the stored lines stay the truth of
    both (the broken one and the good one on the same page), and an older re-send is not made stale by it."""
    org = await make_org(db)
    nov3, nov2 = ("2026-11-03", "2026-11-04"), ("2026-11-02", "2026-11-03")
    stored = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket(*nov3, [("proj_a", "x", "10")]), openai_cost_bucket(*nov2, [("proj_a", "y", "7")])],
        collected_at="2026-11-04T01:00:00Z",
    )
    await feeder.buckets(stored)
    broken = openai_cost_bucket(*nov3, [("proj_a", "x", "10"), ("proj_a", "x", "5")])
    broken["results"][1]["amount"]["currency"] = "eur"
    later = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [broken, openai_cost_bucket(*nov2, [("proj_a", "y", "7")])],
        collected_at="2026-11-04T05:00:00Z",
    )
    outcome = await feeder.buckets(later)
    assert [(q.reason.value, q.detail) for q in outcome.quarantine] == [
        ("inconsistent_data", "line item 'x' is reported in two currencies")
    ]
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 10
    assert await spend_of(db, "organization", org, None, "2026-11-02Z", "2026-11-03Z") == 7
    assert await db.fetchval("SELECT count(*) FROM cost_data WHERE superseded_at IS NOT NULL") == 0
    revisions = await db.fetch("SELECT DISTINCT collected_at FROM cost_windows")
    assert [r["collected_at"] for r in revisions] == [datetime(2026, 11, 4, 1, tzinfo=UTC)]
    outcome = await feeder.buckets(stored)  # the stored revision again: unchanged, not stale
    assert set(outcome.ledger_lines) == {("costs_v1", "unchanged")}


async def test_a_spend_below_the_level_beyond_28_digits_raises_nothing(db: asyncpg.Connection, feeder: Feeder) -> None:
    """Spend one unit of the 29th decimal place below a 10 USD budget is not 100 % of it (no rounding at 28
    digits in the decision); one more event takes it past the level."""
    org = await make_org(db)
    budget = uuid.uuid4()
    await db.execute(
        "INSERT INTO ai_organization_budgets (id, organization_id, amount, period, timezone, thresholds) "
        "VALUES ($1, $2, 10, 'daily', 'UTC', '{100}')",
        budget,
        org.id,
    )
    below = "9.99999999999999999999999999999"
    outcome = await feeder.events(
        api_event(org, project=org.projects["proj_a"], cost=below, occurred_at="2026-11-03T10:00:00Z", model="gpt-4o")
    )
    assert not outcome.quarantine
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == Decimal(below)
    assert await db.fetchval("SELECT count(*) FROM budget_alerts WHERE budget_id = $1", budget) == 0
    await feeder.events(
        api_event(org, project=org.projects["proj_a"], cost="1e-29", occurred_at="2026-11-03T11:00:00Z", model="gpt-4o")
    )
    assert await db.fetchval("SELECT spend FROM budget_alerts WHERE budget_id = $1", budget) == 10


async def test_a_cost_line_that_flips_usage_beside_it_evaluates_the_usage_period(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """A daily usage bucket of 3 Nov UTC counts on 3 Nov in Los Angeles (its midpoint, 04:00 PST); an hourly cost
    bucket of 3 Nov 00:00-01:00 UTC (2 Nov local) covers one of its hours and replaces it. When that cost line
    arrives, the usage's period (3 Nov) loses 20 and its alert is resolved; when the cost line is re-polled away,
    the usage counts again and 3 Nov alerts again, though the cost line's own window lies on 2 Nov."""
    org = await make_org(db)
    await add_price(db, "openai", "m1", "input_text_tokens", "1000000")  # 1 USD per token
    budget = uuid.uuid4()
    await db.execute(
        "INSERT INTO ai_organization_budgets (id, organization_id, amount, period, timezone, thresholds) "
        "VALUES ($1, $2, 10, 'daily', 'America/Los_Angeles', '{100}')",
        budget,
        org.id,
    )
    nov3 = ("2026-11-03T08:00Z", "2026-11-04T08:00Z")  # 3 November in Los Angeles (PST)
    hour = ("2026-11-03T00:00:00", "2026-11-03T01:00:00")

    async def alerts() -> list[tuple[datetime, bool]]:
        rows = await db.fetch(
            "SELECT period_start, resolved_at IS NULL AS open FROM budget_alerts WHERE budget_id = $1 "
            "ORDER BY raised_at",
            budget,
        )
        return [(r["period_start"], r["open"]) for r in rows]

    usage = [{"project_id": "proj_a", "model": "m1", "input_tokens": 20}]
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "usage_v1",
            [openai_usage_bucket("2026-11-03", "2026-11-04", usage)],
            collected_at="2026-11-04T02:00:00Z",
        )
    )
    assert await spend_of(db, "organization", org, None, *nov3) == 20
    assert await alerts() == [(datetime(2026, 11, 3, 8, tzinfo=UTC), True)]
    await feeder.buckets(
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket(*hour, [("proj_a", "x", "1")])],
            collected_at="2026-11-03T02:00:00Z",
        )
    )
    assert await spend_of(db, "organization", org, None, *nov3) == 0
    assert await alerts() == [(datetime(2026, 11, 3, 8, tzinfo=UTC), False)]  # resolved
    await feeder.buckets(
        envelope("openai", org.ai_org, "costs_v1", [openai_cost_bucket(*hour, [])], collected_at="2026-11-03T09:00:00Z")
    )
    assert await spend_of(db, "organization", org, None, *nov3) == 20
    assert await alerts() == [
        (datetime(2026, 11, 3, 8, tzinfo=UTC), False),
        (datetime(2026, 11, 3, 8, tzinfo=UTC), True),  # the next crossing
    ]


async def test_daily_costs_replace_minute_usage_buckets_of_the_same_day(db: asyncpg.Connection, feeder: Feeder) -> None:
    """The usage APIs' bucket_width=1m: a minute bucket that does not start on the hour holds no whole hour, yet a
    daily cost bucket of its account covers its time as much as the hourly usage inside it (it was counted beside
    the cost, twice: 159 instead of 100)."""
    org = await make_org(db)
    a = org.projects["proj_a"]
    await add_prices_once(db)
    minutes = [
        openai_usage_bucket(
            f"2026-11-03T10:{m:02d}:00",
            f"2026-11-03T10:{m + 1:02d}:00" if m < 59 else "2026-11-03T11:00:00",
            [{"project_id": "proj_a", "model": "m1", "input_tokens": 1}],
        )
        for m in range(60)
    ]
    await feeder.buckets(envelope("openai", org.ai_org, "usage_v1", minutes, collected_at="2026-11-04T02:00:00Z"))
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 60
    cost = openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", "100")])
    await feeder.buckets(envelope("openai", org.ai_org, "costs_v1", [cost], collected_at="2026-11-04T03:00:00Z"))
    assert await spend_of(db, "project", org, a, "2026-11-03Z", "2026-11-04Z") == 100
    assert await spend_of(db, "organization", org, None, "2026-11-03Z", "2026-11-04Z") == 100
    full = await db.fetchval(
        "SELECT spend FROM cost_worker_spend_full('project', $1, $2, NULL, '2026-11-03Z', '2026-11-04Z', 'USD')",
        org.id,
        a,
    )
    assert full == 100
    # The other order: the cost first, then minute usage inside it (its own areas are recomputed)
    cost = openai_cost_bucket("2026-11-05", "2026-11-06", [("proj_a", "x", "100")])
    await feeder.buckets(envelope("openai", org.ai_org, "costs_v1", [cost], collected_at="2026-11-06T03:00:00Z"))
    later = [
        openai_usage_bucket(
            f"2026-11-05T10:{m:02d}:00",
            f"2026-11-05T10:{m + 1:02d}:00",
            [{"project_id": "proj_a", "model": "m1", "input_tokens": 1}],
        )
        for m in range(5, 9)
    ]
    await feeder.buckets(envelope("openai", org.ai_org, "usage_v1", later, collected_at="2026-11-06T04:00:00Z"))
    assert await spend_of(db, "project", org, a, "2026-11-05Z", "2026-11-06Z") == 100


async def test_minute_usage_buckets_replace_the_estimate_of_their_hour(db: asyncpg.Connection, feeder: Feeder) -> None:
    """A minute usage bucket (bucket_width=1m) covers, for the estimates, the hour it lies in (migration 0025).
    Calls through the platform at 10:05 and 10:40 (estimates of 3 and 4 USD in the hour 10:00), reported by OpenAI
    in the minute buckets 10:05 and 10:40 (3 and 4 USD; the bucket of 10:00 is empty, so no line starts on the
    hour): it was 14 (the estimates and the usage of the same calls), it is 7. An unaligned hourly bucket (10:30 to
    11:30, the only one reported) covers both hours it overlaps the same way."""
    org = await make_org(db)
    a = org.projects["proj_a"]
    await add_prices_once(db)
    await feeder.events(
        api_event(org, project=a, cost="3", occurred_at="2026-11-03T10:05:10Z", model="gpt-4o"),
        api_event(org, project=a, cost="4", occurred_at="2026-11-03T10:40:10Z", model="gpt-4o"),
    )
    minutes = [
        openai_usage_bucket(
            f"2026-11-03T10:{m:02d}:00",
            f"2026-11-03T10:{m + 1:02d}:00",
            [{"project_id": "proj_a", "model": "m1", "input_tokens": tokens}] if tokens else [],
        )
        for m, tokens in ((0, 0), (5, 3), (40, 4))
    ]
    await feeder.buckets(envelope("openai", org.ai_org, "usage_v1", minutes, collected_at="2026-11-03T12:00:00Z"))
    day = ("2026-11-03Z", "2026-11-04Z")
    assert await spend_of(db, "project", org, a, *day) == 7
    assert await spend_of(db, "organization", org, None, *day) == 7
    for scope, project in (("project", a), ("organization", None)):
        full = await db.fetchval(
            "SELECT spend FROM cost_worker_spend_full($1, $2, $3, NULL, '2026-11-03Z', '2026-11-04Z', 'USD')",
            scope,
            org.id,
            project,
        )
        assert full == 7

    await feeder.events(
        api_event(org, project=a, cost="2", occurred_at="2026-11-05T10:45:00Z", model="gpt-4o"),
        api_event(org, project=a, cost="1", occurred_at="2026-11-05T11:10:00Z", model="gpt-4o"),
    )
    hourly = openai_usage_bucket(
        "2026-11-05T10:30:00", "2026-11-05T11:30:00", [{"project_id": "proj_a", "model": "m1", "input_tokens": 3}]
    )
    await feeder.buckets(envelope("openai", org.ai_org, "usage_v1", [hourly], collected_at="2026-11-05T13:00:00Z"))
    assert await spend_of(db, "project", org, a, "2026-11-05Z", "2026-11-06Z") == 3
    assert await spend_of(db, "organization", org, None, "2026-11-05Z", "2026-11-06Z") == 3


async def test_a_minute_bucket_after_a_local_midnight_covers_the_estimate_before_it(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """Asia/Kolkata's day ends at 18:30 UTC. A call at 18:10 UTC (an estimate of the hour 18:00: the day before)
    reported in the minute bucket of 18:40 (after the midnight): the bucket covers the hour 18:00 (0025), so the day
    before has no spend left and the next one has the bucket's, in the full computation as in the aggregate."""
    org = await make_org(db)
    a = org.projects["proj_a"]
    await add_prices_once(db)
    await feeder.events(api_event(org, project=a, cost="5", occurred_at="2026-11-03T18:10:00Z", model="gpt-4o"))
    minute = openai_usage_bucket(
        "2026-11-03T18:40:00", "2026-11-03T18:41:00", [{"project_id": "proj_a", "model": "m1", "input_tokens": 5}]
    )
    await feeder.buckets(envelope("openai", org.ai_org, "usage_v1", [minute], collected_at="2026-11-03T20:00:00Z"))
    before = ("2026-11-02T18:30:00Z", "2026-11-03T18:30:00Z")  # 3 November in Kolkata
    after = ("2026-11-03T18:30:00Z", "2026-11-04T18:30:00Z")  # 4 November
    for fn in ("cost_worker_spend", "cost_worker_spend_full"):
        for scope, project in (("organization", None), ("project", a)):
            for (start, end), wanted in ((before, 0), (after, 5)):
                value = await db.fetchval(
                    f"SELECT spend FROM {fn}($1, $2, $3, NULL, $4::text::timestamptz, $5::text::timestamptz, 'USD')",
                    scope,
                    org.id,
                    project,
                    start,
                    end,
                )
                assert value == wanted, (fn, scope, start, value)


async def test_a_window_overlapping_another_of_its_report_is_quarantined_not_counted_twice(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """Hourly and daily buckets of one report are the same calls at two widths: the window stored first stays the
    truth of its hours, and a message bringing another window of the same report (provider account, report) that
    overlaps it is quarantined (`overlapping_window`) for that window: 4 USD published both ways count 4, not 8.
    The other windows of the message are written; the same window again is a revision, not an overlap."""
    org = await make_org(db)
    await add_prices(db)
    project = org.projects["proj_a"]

    def usage(start: str, end: str, tokens: int) -> dict[str, Any]:
        return openai_usage_bucket(start, end, [{"project_id": "proj_a", "model": "m1", "input_tokens": tokens}])

    hourly = [
        usage("2026-11-03T10:00:00", "2026-11-03T11:00:00", 2),
        usage("2026-11-03T11:00:00", "2026-11-03T12:00:00", 2),
    ]
    await feeder.buckets(envelope("openai", org.ai_org, "usage_v1", hourly, collected_at="2026-11-03T13:00:00Z"))
    assert await spend_of(db, "project", org, project, "2026-11-03Z", "2026-11-04Z") == 4

    # A daily bucket around them, on a page with a daily bucket of another day that overlaps nothing.
    daily = envelope(
        "openai",
        org.ai_org,
        "usage_v1",
        [usage("2026-11-03", "2026-11-04", 4), usage("2026-11-05", "2026-11-06", 3)],
        collected_at="2026-11-06T02:00:00Z",
    )
    outcome = await feeder.buckets(daily)
    assert [(q.reason.value, q.detail) for q in outcome.quarantine] == [
        (
            "overlapping_window",
            "openai.usage.completions window 2026-11-03T00:00:00+00:00/2026-11-04T00:00:00+00:00 overlaps the stored "
            "window 2026-11-03T11:00:00+00:00/2026-11-03T12:00:00+00:00 of its report",
        )
    ]
    assert await spend_of(db, "project", org, project, "2026-11-03Z", "2026-11-04Z") == 4  # not 8
    assert await spend_of(db, "project", org, project, "2026-11-05Z", "2026-11-06Z") == 3
    assert await db.fetchval("SELECT count(*) FROM quarantine WHERE reason = 'overlapping_window'") == 1

    # The stored hourly window re-polled: a revision of itself, not an overlap.
    again = envelope("openai", org.ai_org, "usage_v1", [hourly[0]], collected_at="2026-11-03T20:00:00Z")
    again["page"]["data"][0]["results"][0]["input_tokens"] = 5
    outcome = await feeder.buckets(again)
    assert not outcome.quarantine
    assert await spend_of(db, "project", org, project, "2026-11-03Z", "2026-11-04Z") == 7

    # Within one batch the first message's window is kept: an hourly bucket inside a daily one published before it.
    first = envelope(
        "openai", org.ai_org, "usage_v1", [usage("2026-11-07", "2026-11-08", 6)], collected_at="2026-11-08T01:00:00Z"
    )
    second = envelope(
        "openai",
        org.ai_org,
        "usage_v1",
        [usage("2026-11-07T09:00:00", "2026-11-07T10:00:00", 6)],
        collected_at="2026-11-08T01:00:00Z",
    )
    outcome = await feeder.buckets(first, second)
    assert [q.reason.value for q in outcome.quarantine] == ["overlapping_window"]
    assert outcome.quarantine[0].source.offset == feeder.next[(feeder.settings.topic_provider_buckets, 0)] - 1
    assert await spend_of(db, "project", org, project, "2026-11-07Z", "2026-11-08Z") == 6  # not 12

    # Other reports are never compared: daily costs beside the hourly usage are the coverage rules' business.
    costs = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket("2026-11-03", "2026-11-04", [("proj_a", "x", "9")])],
        collected_at="2026-11-04T03:00:00Z",
    )
    assert not (await feeder.buckets(costs)).quarantine
    assert await spend_of(db, "project", org, project, "2026-11-03Z", "2026-11-04Z") == 9


async def test_anthropic_default_workspace_is_the_organizations_and_counted_once(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """Anthropic reports the Default Workspace with ``workspace_id`` null ("Null if not grouping by workspace or for
    the default workspace", cost_report; the collector always groups by workspace). It has no id a project could be
    mapped to: its lines are the organization's, and like every row without a project they stand for the whole
    account in their hours. Nothing of it is lost or counted twice beside the named workspaces."""
    org = await make_org(db, provider="anthropic", project_ids=("ws_c", "ws_d"))
    await add_prices(db)
    day = ("2026-11-03T00:00:00Z", "2026-11-04T00:00:00Z")
    usage: list[dict[str, Any]] = [
        {"workspace_id": "ws_c", "model": "a1", "uncached_input_tokens": 40, "service_tier": "standard"},
        {"workspace_id": None, "model": "a1", "uncached_input_tokens": 25, "service_tier": "standard"},
        {"workspace_id": None, "model": "a1", "uncached_input_tokens": 7, "service_tier": "priority"},
    ]
    costs: list[dict[str, Any]] = [
        {"workspace_id": "ws_c", "amount": "4000", "currency": "USD", "description": "tokens"},
        {"workspace_id": None, "amount": "2500", "currency": "USD", "description": "tokens"},
    ]
    for api_version, bucket, at in (
        ("usage_v1", anthropic_usage_bucket(*day, usage), "2026-11-04T02:00:00Z"),
        ("costs_v1", anthropic_cost_bucket(*day, costs), "2026-11-04T03:00:00Z"),
    ):
        outcome = await feeder.buckets(envelope("anthropic", org.ai_org, api_version, [bucket], collected_at=at))
        assert not outcome.quarantine, outcome.quarantine
    for project, cost in (("ws_c", "100"), ("ws_d", "30")):  # the platform's own figures for its calls
        event = api_event(
            org, project=org.projects[project], occurred_at="2026-11-03T10:30:00Z", cost=cost, model="claude-sonnet-4-0"
        )
        assert not (await feeder.events(event)).quarantine
    span = ("2026-11-03Z", "2026-11-04Z")
    # The two workspaces' costs (40 + 25) and the Priority Tier usage the cost report leaves out (7), once each;
    # the estimates of the hour are the calls those rows hold (ws_d's calls, in no workspace of its own, were made
    # with another workspace's keys: the snapshot holds every call of the account in its hours).
    assert await spend_of(db, "organization", org, None, *span) == 72
    # A project budget sees its workspace's rows (ws_c) or, with none, its estimates (ws_d); the Default
    # Workspace's spend is in no project's.
    assert await spend_of(db, "project", org, org.projects["ws_c"], *span) == 40
    assert await spend_of(db, "project", org, org.projects["ws_d"], *span) == 30
