"""Budget evaluation per batch, timed directly against the database with the worker's own evaluator.

One realistic batch (5,000 API-usage events over the world's organizations, projects and users) gives the
touched scopes (``Touch``: organization, project, user, hour) exactly as ``insert_api_usage`` reports them.
``BudgetEngine.evaluate`` then runs for them as the worker's role, inside a transaction that is rolled back
(nothing changes between repetitions), in three states of the same database:

- ``few``: 10 active budgets, all of them on scopes the batch touches (2 organizations, 4 projects, 4 users);
- ``many``: the same 10 plus 9,990 on organizations no batch touches: 10,000 active, the same 10 touched;
- ``many_touched``: 10,000 active of which every project and user of the world has one (302 touched).
- ``full_periods`` (issue 18 item 6): 1,000 monthly budgets (``full_period_orgs`` organizations with an
  organization budget, 4 project budgets and 5 user budgets each), all touched by one batch, whose period holds a
  month of hourly rollups per project and user and hourly provider lines (a cost and a usage line per project and
  hour) up to two days before the batch. Timed both ways on the same data: ``BudgetEngine.evaluate`` (spend from
  the aggregate, ``cost_worker_spend``) and the same candidates' spend by the full computation
  (``cost_worker_spend_full``, what evaluation read before 0012).

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
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from bench import world as w
from bench.config import CEILING_BATCH
from worker.budgets import REGISTRATIONS_PER_EVALUATION, BudgetEngine, Candidate
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


async def _register(db: Database, touches: list[Touch]) -> float:
    """ms to register the touched budgets' scopes in the spend aggregate (0016), committed: what a budget's first
    evaluation does once, so the rolled-back evaluations measured after it see budgets in their steady state."""
    async with db.transaction() as tx:
        await tx.set_tenants({t.organization_id for t in touches})
        candidates = [Candidate.from_row(row) for row in await tx.budget_candidates(touches)]
        started = time.perf_counter()
        while await tx.track_spend(candidates, max_new=REGISTRATIONS_PER_EVALUATION):
            pass
        return (time.perf_counter() - started) * 1000


# ----------------------------------------------------------------------------------------- full periods

FULL_PROJECTS = 4  # per organization of the full-periods case (and 5 users: 10 budgets per organization)
FULL_USERS = 5
FULL_REPORTED_UNTIL = timedelta(days=2)  # provider lines stop this long before the batch (estimates fill the rest)

FULL_PERIOD_DATA = """
WITH orgs AS (
    INSERT INTO organizations (id, name, slug)
    SELECT gen_random_uuid(), 'bench-full', 'bench-full-' || g FROM generate_series(1, $1) g
    RETURNING id
),
numbered AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM orgs),
projects_in AS (
    INSERT INTO projects (organization_id, name, ai_provider, ai_organization_id, ai_project_id)
    SELECT o.id, 'full-' || j, 'openai', 'full-acct-' || o.n, 'full_' || o.n || '_' || j
    FROM numbered o CROSS JOIN generate_series(1, $2) j
    RETURNING id, organization_id
)
INSERT INTO users (organization_id, email, username)
SELECT o.id, o.id || '-' || g || '@full.example', o.id || '-full-' || g
FROM numbered o CROSS JOIN generate_series(1, $3) g
"""
# A month of hourly rollups per project and per user (each user works in one project), and hourly provider lines
# per project (costs_v1 and usage_v1) up to $3. Superuser under session_replication_role = replica (no triggers):
# the aggregate is rebuilt once afterwards (cost_worker_spend_rebuild), as the migration's backfill does.
FULL_PERIOD_ROLLUPS = """
INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, total_tokens,
                             estimated_cost_usd, platform_cost_usd)
SELECT p.organization_id, p.id, h, 'openai', 40, 40000, ((extract(epoch FROM h)::bigint / 3600 * 7919) % 1000) / 100.0,
       ((extract(epoch FROM h)::bigint / 3600 * 7919) % 1000) / 100.0
