"""``python -m bench.cover_probe [hours]``: the estimate trigger's coverage check, 0012's anti joins against
0017's per-key probes, on a scratch database whose ``spend_cover`` holds ``hours`` of history (default 720).

100 projects in 20 organizations, each covered by a provider row every hour of the history (organization and
project scope); one 4,800-event batch's deltas over the last 24 hours (covered) and the next 24 (not covered).
Each function runs three times with the table's statistics stale (never analyzed: a table filled since the last
ANALYZE), then three times after ANALYZE, as the worker's role under row-level security, in a transaction rolled
back. Both must leave the same aggregate; the figures are bench/PROFILE.md's.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg

from bench.services import scratch_postgres
from worker import devstack
from worker.migrate import migrate

MIGRATIONS = Path(__file__).resolve().parent.parent / "schema" / "migrations"
DEFAULT_HOURS = 720  # a month of hourly coverage
ORGANIZATIONS = 20
PROJECTS_PER_ORGANIZATION = 5
BATCH_EVENTS = 4_800
ROUNDS = 3


def _old_function() -> str:
    """0012's body under another name, so both run in one database."""
    text = (MIGRATIONS / "0012_spend_aggregate.sql").read_text()
    found = re.search(r"CREATE FUNCTION cost_worker_spend_estimates_changed\(.*?\n\$\$;\n", text, re.S)
    assert found is not None
    return found.group(0).replace("cost_worker_spend_estimates_changed(", "old_estimates_changed(", 1)


async def _seed(conn: asyncpg.Connection, hours: int) -> tuple[list[uuid.UUID], list[tuple[uuid.UUID, uuid.UUID]]]:
    organizations = [uuid.uuid4() for _ in range(ORGANIZATIONS)]
    projects = [(o, uuid.uuid4()) for o in organizations for _ in range(PROJECTS_PER_ORGANIZATION)]
    await conn.executemany(
        "INSERT INTO organizations (id, name, slug) VALUES ($1, 'o', $2)", [(o, str(o)) for o in organizations]
    )
    await conn.executemany(
        "INSERT INTO projects (id, organization_id, name, ai_provider, ai_organization_id)"
        " VALUES ($2, $1, 'p', 'openai', 'acct')",
        projects,
    )
    end = datetime(2026, 12, 1, tzinfo=UTC)
    rows = [
        (o, scope, o if scope == "organization" else p, "openai", p, end - timedelta(hours=h), "acct")
        for o, p in projects
        for h in range(1, hours + 1)
        for scope in ("organization", "project")
    ]
    await conn.copy_records_to_table(
        "spend_cover",
        records=rows,
        columns=["organization_id", "scope", "subject", "provider", "project_id", "hour", "ai_organization_id"],
    )
    print(f"spend_cover rows: {len(rows):,}")
    return organizations, projects


async def _run(hours: int) -> None:
    async with scratch_postgres("cover-probe-") as server_url:
        admin = await asyncpg.connect(server_url)
        await admin.execute("CREATE DATABASE cover_probe")
        await admin.close()
        url = devstack.database_url(server_url, "cover_probe")
        await migrate(url)
        conn = await asyncpg.connect(url)
        await conn.execute(_old_function())
        organizations, projects = await _seed(conn, hours)
        rnd = random.Random(1)
        end = datetime(2026, 12, 1, tzinfo=UTC)
        delta = []
        for _ in range(BATCH_EVENTS):
            o, p = rnd.choice(projects)
            delta.append((o, p, "openai", end + timedelta(hours=rnd.randrange(-24, 24)), Decimal("0.001"), 1))
        tenants = ",".join(map(str, organizations))
        for stats in ("stale", "analyzed"):
            if stats == "analyzed":
                await conn.execute("ANALYZE spend_cover")
            for function in ("old_estimates_changed", "cost_worker_spend_estimates_changed") * ROUNDS:
                tx = conn.transaction()
                await tx.start()
                await conn.execute("SET LOCAL ROLE cost_worker_writer")
                await conn.execute("SELECT set_config('cost_worker.organization_ids', $1, true)", tenants)
                started = time.perf_counter()
                await conn.execute(f"SELECT {function}($1::cost_worker_spend_estimate[])", delta)
                elapsed = (time.perf_counter() - started) * 1000
                total = await conn.fetchval("SELECT sum(amount) FROM spend_hourly")
                await tx.rollback()
                print(f"{stats:9} {function:37} {elapsed:8.1f} ms   hourly aggregate sum {total}")
        await conn.close()


if __name__ == "__main__":
    asyncio.run(_run(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_HOURS))
