"""Budget evaluation per batch, timed directly against the database with the worker's own evaluator.

One realistic batch (5,000 API-usage events over the world's organizations, projects and users) gives the
touched scopes (``Touch``: organization, project, user, hour) exactly as ``insert_api_usage`` reports them.
``BudgetEngine.evaluate`` then runs for them as the worker's role, inside a transaction that is rolled back
(nothing changes between repetitions), in three states of the same database:

- ``few``: 10 active budgets, all of them on scopes the batch touches (2 organizations, 4 projects, 4 users);
- ``many``: the same 10 plus 9,990 on organizations no batch touches: 10,000 active, the same 10 touched;
- ``many_touched``: 10,000 active of which every project and user of the world has one (302 touched).

All budgets exist from the start; a state only switches ``is_active`` (then ANALYZE), and ``few`` and ``many``
are measured alternately (few, many, few, many, ...) so that drift on a shared machine hits both alike.
Budget amounts are far above any spend, so every candidate's spend is computed on every repetition (the worst
case; since issue 12 every candidate is evaluated anyway: spend may have fallen). A state stops repeating
once it has used ``case_seconds`` (at least one measured evaluation).
"""

from __future__ import annotations

import random
import statistics
import time
from datetime import timedelta
from typing import Any

import asyncpg

from bench import world as w
from bench.config import CEILING_BATCH
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.pipeline import Touch
from worker.store import Database

HOT_ORGS = 2  # organizations of the world that carry the 10 "few" budgets: 1 + 2 projects + 2 users each


class _Rollback(Exception):
    pass


def batch_touches(world: w.World, size: int = CEILING_BATCH) -> list[Touch]:
    """The scopes one batch of ``size`` fresh events touches (what insert_api_usage returns, per hour)."""
    rng = random.Random(f"{world.seed}-budget-batch")
    now = world.anchor
    touches = set()
    for index in range(size):
        row = w.event_row(world, rng, f"b{index}", now - timedelta(minutes=30) + timedelta(seconds=index % 600))
        hour = row[8].replace(minute=0, second=0, microsecond=0)
        touches.add(Touch(row[0], row[2], row[3], hour))
    return sorted(touches, key=lambda t: (str(t.organization_id), str(t.project_id), str(t.user_id), t.at))


TABLES = ("ai_organization_budgets", "ai_project_budgets", "ai_budgets")
# Which budget names are active in each state.
STATES = {
    "few": ("bench-hot",),
    "many": ("bench-hot", "bench-cold", "bench-spare"),
    "many_touched": ("bench-hot", "bench-wide", "bench-cold"),
}