FROM projects p JOIN organizations o ON o.id = p.organization_id AND o.name = 'bench-full'
CROSS JOIN generate_series($1::timestamptz, $2::timestamptz - interval '1 hour', interval '1 hour') h
"""
FULL_PERIOD_USER_ROLLUPS = """
INSERT INTO user_metrics (organization_id, user_id, project_id, hour, provider, request_count, total_tokens,
                          estimated_cost_usd, platform_cost_usd)
SELECT u.organization_id, u.id, p.id, h, 'openai', 8, 8000, 0.25, 0.25
FROM (SELECT u.*, row_number() OVER (PARTITION BY u.organization_id ORDER BY u.id) AS n
      FROM users u JOIN organizations o ON o.id = u.organization_id AND o.name = 'bench-full') u
JOIN (SELECT p.*, row_number() OVER (PARTITION BY p.organization_id ORDER BY p.id) AS n FROM projects p) p
  ON p.organization_id = u.organization_id AND p.n = (u.n - 1) % $3 + 1
CROSS JOIN generate_series($1::timestamptz, $2::timestamptz - interval '1 hour', interval '1 hour') h
"""
FULL_PERIOD_LINES = """
INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, ai_project_id, api_version, report,
                       bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, unit,
                       collected_at)
SELECT p.organization_id, p.id, 'openai', p.ai_organization_id, p.ai_project_id, i.version::cost_api_version,
       cost_worker_default_report('openai', i.version::cost_api_version), h, h + interval '1 hour', i.item, 'USD',
       ((extract(epoch FROM h)::bigint / 3600 * 104729) % 1000) / 100.0,
       CASE WHEN i.version = 'usage_v1' THEN 1000 END, CASE WHEN i.version = 'usage_v1' THEN 'tokens' END,
       h + interval '6 hours'
FROM projects p JOIN organizations o ON o.id = p.organization_id AND o.name = 'bench-full'
CROSS JOIN generate_series($1::timestamptz, $2::timestamptz - interval '1 hour', interval '1 hour') h
CROSS JOIN (VALUES ('costs_v1', 'completions'), ('usage_v1', 'gpt-4o:input_tokens')) AS i(version, item)
"""
FULL_PERIOD_BUDGETS = """
INSERT INTO ai_organization_budgets (organization_id, name, amount)
SELECT id, 'bench-full', 1e9 FROM organizations WHERE name = 'bench-full';
INSERT INTO ai_project_budgets (organization_id, project_id, name, amount)
SELECT p.organization_id, p.id, 'bench-full', 1e9
FROM projects p JOIN organizations o ON o.id = p.organization_id AND o.name = 'bench-full';
INSERT INTO ai_budgets (organization_id, user_id, name, amount)
SELECT u.organization_id, u.id, 'bench-full', 1e9
FROM users u JOIN organizations o ON o.id = u.organization_id AND o.name = 'bench-full';
"""
# The candidates' spend by the full computation (what budget_spend read before 0012), timed for comparison.
FULL_SPEND = """
SELECT count(s.spend)
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::uuid[], $5::timestamptz[], $6::timestamptz[], $7::text[])
    AS i(scope, organization_id, project_id, user_id, period_start, period_end, currency)
CROSS JOIN LATERAL cost_worker_spend_full(i.scope, i.organization_id, i.project_id, i.user_id,
                                          i.period_start, i.period_end, i.currency) s
"""


async def _full_period_world(conn: asyncpg.Connection, orgs: int, batch_at: datetime) -> list[Touch]:
    """Create the case's organizations, data and budgets; returns the touches of one batch at ``batch_at``."""
    month = batch_at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    hour = batch_at.replace(minute=0, second=0, microsecond=0)
    await conn.execute(FULL_PERIOD_DATA, orgs, FULL_PROJECTS, FULL_USERS)
    await conn.execute("SET session_replication_role = replica")
    try:
        await conn.execute(FULL_PERIOD_ROLLUPS, month, hour + timedelta(hours=1))
        await conn.execute(FULL_PERIOD_USER_ROLLUPS, month, hour + timedelta(hours=1), FULL_PROJECTS)
        await conn.execute(FULL_PERIOD_LINES, month, hour - FULL_REPORTED_UNTIL)
    finally:
        await conn.execute("RESET session_replication_role")
    ids = [r["id"] for r in await conn.fetch("SELECT id FROM organizations WHERE name = 'bench-full'")]
    await conn.execute("SELECT cost_worker_spend_rebuild($1::uuid[])", ids)
    await conn.execute(FULL_PERIOD_BUDGETS)
    await conn.execute("ANALYZE")
    rows = await conn.fetch(
        "SELECT um.organization_id, um.project_id, um.user_id FROM user_metrics um "
        "JOIN organizations o ON o.id = um.organization_id AND o.name = 'bench-full' WHERE um.hour = $1",
        hour,
    )
    return [Touch(r["organization_id"], r["project_id"], r["user_id"], hour) for r in rows]


