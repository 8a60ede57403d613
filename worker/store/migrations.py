"""The migration runner's statements (``worker.migrate`` decides; these run them)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from worker.sql import query
from worker.store.errors import translated


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str
    compat: str | None = None  # expand, contract, or None (applied before compatibility was recorded)


@translated
async def migration_lock(conn: asyncpg.Connection) -> None:
    await conn.execute(query("migration_lock"))


@translated
async def migration_try_lock(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(query("migration_try_lock")))


@translated
async def migration_unlock(conn: asyncpg.Connection) -> None:
    await conn.execute(query("migration_unlock"))


@translated
async def run_script(conn: asyncpg.Connection, sql: str) -> None:
    """Run a whole SQL file (several statements) with the simple query protocol."""
    await conn.execute(sql)


@translated
async def generated_statements(conn: asyncpg.Connection, sql: str) -> list[str]:
    """The statements a generated online step's query returns (its first column, in order)."""
    return [str(row[0]) for row in await conn.fetch(sql)]


@translated
async def applied_migrations(conn: asyncpg.Connection, *, create: bool) -> list[AppliedMigration]:
    if create:
        await conn.execute(query("migration_table_create"))
        await conn.execute(query("migration_table_add_compat"))
        await conn.execute(query("migration_table_grant"))
    elif not await conn.fetchval(query("migration_table_exists")):
        return []
    rows = await conn.fetch(query("migrations_applied"))
    return [AppliedMigration(row["version"], row["name"], row["checksum"], row["compat"]) for row in rows]


@translated
async def become_owner(conn: asyncpg.Connection) -> bool:
    """Act as the owner role for the rest of the session, when this login may. Returns whether it did."""
    if not await conn.fetchval(query("migration_can_become_owner")):
        return False
    await conn.execute(query("migration_become_owner"))
    return True


@translated
async def apply_migration(
    conn: asyncpg.Connection, version: int, name: str, sql: str, checksum: str, *, compat: str
) -> None:
    """Apply one migration file and record it (with its compatibility), in one transaction."""
    async with conn.transaction():
        await conn.execute(sql)
        await conn.execute(query("migration_record"), version, name, checksum, compat)
