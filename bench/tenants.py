"""Budgets at platform scale (issue 18 item 6): API-usage events spread over 1,000 organizations with 3 budgets
each (organization, project, user), periods full, drained by the worker and compared with the same number of
events from one organization with the same 3 budgets, in the same database.

"Periods full": before the budgets exist, the worker itself drains a history backlog of one event per
organization and hour from the start of the month until the measured events begin (a month of hourly
rollups, written by the normal path: whatever the schema keeps next to the rollups, an aggregate of spend
included, is kept the same way). Then the budgets are inserted into the normal budget tables (amounts far
above any spend: no alert is raised, every touched budget's spend is still computed), and two backlogs of
the same size and shape are drained into that database, each by a fresh consumer group:

- ``single``: every event from one organization (its 3 budgets are touched by every batch);
- ``spread``: events spread uniformly over the 1,000 organizations (a batch of 5,000 touches ~2,700 budgets).

The figure is the spread rate over the single-organization rate (target >= 0.8).

The floor: the same three backlogs drained into a second database with no budgets and the spend aggregate's
triggers disabled (``without_budget_machinery``). There a batch writes only what the batch's transaction must
hold without budgets (the ``api_usage`` rows, the project and user hourly rollups, the offsets), so its ratio
bounds the figure above for any design of the budget side that keeps the rollups in the batch's transaction.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from bench import world as w
from bench.config import BenchConfig

PROJECTS_PER_ORG = 2
USERS_PER_ORG = 3
BUDGET_NAME = "bench-tenant"
SEED_OFFSET = 1_000  # other ids than the main world's (the same database holds both)
EVENT_SPAN = timedelta(hours=24)  # the measured backlogs: the last day before the anchor's hour


def tenant_world(cfg: BenchConfig, organizations: int) -> w.World:
    """``organizations`` organizations with 2 projects and 3 users each; provider ids of their own (the
    database also holds the main world, whose provider mappings must not collide)."""
    shape = replace(
        cfg,
        seed=cfg.seed + SEED_OFFSET,
        organizations=organizations,
        projects_per_org=PROJECTS_PER_ORG,
        users_per_org=USERS_PER_ORG,
    )
    world = w.build_world(shape)
    for index, org in enumerate(world.orgs):
        org.ai_org = f"{org.provider[:2]}-org-tenant-{index:05d}"
        org.projects = [(project, f"{org.ai_org}-p{j}") for j, (project, _) in enumerate(org.projects)]
    return world


def month_start(world: w.World) -> datetime:
    """The first hour of the anchor's month (the budgets' monthly period)."""
    return world.anchor.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def history_window(world: w.World, hours: int | None) -> tuple[datetime, int]:
    """(first hour, hours) of the history: the ``hours`` (None: all) hours of the month before the measured
    backlogs begin."""
    first_event = world.anchor - timedelta(hours=1) - EVENT_SPAN
    available = max(1, int((first_event - month_start(world)) / timedelta(hours=1)))
    count = available if hours is None else min(hours, available)
    return first_event.replace(minute=0, second=0, microsecond=0) - timedelta(hours=count), count


def history_events(world: w.World, start: datetime, hours: int) -> Iterator[bytes]:
    """One event per organization and hour from ``start``, in time order, each hour on another of the
    organization's projects and users: every hour of the period has rollup rows for every organization."""
    rng = random.Random(f"{world.seed}-tenant-history")
    for hour in range(hours):
        at = start + timedelta(hours=hour)
        for index, org in enumerate(world.orgs):
            project = org.projects[hour % len(org.projects)][0]
            user = org.users[hour % len(org.users)]
            moment = at + timedelta(seconds=index % 3_600)
            row = w.event_fields(org, project, user, rng, event_id=f"{rng.getrandbits(128):032x}", at=moment)
            yield w.render_event(row)


def measured_events(world: w.World, count: int, salt: str) -> Iterator[bytes]:
    """``count`` events over ``world``'s organizations in the last day before the anchor, in time order."""
    return (w.render_event(row) for row in w.event_rows(world, count, salt=salt, span=EVENT_SPAN))


