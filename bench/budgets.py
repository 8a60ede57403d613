"""Budget evaluation per batch, timed directly against the database with the worker's own evaluator.

One realistic batch (5,000 API-usage events over the world's organizations, projects and users) gives the
touched scopes (``Touch``: organization, project, user, hour) exactly as ``insert_api_usage`` reports them.
``BudgetEngine.evaluate`` then runs for them as the worker's role, inside a transaction that is rolled back
(nothing changes between repetitions), in three cases:

- ``few``: 10 active budgets, all of them on scopes the batch touches;
- ``many``: the same 10 plus enough budgets on other organizations (never touched) to reach 10,000;
- ``many_touched``: 10,000 active budgets of which the batch touches many more: every project and user of
  the world has one (302 touched with the default world: the 2 organization budgets, 100 projects, 200 users).

Budget amounts are far above any spend, so every candidate's spend is computed on every repetition (the
worst case: a candidate whose thresholds have all alerted is skipped by the candidate query). Each case
stops repeating once it has used ``case_seconds`` (at least one measured evaluation).
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


async def _hot_budgets(conn: asyncpg.Connection, world: w.World, *, every_scope: bool) -> int:
    """Budgets on scopes the batch touches: organization budgets on the first two organizations, and project
    and user budgets on two of each of theirs (or, ``every_scope``, on every project and user of the world)."""
    orgs = world.orgs if every_scope else world.orgs[:HOT_ORGS]
    created = 0
    for index, org in enumerate(orgs):
        projects = org.projects if every_scope else org.projects[:2]
        users = org.users if every_scope else org.users[:2]
        if index < HOT_ORGS:
            await conn.execute(
                "INSERT INTO ai_organization_budgets (organization_id, name, amount) VALUES ($1, 'bench-hot', 1e9)",
                org.id,
            )
            created += 1
        await conn.executemany(
            "INSERT INTO ai_project_budgets (organization_id, project_id, name, amount) "
            "VALUES ($1, $2, 'bench-hot', 1e9)",
            [(org.id, project) for project, _ in projects],
        )
        await conn.executemany(
            "INSERT INTO ai_budgets (organization_id, user_id, name, amount) VALUES ($1, $2, 'bench-hot', 1e9)",
            [(org.id, user) for user in users],
        )
        created += len(projects) + len(users)
    return created


async def _cold_budgets(conn: asyncpg.Connection, count: int) -> int:
    """``count`` active budgets on organizations no batch touches (10% organization, 30% project, 60% user
    budgets), with the organizations, projects and users they need."""
    if count <= 0:
        return 0
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
        "SELECT u.organization_id, u.id, 'bench-cold', 1e9 FROM users u JOIN cold_orgs o "
        "ON o.id = u.organization_id ORDER BY u.id LIMIT $1",
        user_budgets,
    )
    await conn.execute("DROP TABLE cold_orgs")
    return org_budgets + project_budgets + user_budgets


async def _active(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT (SELECT count(*) FROM ai_organization_budgets WHERE is_active) + "
            "(SELECT count(*) FROM ai_project_budgets WHERE is_active) + "
            "(SELECT count(*) FROM ai_budgets WHERE is_active)"
        )
    )


async def _time_evaluation(
    db: Database, engine: BudgetEngine, touches: list[Touch], repeats: int, case_seconds: float
) -> dict[str, Any]:
    tenants = {t.organization_id for t in touches}
    evaluate_ms: list[float] = []
    candidates_ms: list[float] = []
    candidates = 0
    case_started = time.perf_counter()
    while len(evaluate_ms) < repeats + 1:  # the first round warms caches and plans; it is not counted...
        over = time.perf_counter() - case_started > case_seconds
        if over and (len(evaluate_ms) > 1 or (evaluate_ms and evaluate_ms[0] >= 1_000)):
            break
        try:
            async with db.transaction() as tx:
                await tx.set_tenants(tenants)
                started = time.perf_counter()
                rows = await tx.budget_candidates(touches)
                candidates_ms.append((time.perf_counter() - started) * 1000)
                candidates = len(rows)
                started = time.perf_counter()
                alerts = await engine.evaluate(tx, touches)
                evaluate_ms.append((time.perf_counter() - started) * 1000)
                assert not alerts, "bench budgets are never crossed"
                raise _Rollback
        except _Rollback:
            pass
    if len(evaluate_ms) > 1 or evaluate_ms[0] < 1_000:  # ...unless it is the only one, being slow
        evaluate_ms, candidates_ms = evaluate_ms[1:] or evaluate_ms, candidates_ms[1:] or candidates_ms
    return {
        "candidates": candidates,
        "repeats": len(evaluate_ms),
        "median_ms": round(statistics.median(evaluate_ms), 2),
        "p95_ms": round(sorted(evaluate_ms)[min(len(evaluate_ms) - 1, int(0.95 * len(evaluate_ms)))], 2),
        "mean_ms": round(statistics.fmean(evaluate_ms), 2),
        "candidate_query_median_ms": round(statistics.median(candidates_ms), 2),
    }


async def budget_phase(
    url: str, world: w.World, totals: tuple[int, int], repeats: int, case_seconds: float
) -> dict[str, Any]:
    few_total, many_total = totals
    touches = batch_touches(world)
    settings = Settings(database_url=url, kafka_bootstrap_servers="127.0.0.1:9")
    engine = BudgetEngine(settings)
    admin = await asyncpg.connect(url)
    db = await Database.open(url, role="cost_worker_writer", min_size=1, max_size=1)
    cases: dict[str, Any] = {}
    try:
        hot = await _hot_budgets(admin, world, every_scope=False)
        await _cold_budgets(admin, few_total - hot)
        await admin.execute("ANALYZE")
        cases["few"] = await _time_evaluation(db, engine, touches, repeats, case_seconds) | {
            "active": await _active(admin)
        }
        await _cold_budgets(admin, many_total - await _active(admin))
        await admin.execute("ANALYZE")
        cases["many"] = await _time_evaluation(db, engine, touches, repeats, case_seconds) | {
            "active": await _active(admin)
        }
        # Every project and user of the world gets a budget too; as many cold ones are deactivated.
        await admin.execute("UPDATE ai_organization_budgets SET is_active = false WHERE name = 'bench-hot'")
        await admin.execute("UPDATE ai_project_budgets SET is_active = false WHERE name = 'bench-hot'")
        await admin.execute("UPDATE ai_budgets SET is_active = false WHERE name = 'bench-hot'")
        added = await _hot_budgets(admin, world, every_scope=True)
        extra = await _active(admin) - many_total
        if extra > 0:
            await admin.execute(
                "UPDATE ai_budgets SET is_active = false WHERE id IN "
                "(SELECT id FROM ai_budgets WHERE name = 'bench-cold' AND is_active ORDER BY id LIMIT $1)",
                extra,
            )
        await admin.execute("ANALYZE")
        cases["many_touched"] = await _time_evaluation(db, engine, touches, repeats, case_seconds) | {
            "active": await _active(admin),
            "hot_budgets": added,
        }
    finally:
        await db.close()
        await admin.close()
    few, many = cases["few"]["median_ms"], cases["many"]["median_ms"]
    return {
        "batch_events": CEILING_BATCH,
        "touched_scopes": len(touches),
        "cases": cases,
        "many_over_few": round(many / few, 2) if few else None,
        "touched_over_few": round(cases["many_touched"]["median_ms"] / few, 2) if few else None,
    }
