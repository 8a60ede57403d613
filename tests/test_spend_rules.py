"""What counts as spend, on realistic provider data: the database against the independent model.

A hypothesis property test feeds random mixes of provider snapshots (hourly and daily windows, costs and usage,
grouped and ungrouped lines, revisions that add, drop and move lines, open buckets, unpriced lines, Anthropic's
Priority Tier) and API-usage events (several providers, unknown models) through the real pipeline, one message
per batch, and compares every budget's spend in every period, and the set of alerts raised, with
``tests/spend_model.py`` exactly. Budgets are daily and monthly in UTC, America/Los_Angeles, Europe/Berlin,
Asia/Kolkata and Pacific/Chatham, around DST changes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import (
    add_price,
    anthropic_cost_bucket,
    anthropic_usage_bucket,
    api_event,
    envelope,
    make_org,
    openai_cost_bucket,
    openai_usage_bucket,
)
from tests.feeding import Feeder
from tests.spend_model import Estimate, Ledger, Row, SpendModel, period, periods_overlapping, sum_lines

EXAMPLES = 40
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
# First days of the generated data: each puts a DST change of one of the budgets' zones inside the three days.
BASE_DAYS = (
    datetime(2026, 3, 7, tzinfo=UTC),  # America/Los_Angeles springs forward on the 8th
    datetime(2026, 3, 28, tzinfo=UTC),  # Europe/Berlin on the 29th
    datetime(2026, 4, 4, tzinfo=UTC),  # Pacific/Chatham falls back on the 5th (03:45 -> 02:45 local)
    datetime(2026, 10, 24, tzinfo=UTC),  # Europe/Berlin falls back on the 25th
    datetime(2026, 10, 30, tzinfo=UTC),  # month end in every zone; Los Angeles falls back on 1 November
)
ZONES = ("UTC", "America/Los_Angeles", "Europe/Berlin", "Asia/Kolkata", "Pacific/Chatham")
MODELS = {  # API-usage event model -> the provider the catalogue gives it (None: unknown)
    "gpt-4o": "openai",
    "claude-sonnet-4-0": "anthropic",
    "gemini-1.5-pro": "google",
    "mystery-model-7": None,
}
OPENAI_ZERO_TYPES = ("input_cached_tokens", "output_tokens", "input_audio_tokens", "output_audio_tokens")
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
    return Snapshot(report, day, hour, collected_after, tuple(lines))


# Events cluster on a few hours (early, late, across midnight UTC) so that coverage decisions meet them often.
EVENT_HOURS = (0, 3, 7, 10, 16, 20, 23, 24, 26, 31)
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
    await add_price(db, "openai", "m1", "input_uncached_tokens", "1000000")
    await add_price(db, "anthropic", "a1", "uncached_input_tokens", "1000000")
    await add_price(db, "anthropic", "a1", "priority/uncached_input_tokens", "1000000")


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def window_of(world: World, snap: Snapshot) -> tuple[datetime, datetime]:
    start = world.base + snap.day * DAY + (HOUR * snap.hour if snap.hour is not None else timedelta(0))
    return start, start + (HOUR if snap.hour is not None else DAY)


def payload_and_rows(world: World, snap: Snapshot) -> tuple[dict[str, Any], list[Row], tuple[str, ...]]:
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
                    f"{m}:input_uncached_tokens",
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
    return message, sum_lines(rows), (provider, account, report, start, end)  # type: ignore[return-value]


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

    def evaluate(self, touches: list[tuple[uuid.UUID | None, uuid.UUID | None, datetime, datetime, datetime]]) -> None:
        """touches: (project, user, at, span start, span end). Raises every crossed, not yet alerted threshold."""
        candidates: set[tuple[int, datetime, datetime]] = set()
        for index, budget in enumerate(self.world.budgets):
            for project, user, at, span_start, span_end in touches:
                if budget["scope"] == "project" and budget["project"] != project:
                    continue
                if budget["scope"] == "user" and (
                    budget["user"] != user or (budget["project"] is not None and budget["project"] != project)
                ):
                    continue
                candidates.add((index, *period(budget["period"], budget["timezone"], at)))
                for start, end in periods_overlapping(budget["period"], budget["timezone"], span_start, span_end):
                    candidates.add((index, start, end))
        for index, start, end in sorted(candidates, key=lambda c: (c[0], c[1])):
            budget = self.world.budgets[index]
            spend = self.spend(budget, start, end)
            for threshold in budget["thresholds"]:
                key = (budget["id"], start, threshold)
                reached = spend * 100 >= budget["amount"] * threshold
                if key not in self.alerts and reached:
                    self.alerts[key] = spend
                elif key in self.alerts and not reached:  # resolved (issue 12): spend fell below it
                    del self.alerts[key]

    def snapshot(self, rows: list[Row], window: tuple[str, str, str, datetime, datetime], collected: datetime) -> None:
        changed = self.ledger.apply([window], rows, collected)
        touches = []
        for r in changed:
            scopes: list[uuid.UUID | None] = [r.project_id]
            if r.project_id is None:
                scopes += [p for p, account in self.world.account_of_project.items() if account == r.account]
            touches += [(scope, None, r.midpoint, r.start, r.end) for scope in scopes]
        if touches:
            self.evaluate(touches)

    def event(self, estimate: Estimate) -> None:
        self.estimates.append(estimate)
        self.evaluate([(estimate.project_id, estimate.user_id, estimate.hour, estimate.hour, estimate.hour)])


# ------------------------------------------------------------------------------------------------- the test

RECORD = {"examples": 0, "steps": 0, "seconds": 0.0}


async def run_steps(db: asyncpg.Connection, feeder: Feeder, base: datetime, plan: list[Step]) -> tuple[World, Expected]:
    world = await make_world(db, base)
    expected = Expected(world)
    for step in plan:
        if isinstance(step, Snapshot):
            message, rows, window = payload_and_rows(world, step)
            outcome = await feeder.buckets(message)
            assert not outcome.quarantine, [q.detail for q in outcome.quarantine]
            expected.snapshot(rows, window, window[3] + HOUR * step.collected_after)
        else:
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
    return world, expected


def _org_of(world: World) -> Any:
    from tests.factories import Org  # noqa: PLC0415

    return Org(world.org, world.openai_account)


async def assert_matches_model(db: asyncpg.Connection, world: World, expected: Expected) -> None:
    for budget in world.budgets:
        for start, end in periods_overlapping(
            budget["period"], budget["timezone"], world.base - DAY, world.base + 4 * DAY
        ):
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