def single(world: w.World) -> w.World:
    """The same world reduced to its first organization (same anchor and seed)."""
    return w.World(orgs=world.orgs[:1], anchor=world.anchor, seed=world.seed)


async def install(url: str, world: w.World) -> None:
    conn = await asyncpg.connect(url)
    try:
        await w.install_world(conn, world, prices=False)
    finally:
        await conn.close()


async def add_budgets(url: str, world: w.World) -> tuple[int, float]:
    """One organization, one project (its first) and one user (its first) budget per organization, monthly in
    UTC, far above any spend; their user scopes registered in the spend aggregate (0016: what the budgets' first
    evaluation does once, timed here so that neither drain pays for it); then ANALYZE, like settled tables.
    Returns how many budgets, and the registration's ms."""
    conn = await asyncpg.connect(url)
    try:
        orgs = [(org.id, BUDGET_NAME) for org in world.orgs]
        projects = [(org.id, org.projects[0][0], BUDGET_NAME) for org in world.orgs]
        users = [(org.id, org.users[0], BUDGET_NAME) for org in world.orgs]
        await conn.executemany(
            "INSERT INTO ai_organization_budgets (organization_id, name, amount) VALUES ($1, $2, 1e9)", orgs
        )
        await conn.executemany(
            "INSERT INTO ai_project_budgets (organization_id, project_id, name, amount) VALUES ($1, $2, $3, 1e9)",
            projects,
        )
        await conn.executemany(
            "INSERT INTO ai_budgets (organization_id, user_id, name, amount) VALUES ($1, $2, $3, 1e9)", users
        )
        started = time.perf_counter()
        await conn.fetchval(
            "SELECT cost_worker_spend_track(array_fill('user'::text, ARRAY[$1::int]), $2::uuid[], "
            "array_fill(NULL::uuid, ARRAY[$1::int]), $3::uuid[])",
            len(users),
            [org for org, _, _ in users],
            [user for _, user, _ in users],
        )
        registration_ms = (time.perf_counter() - started) * 1000
        await conn.execute("ANALYZE")
        return len(orgs) + len(projects) + len(users), round(registration_ms, 1)
    finally:
        await conn.close()


# The spend aggregate's maintenance of API-usage spend: the statement triggers of the two hourly rollups (the
# only tables these drains write that carry any). Their foreign keys are constraint triggers: not disabled.
AGGREGATE_TRIGGERS = {
    "project_metrics": ("spend_estimates_inserted", "spend_estimates_updated", "spend_estimates_deleted"),
    "user_metrics": ("spend_users_inserted", "spend_users_updated", "spend_users_deleted"),
}


async def without_budget_machinery(url: str) -> None:
    """The floor's database: the spend aggregate is not maintained (its triggers disabled) and no budget is
    added, so a batch writes only the rows, the two hourly rollups and its offsets, and evaluates nothing."""
    conn = await asyncpg.connect(url)
    try:
        for table, triggers in AGGREGATE_TRIGGERS.items():
            for trigger in triggers:
                await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
    finally:
        await conn.close()


async def rollup_counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM project_metrics) AS project_metrics, "
            "(SELECT count(*) FROM user_metrics) AS user_metrics, (SELECT count(*) FROM api_usage) AS api_usage, "
            "(SELECT count(*) FROM spend_hourly) AS spend_hourly"
        )
        assert row is not None
        return dict(row)
    finally:
        await conn.close()


def budget_figures(drained: dict[str, Any]) -> dict[str, Any]:
    """From the worker's own metrics over the drain: budget periods evaluated per batch and the mean time of
    a batch's evaluation."""
    metrics = drained.get("worker_metrics") or {}
    batch = (metrics.get("budget_evaluation") or {}).get("batch") or {}
    periods = (metrics.get("budget_periods_evaluated") or {}).get("batch")
    batches = batch.get("count")
    return {
        "evaluation_mean_ms": batch.get("mean_ms"),
        "periods_per_batch": round(periods / batches, 1) if periods is not None and batches else None,
    }
