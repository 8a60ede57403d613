"""Forward-only schema migrations from ``schema/migrations/NNNN_name.sql``.

``migrate`` takes an advisory lock (two replicas racing is safe: the second waits, then finds nothing to
do), applies the cluster roles script, then each pending file in its own transaction as the owner role,
recording its checksum. It refuses a database that ran a file this code does not have (newer than the
code) and a file that was edited after it was applied.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import asyncpg

from worker import store
from worker.errors import MigrationError, SchemaMismatch

SCHEMA_DIR_ENV = "COST_WORKER_SCHEMA_DIR"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    already_applied: int = 0
    as_owner: bool = True


def schema_dir() -> Path:
    """Where the SQL lives: an override, the copy inside an installed wheel, or the source tree."""
    override = os.environ.get(SCHEMA_DIR_ENV)
    if override:
        return Path(override)
    bundled = Path(str(files("worker"))) / "_schema"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parent.parent / "schema"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = (directory or schema_dir()) / "migrations"
    if not directory.is_dir():
        raise MigrationError(f"no migrations directory at {directory}")
    migrations: list[Migration] = []
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_name.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return migrations


def roles_script(directory: Path | None = None) -> str:
    return ((directory or schema_dir()) / "roles.sql").read_text(encoding="utf-8")


def plan(migrations: list[Migration], applied: list[store.AppliedMigration]) -> list[Migration]:
    """The migrations still to apply; raises if the database is newer than the code or a file was edited."""
    known = {m.version: m for m in migrations}
    for row in applied:
        migration = known.get(row.version)
        if migration is None:
            newest = max(known, default=0)
            raise SchemaMismatch(
                f"the database has migration {row.version:04d}_{row.name}, which this code does not know "
                f"(its newest is {newest:04d}): the database is newer than the code; refusing to continue. "
                "Deploy the newer worker, or restore a matching database."
            )
        if migration.checksum != row.checksum:
            raise MigrationError(
                f"migration {migration.label} was edited after it was applied (checksum "
                f"{row.checksum[:12]} in the database, {migration.checksum[:12]} on disk). Applied migrations "
                "are immutable: restore the file and put the change in a new migration."
            )
    done = {row.version for row in applied}
    return [m for m in migrations if m.version not in done]


async def migrate(dsn: str, *, directory: Path | None = None) -> MigrationReport:
    migrations = load_migrations(directory)
    conn = await store.connect(dsn)
    try:
        await store.migration_lock(conn)
        try:
            return await _migrate_locked(conn, migrations, directory)
        finally:
            await store.migration_unlock(conn)
    except asyncpg.PostgresError as exc:  # pragma: no cover - store translates; belt and braces
        raise MigrationError(str(exc)) from exc
    finally:
        await conn.close()


async def _migrate_locked(
    conn: asyncpg.Connection, migrations: list[Migration], directory: Path | None
) -> MigrationReport:
    report = MigrationReport()
    # Check before touching anything: a database from the future is refused as it is.
    pending = plan(migrations, await store.applied_migrations(conn, create=False))
    try:
        await store.run_script(conn, roles_script(directory))
    except Exception as exc:
        raise MigrationError(
            f"could not set up the roles cost_worker_owner/writer/reader ({exc}). Run migrate as a role with "
            "CREATEROLE once, or have a DBA create the three roles (see schema/roles.sql)."
        ) from exc
    report.as_owner = await store.become_owner(conn)
    applied = await store.applied_migrations(conn, create=True)
    pending = plan(migrations, applied)
    report.already_applied = len(applied)
    for migration in pending:
        try:
            await store.apply_migration(conn, migration.version, migration.name, migration.sql, migration.checksum)
        except Exception as exc:
            raise MigrationError(f"migration {migration.label} failed and was rolled back: {exc}") from exc
        report.applied.append(migration.label)
    return report


async def check_current(conn: asyncpg.Connection, *, directory: Path | None = None) -> None:
    """Refuse to run the worker against a database that is behind or ahead of this code."""
    migrations = load_migrations(directory)
    applied = await store.applied_migrations(conn, create=False)
    pending = plan(migrations, applied)
    if pending:
        raise SchemaMismatch(
            f"the database is missing {len(pending)} migration(s) (first: {pending[0].label}); "
            "run `cost-worker migrate`"
        )
