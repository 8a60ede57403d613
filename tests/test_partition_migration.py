"""Migration 0011 on a filled table (issue 18): today's unpartitioned api_usage becomes the partition api_usage_legacy
while a writer keeps inserting. The index build and the validation run online (the writer goes on); only the
renames and the attach hold an exclusive lock, and neither scans nor builds. Prints the measured figures.

The default suite migrates 200,000 rows; the slow one (make test-all) 3,000,000."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tests.factories import api_event, make_org
from tests.feeding import Feeder
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.migrate import COMPAT_FILE, MigrationReport, migrate, schema_dir
from worker.pipeline import Pipeline
from worker.store import Database

BEFORE = 10  # the last migration before the partitioning


def schema_before(tmp_path: Path, before: int = BEFORE) -> Path:
    """A copy of the schema without the migrations after ``before`` (0011 and later: the release before)."""
    target = tmp_path / "schema"
    shutil.copytree(schema_dir(), target)
    for path in (target / "migrations").glob("*.sql"):
        if int(path.name[:4]) > before:
            path.unlink()
    manifest = target / "migrations" / COMPAT_FILE
    kept = [
        line
        for line in manifest.read_text().splitlines()
        if not re.match(r"^(\d{4})_", line) or int(line[:4]) <= before
    ]
    manifest.write_text("\n".join(kept) + "\n")
    return target


@dataclass
class Writes:
    """A writer inserting one row at a time, as the previous release's batches would, timing each insert; and how
    long the old table was seen locked ACCESS EXCLUSIVE (polled from pg_locks)."""

    stalls: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    exclusive: list[float] = field(default_factory=list)  # the spans seen, in seconds


async def watch_exclusive(url: str, table: int, stop: asyncio.Event, writes: Writes) -> None:
    conn = await asyncpg.connect(url)
    try:
        since = None
        while not stop.is_set():
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE relation = $1 AND mode = 'AccessExclusiveLock' AND granted",
                table,
            )
            now = time.monotonic()
            if held and since is None:
                since = now
            elif not held and since is not None:
                writes.exclusive.append(now - since)
                since = None
            await asyncio.sleep(0.001)
    finally:
        await conn.close()


async def keep_writing(url: str, org: uuid.UUID, stop: asyncio.Event, writes: Writes) -> None:
    conn = await asyncpg.connect(url)
    try:
        n = 0
        while not stop.is_set():
            n += 1
            began = time.monotonic()
            await conn.execute(
                "INSERT INTO api_usage (organization_id, event_id, endpoint, method, status_code, occurred_at) "
                "VALUES ($1, $2, '/v1/x', 'POST', 200, now())",
                org,
                f"during-{n}",
            )
            writes.started.append(began)
            writes.stalls.append(time.monotonic() - began)
            await asyncio.sleep(0.005)
    finally:
        await conn.close()


async def migrate_filled(url: str, tmp_path: Path, rows: int) -> tuple[Writes, float, float]:
    """Migrate to 0010, fill, migrate to the newest while writing. Returns the writes, the fill and migrate times."""
    await migrate(url, directory=schema_before(tmp_path))
    conn = await asyncpg.connect(url)
    try:
        org = uuid.uuid4()
        await conn.execute("INSERT INTO organizations (id, name, slug) VALUES ($1, 'big', $2)", org, f"big-{org.hex}")
        began = time.monotonic()
        await conn.execute(
            "INSERT INTO api_usage (organization_id, event_id, endpoint, method, status_code, occurred_at, "
            "prompt_tokens, completion_tokens, total_tokens, model, cost_usd) "
            "SELECT $1, md5(g::text), '/v1/chat/completions', 'POST', 200, now() - g * interval '7 seconds', "
            "100, 200, 300, 'gpt-4o', 0.001 FROM generate_series(1, $2) g",
            org,
            rows,
        )
        await conn.execute("VACUUM ANALYZE api_usage")
        filled = time.monotonic() - began
        table = await conn.fetchval("SELECT 'api_usage'::regclass::oid")
    finally:
        await conn.close()
    report, writes, took = await migrate_while_writing(url, org, table)
    assert [label for label in report.applied if label.startswith("0011")] == ["0011_partitioned_api_usage"]
    return writes, filled, took


async def migrate_while_writing(
    url: str, org: uuid.UUID, table: int | None = None
) -> tuple[MigrationReport, Writes, float]:
    """Migrate to the newest while a writer inserts one row at a time (and, given a table's oid, while its ACCESS
    EXCLUSIVE moments are watched). Returns the report, the writes and how long migrate took."""
    writes = Writes()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(keep_writing(url, org, stop, writes))]
    if table is not None:
        tasks.append(asyncio.create_task(watch_exclusive(url, table, stop, writes)))
    await asyncio.sleep(0.2)
    began = time.monotonic()
    try:
        report = await migrate(url)
    finally:
        took = time.monotonic() - began
        stop.set()
        await asyncio.gather(*tasks)
    return report, writes, took


async def check_migrated(url: str, rows: int, writes: Writes) -> None:
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = 'api_usage'::regclass") == "p"
        assert await conn.fetchval("SELECT count(*) FROM api_usage") == rows + len(writes.stalls)
        assert await conn.fetchval("SELECT count(*) FROM api_usage_legacy") == rows + len(writes.stalls)
        # The unique indexes built online (0011's, then 0014's with time leading) became the key, not built again
        # under the lock: the last one is the only index left.
        indexes = await conn.fetch(
            "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS def FROM pg_index "
            "WHERE indrelid = 'api_usage_legacy'::regclass"
        )
        assert len(indexes) == 1, indexes
        assert indexes[0]["name"] == "api_usage_legacy_pkey"
        assert "(organization_id, occurred_at, event_id)" in indexes[0]["def"]
        assert await conn.fetchval("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
        heap = await conn.fetchval("SELECT pg_relation_size('api_usage_legacy')")
        total = await conn.fetchval("SELECT pg_total_relation_size('api_usage_legacy')")
        n = rows + len(writes.stalls)
        print(f"storage: {heap / n:.0f} bytes/row of table, {total / n:.0f} bytes/row with the key index and TOAST")
    finally:
        await conn.close()


def report(rows: int, writes: Writes, filled: float, took: float) -> float:
    worst = max(writes.stalls)
    print(
        f"\n0011 on {rows:,} rows: filled in {filled:.1f} s; migrate took {took:.2f} s while a writer inserted "
        f"{len(writes.stalls)} rows one by one; the longest insert waited {worst * 1000:.0f} ms "
        f"(median {sorted(writes.stalls)[len(writes.stalls) // 2] * 1000:.1f} ms); ACCESS EXCLUSIVE on the old "
        f"table seen {len(writes.exclusive)} time(s), {sum(writes.exclusive) * 1000:.0f} ms in all, longest "
        f"{max(writes.exclusive, default=0) * 1000:.0f} ms"
    )
    return worst


async def test_the_migration_keeps_writes_going_and_a_redelivery_stays_a_noop(
    empty_database_url: str, tmp_path: Path, settings: Settings
) -> None:
    rows = 200_000
    writes, filled, took = await migrate_filled(empty_database_url, tmp_path, rows)
    report(rows, writes, filled, took)
    await check_migrated(empty_database_url, rows, writes)
    assert len(writes.stalls) >= 3, "the writer went on while the migration ran"

    # The worker on the migrated table: an event lands in the old table's partition; its redelivery is a no-op.
    db = await asyncpg.connect(empty_database_url)
    pool = await Database.open(empty_database_url, role="cost_worker_writer")
    try:
        org = await make_org(db)
        feeder = Feeder(Pipeline(pool, settings, budgets=BudgetEngine(settings)), settings)  # topics only
        event = api_event(org)
        topic = settings.topic_api_usage
        assert (await feeder.events(event)).messages[(topic, "inserted")] == 1
        assert (await feeder.events(event)).messages[(topic, "duplicate")] == 1
        part = await db.fetchval(
            "SELECT tableoid::regclass::text FROM api_usage WHERE event_id = $1", event["event_id"]
        )
        assert part == "api_usage_legacy"
    finally:
        await pool.close()
        await db.close()


@pytest.mark.slow
async def test_the_migration_of_millions_of_rows_holds_its_exclusive_lock_briefly(
    empty_database_url: str, tmp_path: Path
) -> None:
    rows = 3_000_000
    writes, filled, took = await migrate_filled(empty_database_url, tmp_path, rows)
    worst = report(rows, writes, filled, took)
    await check_migrated(empty_database_url, rows, writes)
    # The index build and the validation are most of the time, and the writer was not held up by them.
    assert worst < took / 4, (worst, took)
