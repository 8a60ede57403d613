"""Migrations: apply on PostgreSQL 15 and 18, re-run is a no-op, edits and newer databases are refused."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import create_database, drop_database, system_server_url
from worker.errors import MigrationError, SchemaMismatch
from worker.migrate import check_current, load_migrations, migrate, schema_dir

EXPECTED_TABLES = {
    "organizations",
    "users",
    "projects",
    "cost_data",
    "api_usage",
    "project_metrics",
    "user_metrics",
    "model_prices",
    "ai_organization_budgets",
    "ai_project_budgets",
    "ai_budgets",
    "budget_alerts",
    "consumer_offsets",
    "quarantine",
    "outbox",
    "schema_migrations",
}


@pytest.fixture(params=["embedded", "system"])
async def fresh_url(request: pytest.FixtureRequest, pg_server_url: str) -> AsyncIterator[str]:
    """An empty database on each server: the embedded one and the machine's own (PostgreSQL 15)."""
    server = pg_server_url if request.param == "embedded" else system_server_url()
    if server is None:
        pytest.skip("COST_WORKER_TEST_SYSTEM_DATABASE_URL is not set (no system PostgreSQL here)")
    name = f"cw_mig_{uuid.uuid4().hex[:12]}"
    url = await create_database(server, name)
    yield url
    await drop_database(server, name)


async def tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await conn.close()


async def test_applies_every_migration_then_rerun_is_a_noop(fresh_url: str) -> None:
    first = await migrate(fresh_url)
    assert first.applied == [m.label for m in load_migrations()]
    assert first.as_owner
    assert await tables(fresh_url) >= EXPECTED_TABLES

    conn = await asyncpg.connect(fresh_url)
    try:
        before = await conn.fetch("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version")
        owners = await conn.fetch("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    assert {row["tableowner"] for row in owners} == {"cost_worker_owner"}

    second = await migrate(fresh_url)
    assert second.applied == []
    assert second.already_applied == len(first.applied)
    conn = await asyncpg.connect(fresh_url)
    try:
        after = await conn.fetch("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY version")
        server_version = await conn.fetchval("SHOW server_version_num")
    finally:
        await conn.close()
    assert before == after
    assert int(server_version) >= 150000


async def test_two_racing_migrates_apply_once(fresh_url: str) -> None:
    results = await asyncio.gather(migrate(fresh_url), migrate(fresh_url))
    applied = sorted(len(r.applied) for r in results)
    assert applied == [0, len(load_migrations())]
    conn = await asyncpg.connect(fresh_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(load_migrations())
    finally:
        await conn.close()


def copy_schema(tmp_path: Path) -> Path:
    target = tmp_path / "schema"
    shutil.copytree(schema_dir(), target)
    return target


async def test_an_edited_applied_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    schema = copy_schema(tmp_path)
    await migrate(empty_database_url, directory=schema)
    edited = schema / "migrations" / "0002_ledger.sql"
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")
    with pytest.raises(MigrationError, match=r"0002_ledger was edited after it was applied"):
        await migrate(empty_database_url, directory=schema)


async def test_a_database_newer_than_the_code_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    schema = copy_schema(tmp_path)
    newer = schema / "migrations" / "9999_from_the_future.sql"
    newer.write_text("CREATE TABLE from_the_future (id int);\n")
    await migrate(empty_database_url, directory=schema)
    newer.unlink()
    with pytest.raises(SchemaMismatch, match=r"9999_from_the_future.*newer than the code"):
        await migrate(empty_database_url, directory=schema)
    conn = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(SchemaMismatch):
            await check_current(conn, directory=schema)
    finally:
        await conn.close()


async def test_a_failing_migration_rolls_back_alone(empty_database_url: str, tmp_path: Path) -> None:
    schema = copy_schema(tmp_path)
    (schema / "migrations" / "0100_broken.sql").write_text("CREATE TABLE half_done (id int);\nSELECT 1/0;\n")
    with pytest.raises(MigrationError, match="0100_broken failed and was rolled back"):
        await migrate(empty_database_url, directory=schema)
    assert "half_done" not in await tables(empty_database_url)
    assert "cost_data" in await tables(empty_database_url)


async def test_run_refuses_a_database_that_is_behind(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(SchemaMismatch, match="run `cost-worker migrate`"):
            await check_current(conn)
    finally:
        await conn.close()


def test_migration_files_are_well_formed() -> None:
    migrations = load_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(versions)
    assert versions[0] == 1
    for migration in migrations:
        assert "BEGIN;" not in migration.sql.upper(), "the runner owns the transaction"