async def full_period_case(
    url: str, db: Database, engine: BudgetEngine, world: w.World, *, orgs: int, case_seconds: float
) -> dict[str, Any]:
    admin = await asyncpg.connect(url)
    try:
        touches = await _full_period_world(admin, orgs, world.anchor - timedelta(minutes=30))
        for table in TABLES:
            await admin.execute(f"UPDATE {table} SET is_active = (name = 'bench-full')")
            await admin.execute(f"ANALYZE {table}")
        active = await _active(admin)
        rows_in_period = await admin.fetchrow(
            "SELECT (SELECT count(*) FROM project_metrics m JOIN organizations o ON o.id = m.organization_id "
            "AND o.name = 'bench-full') AS rollups, (SELECT count(*) FROM cost_data c JOIN organizations o "
            "ON o.id = c.organization_id AND o.name = 'bench-full') AS lines"
        )
    finally:
        await admin.close()
    registration_ms = await _register(db, touches)
    await _evaluate_once(db, engine, touches)  # warm-up
    runs: list[tuple[float, float, int]] = []
    started = time.perf_counter()
    while not runs or (len(runs) < 10 and time.perf_counter() - started < case_seconds):
        runs.append(await _evaluate_once(db, engine, touches))
    full_ms: list[float] = []
    started = time.perf_counter()
    while not full_ms or (len(full_ms) < 3 and time.perf_counter() - started < case_seconds):
        full_ms.append(await _full_spend_once(db, touches))
    return _stats(runs, active) | {
        "organizations": orgs,
        "touched_scopes": len(touches),
        "rollups": rows_in_period["rollups"] if rows_in_period else None,
        "lines": rows_in_period["lines"] if rows_in_period else None,
        "full_computation_median_ms": round(statistics.median(full_ms), 2),
        "registration_ms": round(registration_ms, 2),
        "full_computation_repeats": len(full_ms),
    }


async def _full_spend_once(db: Database, touches: list[Touch]) -> float:
    """ms of the candidates' spend by the full computation (rolled back like an evaluation)."""
    elapsed = 0.0
    try:
        async with db.transaction() as tx:
            await tx.set_tenants({t.organization_id for t in touches})
            candidates = await tx.budget_candidates(touches)
            started = time.perf_counter()
            await tx.conn.fetchval(
                FULL_SPEND,
                [c["scope"] for c in candidates],
                [c["organization_id"] for c in candidates],
                [c["project_id"] for c in candidates],
                [c["user_id"] for c in candidates],
                [c["period_start"] for c in candidates],
                [c["period_end"] for c in candidates],
                [c["currency"] for c in candidates],
            )
            elapsed = (time.perf_counter() - started) * 1000
            raise _Rollback
    except _Rollback:
        pass
    return elapsed


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
            await _register(db, touches)
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
        full_orgs = max(1, many_total // 100)  # 100 organizations (1,000 budgets) at full size
        full_periods = await full_period_case(url, db, engine, world, orgs=full_orgs, case_seconds=case_seconds)
    finally:
        await db.close()
        await admin.close()
    cases = {state: _stats(runs[state], active[state]) for state in STATES} | {"full_periods": full_periods}
    few, many = cases["few"]["median_ms"], cases["many"]["median_ms"]
    return {
        "batch_events": CEILING_BATCH,
        "touched_scopes": len(touches),
        "cases": cases,
        "many_over_few": round(many / few, 2) if few else None,
        "touched_over_few": round(cases["many_touched"]["median_ms"] / few, 2) if few else None,
    }