async def _budgets(conn: asyncpg.Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    if table == "ai_organization_budgets":
        sql = "INSERT INTO ai_organization_budgets (organization_id, name, amount) VALUES ($1, $2, 1e9)"
    elif table == "ai_project_budgets":
        sql = "INSERT INTO ai_project_budgets (organization_id, project_id, name, amount) VALUES ($1, $2, $3, 1e9)"
    else:
        sql = "INSERT INTO ai_budgets (organization_id, user_id, name, amount) VALUES ($1, $2, $3, 1e9)"
    await conn.executemany(sql, rows)


async def _touched_budgets(conn: asyncpg.Connection, world: w.World) -> int:
    """``bench-hot``: organization budgets on the first two organizations, project and user budgets on two
    of each of theirs (10). ``bench-wide``: every other project and user of the world."""
    orgs, projects, users = [], [], []
    for index, org in enumerate(world.orgs):
        hot = index < HOT_ORGS
        if hot:
            orgs.append((org.id, "bench-hot"))
        for j, (project, _) in enumerate(org.projects):
            projects.append((org.id, project, "bench-hot" if hot and j < 2 else "bench-wide"))
        for j, user in enumerate(org.users):
            users.append((org.id, user, "bench-hot" if hot and j < 2 else "bench-wide"))
    await _budgets(conn, "ai_organization_budgets", orgs)
    await _budgets(conn, "ai_project_budgets", projects)
    await _budgets(conn, "ai_budgets", users)
    return sum(1 for rows in (projects, users) for row in rows if row[-1] == "bench-wide")


async def _cold_budgets(conn: asyncpg.Connection, count: int, spare: int) -> None:
    """``count`` budgets on organizations no batch touches (10% organization, 30% project, 60% user budgets),
    with the organizations, projects and users they need; ``spare`` of the user budgets are named
    ``bench-spare`` (inactive in ``many_touched``, which keeps the total at ``count`` + 10)."""
    if count <= 0:
        return
    org_budgets = max(1, count // 10)
    project_budgets = (count * 3) // 10
    user_budgets = count - org_budgets - project_budgets
    orgs = max(org_budgets, -(-project_budgets // 3), -(-user_budgets // 6))
    await conn.execute(
        "INSERT INTO organizations (id, name, slug) "
        "SELECT gen_random_uuid(), 'cold', 'bench-cold-' || g FROM generate_series(1, $1) g",
        orgs,
    )
    await conn.execute(
        "CREATE TEMP TABLE cold_orgs AS SELECT id, row_number() OVER (ORDER BY id) AS n FROM organizations "
        "WHERE name = 'cold'"
    )
    await conn.execute(
        "INSERT INTO projects (organization_id, name) SELECT o.id, 'cold-' || g FROM cold_orgs o "
        "CROSS JOIN generate_series(1, 3) g"
    )
    await conn.execute(
        "INSERT INTO users (organization_id, email, username) "
        "SELECT o.id, o.id || '-' || g || '@cold.example', o.id || '-' || g FROM cold_orgs o "
        "CROSS JOIN generate_series(1, 6) g"
    )
    await conn.execute(
        "INSERT INTO ai_organization_budgets (organization_id, name, amount) "
        "SELECT id, 'bench-cold', 1e9 FROM cold_orgs WHERE n <= $1",
        org_budgets,
    )
    await conn.execute(
        "INSERT INTO ai_project_budgets (organization_id, project_id, name, amount) "
        "SELECT p.organization_id, p.id, 'bench-cold', 1e9 FROM projects p JOIN cold_orgs o "
        "ON o.id = p.organization_id ORDER BY p.id LIMIT $1",
        project_budgets,
    )
    await conn.execute(
        "INSERT INTO ai_budgets (organization_id, user_id, name, amount) "
        "SELECT u.organization_id, u.id, CASE WHEN row_number() OVER (ORDER BY u.id) <= $2 "
        "THEN 'bench-spare' ELSE 'bench-cold' END, 1e9 FROM users u JOIN cold_orgs o "
        "ON o.id = u.organization_id ORDER BY u.id LIMIT $1",
        user_budgets,
        min(spare, user_budgets),
    )
    await conn.execute("DROP TABLE cold_orgs")


async def _activate(conn: asyncpg.Connection, state: str) -> int:
    for table in TABLES:
        await conn.execute(f"UPDATE {table} SET is_active = (name = ANY($1::text[]))", list(STATES[state]))
        await conn.execute(f"ANALYZE {table}")
    return await _active(conn)


async def _active(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT (SELECT count(*) FROM ai_organization_budgets WHERE is_active) + "
            "(SELECT count(*) FROM ai_project_budgets WHERE is_active) + "
            "(SELECT count(*) FROM ai_budgets WHERE is_active)"
        )
    )


async def _evaluate_once(db: Database, engine: BudgetEngine, touches: list[Touch]) -> tuple[float, float, int]:
    """(evaluate ms, candidate query ms, candidates) of one rolled-back evaluation."""
    result = (0.0, 0.0, 0)
    try:
        async with db.transaction() as tx:
            await tx.set_tenants({t.organization_id for t in touches})
            started = time.perf_counter()
            rows = await tx.budget_candidates(touches)
            candidates_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            alerts = await engine.evaluate(tx, touches)
            result = ((time.perf_counter() - started) * 1000, candidates_ms, len(rows))
            assert not alerts, "bench budgets are never crossed"
            raise _Rollback
    except _Rollback:
        pass
    return result


def _stats(runs: list[tuple[float, float, int]], active: int) -> dict[str, Any]:
    evaluate_ms = sorted(r[0] for r in runs)
    return {
        "active": active,
        "candidates": runs[-1][2],
        "repeats": len(runs),
        "median_ms": round(statistics.median(evaluate_ms), 2),
        "p95_ms": round(evaluate_ms[min(len(evaluate_ms) - 1, int(0.95 * len(evaluate_ms)))], 2),
        "mean_ms": round(statistics.fmean(evaluate_ms), 2),
        "candidate_query_median_ms": round(statistics.median(r[1] for r in runs), 2),
    }


async def budget_phase(
    url: str, world: w.World, totals: tuple[int, int], repeats: int, case_seconds: float
) -> dict[str, Any]:
    _, many_total = totals  # the few state is the 10 budgets on touched scopes
    touches = batch_touches(world)
    settings = Settings(database_url=url, kafka_bootstrap_servers="127.0.0.1:9")
    engine = BudgetEngine(settings)
    admin = await asyncpg.connect(url)
    db = await Database.open(url, role="cost_worker_writer", min_size=1, max_size=1)
    runs: dict[str, list[tuple[float, float, int]]] = {state: [] for state in STATES}
    active: dict[str, int] = {}
    try:
        wide = await _touched_budgets(admin, world)
        hot = HOT_ORGS * 5
        await _cold_budgets(admin, many_total - hot, wide)
        # Warm-up of each state (plans, caches), not counted; a slow one (>= 1 s) is counted instead.
        for state in STATES:
            active[state] = await _activate(admin, state)
            first = await _evaluate_once(db, engine, touches)
            if first[0] >= 1_000:
                runs[state].append(first)
        started = time.perf_counter()
        while len(runs["few"]) < repeats and (time.perf_counter() - started < 2 * case_seconds or not runs["few"]):
            for state in ("few", "many"):
                await _activate(admin, state)
                runs[state].append(await _evaluate_once(db, engine, touches))
        await _activate(admin, "many_touched")
        started = time.perf_counter()
        while len(runs["many_touched"]) < repeats and (
            time.perf_counter() - started < case_seconds or not runs["many_touched"]
        ):
            runs["many_touched"].append(await _evaluate_once(db, engine, touches))
    finally:
        await db.close()
        await admin.close()
    cases = {state: _stats(runs[state], active[state]) for state in STATES}
    few, many = cases["few"]["median_ms"], cases["many"]["median_ms"]
    return {
        "batch_events": CEILING_BATCH,
        "touched_scopes": len(touches),
        "cases": cases,
        "many_over_few": round(many / few, 2) if few else None,
        "touched_over_few": round(cases["many_touched"]["median_ms"] / few, 2) if few else None,
    }
