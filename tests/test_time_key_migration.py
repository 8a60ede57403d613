"""Migration 0014 (issue 18, growth): api_usage's key becomes (organization_id, occurred_at, event_id) on every
partition, online. Each partition's index is built CONCURRENTLY while a writer goes on, a failed earlier build is
cleaned up, and the transaction only swaps constraints: afterwards each partition has exactly one index, its
primary key, attached to the table's; rows and duplicates mean what they meant."""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg

from tests.factories import api_event, make_org
from tests.feeding import Feeder
from tests.test_partition_migration import migrate_while_writing, schema_before
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.migrate import migrate
from worker.partitions import add_months, month_of
from worker.pipeline import Pipeline
from worker.store import Database

BEFORE = 13  # the last migration before 0014
ROWS_PER_PARTITION = 20_000
KEY = "(organization_id, occurred_at, event_id)"
TABLE_KEY = (
    "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'api_usage'::regclass AND contype = 'p'"
)


def name(month: date) -> str:
    return f"api_usage_y{month.year}m{month.month:02d}"


async def fill(conn: asyncpg.Connection, org: uuid.UUID, first: date, rows: int) -> None:
    await conn.execute(
        "INSERT INTO api_usage (organization_id, event_id, endpoint, method, status_code, occurred_at) "
        "SELECT $1, md5(g::text), '/v1/x', 'POST', 200, $2::date + g * interval '1 minute' "
        "FROM generate_series(1, $3) g",
        org,
        first,
        rows,
    )


async def keys(conn: asyncpg.Connection) -> dict[str, list[tuple[str, str, bool]]]:
    """Per partition of api_usage: (index name, definition's columns, attached to the table's key) of each index."""
    rows = await conn.fetch(
        "SELECT c.relname AS part, i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def, "
        "       EXISTS (SELECT FROM pg_inherits x WHERE x.inhrelid = i.indexrelid) AS attached "
        "FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid JOIN pg_index i ON i.indrelid = c.oid "
        "WHERE h.inhparent = 'api_usage'::regclass ORDER BY 1, 2"
    )
    out: dict[str, list[tuple[str, str, bool]]] = {}
    for row in rows:
        out.setdefault(row["part"], []).append((row["name"], row["def"].split(" USING btree ")[1], row["attached"]))
    return out


async def test_every_partition_gets_the_time_led_key_online_and_duplicates_stay_duplicates(
    empty_database_url: str, tmp_path: Path, settings: Settings
) -> None:
    url = empty_database_url
    await migrate(url, directory=schema_before(tmp_path, BEFORE))
    conn = await asyncpg.connect(url)
    try:
        org = uuid.uuid4()
        await conn.execute("INSERT INTO organizations (id, name, slug) VALUES ($1, 'big', $2)", org, f"big-{org.hex}")
        # Months beyond the partition of before 0011 (it ends at most two months ahead), made as the worker would.
        months = [add_months(month_of(datetime.now(UTC)), n) for n in (6, 7, 8)]
        made = await conn.fetchval("SELECT cost_worker_api_usage_ensure($1, $2)", months[0], months[-1])
        assert set(made) >= {name(month) for month in months}
        for first in (add_months(months[0], -12), months[0], months[1]):
            await fill(conn, org, first, ROWS_PER_PARTITION)
        # An earlier migrate whose concurrent build failed left an invalid index of the name 0014 builds.
        failed = f"CREATE UNIQUE INDEX CONCURRENTLY {name(months[0])}_time_key ON {name(months[0])} (organization_id)"
        with contextlib.suppress(asyncpg.UniqueViolationError):
            await conn.execute(failed)
        assert await conn.fetchval("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 1
        before = await conn.fetchval("SELECT count(*) FROM api_usage")
        found_before = await keys(conn)
        old_key = await conn.fetchval(TABLE_KEY)
        assert old_key == "PRIMARY KEY (organization_id, event_id, occurred_at)"
    finally:
        await conn.close()

    report, writes, took = await migrate_while_writing(url, org)
    assert report.applied[0] == "0014_api_usage_time_key"
    assert len(writes.stalls) >= 3, "the writer went on while the migration ran"
    print(
        f"\n0014 on {before:,} rows in {len(found_before)} partitions: {took:.2f} s while a writer inserted "
        f"{len(writes.stalls)} rows; "
        f"the longest insert waited {max(writes.stalls) * 1000:.0f} ms"
    )

    db = await asyncpg.connect(url)
    pool = await Database.open(url, role="cost_worker_writer")
    try:
        key = await db.fetchval(TABLE_KEY)
        assert key == f"PRIMARY KEY {KEY}"
        found = await keys(db)
        assert set(found) >= {"api_usage_legacy", *map(name, months)}
        for part, indexes in found.items():
            # One index each: the one built online, now the partition's key and attached (not built again).
            assert indexes == [(f"{part}_pkey", KEY, True)], (part, indexes)
        assert await db.fetchval("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
        assert await db.fetchval("SELECT count(*) FROM api_usage") == before + len(writes.stalls)

        # A month made after the migration gets the same key from the table.
        later = add_months(months[-1], 1)
        assert await db.fetchval("SELECT cost_worker_api_usage_ensure($1, $1)", later) == [name(later)]
        assert (await keys(db))[name(later)] == [(f"{name(later)}_pkey", KEY, True)]

        # The worker on the new key: an event is stored once, its redelivery is a no-op, a conflicting one is seen.
        tenant = await make_org(db)
        feeder = Feeder(Pipeline(pool, settings, budgets=BudgetEngine(settings)), settings)
        event = api_event(tenant)
        topic = settings.topic_api_usage
        assert (await feeder.events(event)).messages[(topic, "inserted")] == 1
        assert (await feeder.events(event)).messages[(topic, "duplicate")] == 1
        changed = dict(event, status_code=500)
        assert (await feeder.events(changed)).quarantined[(topic, "conflicting_duplicate")] == 1
        assert await db.fetchval("SELECT count(*) FROM api_usage WHERE event_id = $1", event["event_id"]) == 1
    finally:
        await pool.close()
        await db.close()
