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
from tests.factories import api_event, dumps, make_org
from tests.kafka_helpers import create_topics, produce, run_worker, run_worker_until
from worker.config import Settings
from worker.errors import MigrationError, SchemaMismatch
from worker.migrate import (
    COMPAT_FILE,
    SCHEMA_DIR_ENV,
    check_current,
    load_compat,
    load_migrations,
    migrate,
    schema_dir,
)

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


# --- the compatibility window: code one release older runs on a schema ahead by expand migrations ----------


def test_every_migration_declares_expand_or_contract() -> None:
    """A new migration needs its line in schema/migrations/compat.toml (README "The database")."""
    migrations = load_migrations()
    manifest = schema_dir() / "migrations" / COMPAT_FILE
    undeclared = [m.label for m in migrations if m.compat is None]
    assert not undeclared, (
        f"{manifest.relative_to(schema_dir().parent)} has no declaration for {', '.join(undeclared)}: add "
        + ", ".join(f'`{label} = "expand"` or `"contract"`' for label in undeclared)
        + ' under [compat] (expand: the previous release still runs with it applied; README "The database")'
    )
    stale = set(load_compat(manifest.parent)) - {m.label for m in migrations}
    assert not stale, f"{COMPAT_FILE} declares migrations that do not exist: {sorted(stale)}"


def test_a_broken_manifest_is_a_clear_error(tmp_path: Path) -> None:
    schema = copy_schema(tmp_path)
    (schema / "migrations" / COMPAT_FILE).write_text('[compat]\n0001_platform = "maybe"\n')
    with pytest.raises(MigrationError, match=r"compat.toml: each migration is \"expand\" or \"contract\""):
        load_migrations(schema)


def release(tmp_path: Path, name: str, migrations: dict[str, tuple[str, str]]) -> Path:
    """A copy of today's schema plus the given migrations (file stem -> (sql, compat)): a newer release."""
    schema = copy_schema(tmp_path / name)
    manifest = schema / "migrations" / COMPAT_FILE
    for stem, (sql, compat) in migrations.items():
        (schema / "migrations" / f"{stem}.sql").write_text(sql)
        manifest.write_text(manifest.read_text() + f'{stem} = "{compat}"\n')
    return schema


EXPAND = (
    "ALTER TABLE api_usage ADD COLUMN client_region text;\nCREATE TABLE release_next_notes (id bigint PRIMARY KEY);\n",
    "expand",
)
CONTRACT = ("ALTER TABLE api_usage DROP COLUMN client_region;\n", "contract")


async def test_the_previous_release_runs_on_a_schema_ahead_by_expand_migrations(
    database_url: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Release N (today's migrations) against the database after release N+1's migration Job."""
    older = copy_schema(tmp_path / "release_n")
    newer = release(tmp_path, "release_n1", {"0100_client_region": EXPAND})
    assert (await migrate(database_url, directory=newer)).applied == ["0100_client_region"]

    conn = await asyncpg.connect(database_url)
    try:
        assert await check_current(conn, directory=older) == ["0100_client_region"]
        recorded = await conn.fetchval("SELECT compat FROM schema_migrations WHERE version = 100")
        assert recorded == "expand"
    finally:
        await conn.close()
    # Release N's migration Job again (an Argo CD rollback runs the PreSync hook): nothing to do, no error.
    again = await migrate(database_url, directory=older)
    assert (again.applied, again.ahead) == ([], ["0100_client_region"])

    # Release N's worker (`run` reads the schema from COST_WORKER_SCHEMA_DIR) starts and writes a batch.
    monkeypatch.setenv(SCHEMA_DIR_ENV, str(older))
    await create_topics(settings)
    conn = await asyncpg.connect(database_url)
    try:
        org = await make_org(conn)
        await produce(settings, settings.topic_api_usage, [dumps(api_event(org)) for _ in range(7)])

        async def landed() -> bool:
            count = await conn.fetchval("SELECT count(*) FROM api_usage WHERE organization_id = $1", org.id)
            return bool(count == 7)

        assert await run_worker_until(settings, landed) == 0
    finally:
        await conn.close()


async def test_a_contract_migration_ahead_stops_the_previous_release_and_is_named(
    database_url: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    older = release(tmp_path, "release_n", {"0100_client_region": EXPAND})
    newer = release(tmp_path, "release_n1", {"0100_client_region": EXPAND, "0101_drop_client_region": CONTRACT})
    await migrate(database_url, directory=newer)
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(SchemaMismatch, match=r"0101_drop_client_region .*recorded as contract"):
            await check_current(conn, directory=older)
    finally:
        await conn.close()
    with pytest.raises(SchemaMismatch, match=r"0101_drop_client_region"):
        await migrate(database_url, directory=older)
    monkeypatch.setenv(SCHEMA_DIR_ENV, str(older))
    with pytest.raises(SchemaMismatch, match=r"0101_drop_client_region"):
        await run_worker(settings)
    # Two releases back: 0100 is expand, but 0101 still blocks (the window is what is recorded, not a count).
    oldest = copy_schema(tmp_path / "release_n_minus_1")
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(SchemaMismatch, match=r"0101_drop_client_region"):
            await check_current(conn, directory=oldest)
    finally:
        await conn.close()


async def test_an_undeclared_migration_counts_as_contract(empty_database_url: str, tmp_path: Path) -> None:
    older = copy_schema(tmp_path / "release_n")
    newer = copy_schema(tmp_path / "release_n1")
    (newer / "migrations" / "0100_undeclared.sql").write_text("CREATE TABLE undeclared (id int);\n")
    await migrate(empty_database_url, directory=newer)
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT compat FROM schema_migrations WHERE version = 100") == "contract"
        with pytest.raises(SchemaMismatch, match=r"0100_undeclared .*recorded as contract"):
            await check_current(conn, directory=older)
    finally:
        await conn.close()


async def test_a_database_that_predates_the_compat_column_is_read_and_upgraded(
    empty_database_url: str, tmp_path: Path
) -> None:
    await migrate(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("ALTER TABLE schema_migrations DROP COLUMN compat")
        assert await check_current(conn) == []
    finally:
        await conn.close()
    newer = release(tmp_path, "next", {"0100_client_region": EXPAND})
    assert (await migrate(empty_database_url, directory=newer)).applied == ["0100_client_region"]
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await check_current(conn, directory=schema_dir()) == ["0100_client_region"]
    finally:
        await conn.close()
