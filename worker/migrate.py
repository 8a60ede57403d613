"""Forward-only schema migrations from ``schema/migrations/NNNN_name.sql``.

``migrate`` takes an advisory lock (two replicas racing is safe: the second waits, then finds nothing to
do), applies the cluster roles script, then each pending file in its own transaction as the owner role,
recording its checksum and its compatibility. It refuses a file that was edited after it was applied. A file may
open with online steps (``-- migrate:online``), each run on its own outside a transaction first: work that must not
hold a lock for long on a large table (CREATE INDEX CONCURRENTLY, VALIDATE CONSTRAINT). A generated online step
(``-- migrate:online-each``) is a query whose rows are such statements, one per partition for instance.

The compatibility window (README "The database"): ``schema/migrations/compat.toml`` declares each migration
``expand`` (code one release older still runs on the schema with it applied) or ``contract`` (it does not).
The declaration is recorded next to the checksum, because the older code that has to judge it cannot know
the newer manifest. ``run`` (and ``migrate``, which then has nothing to do) accepts a database that is ahead
of the code by expand migrations only, and names the migration that blocks it otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Literal, cast

import asyncpg

from worker import store
from worker.errors import MigrationError, SchemaMismatch

SCHEMA_DIR_ENV = "COST_WORKER_SCHEMA_DIR"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
COMPAT_FILE = "compat.toml"  # in the migrations directory: [compat] NNNN_name = "expand" | "contract"
Compat = Literal["expand", "contract"]
COMPAT_VALUES: tuple[Compat, ...] = ("expand", "contract")
UNDECLARED: Compat = "contract"  # a migration without a declaration is recorded as breaking (the safe side)
# A file may start with online steps: each `-- migrate:online` line opens one statement that runs on its own,
# outside any transaction (CREATE INDEX CONCURRENTLY, VALIDATE CONSTRAINT), before the file's transaction, which
# starts at the `-- migrate:transaction` line. Steps must be idempotent: a failed run repeats them.
ONLINE_STEP = "-- migrate:online"
# A generated online step: a query returning one text column; each row is a statement run on its own, outside any
# transaction, in order (one CREATE INDEX CONCURRENTLY per partition of a partitioned table, say).
ONLINE_EACH_STEP = "-- migrate:online-each"
TRANSACTION_PART = "-- migrate:transaction"
LOCK_POLL_INTERVAL = 0.2  # seconds between attempts to take the migration lock another migrate holds


@dataclass(frozen=True)
class OnlineStep:
    sql: str
    generated: bool = False  # True: ``sql`` is a query whose rows are the statements to run


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    compat: Compat | None = None  # None: not declared in compat.toml (recorded as UNDECLARED)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def online_steps(self) -> list[OnlineStep]:
        """The statements (or statement-generating queries) to run one by one outside a transaction first (none
        for most files)."""
        lines = self.sql.splitlines()
        if TRANSACTION_PART not in lines:
            return []
        steps: list[tuple[bool, list[str]]] = []
        for line in lines[: lines.index(TRANSACTION_PART)]:
            if line in (ONLINE_STEP, ONLINE_EACH_STEP):
                steps.append((line == ONLINE_EACH_STEP, []))
            elif steps:
                steps[-1][1].append(line)
        found = [OnlineStep("\n".join(body).strip(), generated) for generated, body in steps]
        return [step for step in found if step.sql]

    @property
    def transactional_sql(self) -> str:
        """What runs in the file's one transaction: all of it, or what follows ``-- migrate:transaction``."""
        lines = self.sql.splitlines()
        if TRANSACTION_PART not in lines:
            return self.sql
        return "\n".join(lines[lines.index(TRANSACTION_PART) + 1 :])


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    already_applied: int = 0
    as_owner: bool = True
    ahead: list[str] = field(default_factory=list)  # applied expand migrations newer than this code


@dataclass(frozen=True)
class Plan:
    pending: list[Migration]  # known to this code, not applied yet
    ahead: list[store.AppliedMigration]  # applied, newer than this code, all expand


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
    declared = load_compat(directory)
    migrations: list[Migration] = []
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_name.sql")
        sql = path.read_text(encoding="utf-8")
        migrations.append(Migration(int(match[1]), match[2], sql, declared.get(path.stem)))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return migrations


def load_compat(migrations_dir: Path) -> dict[str, Compat]:
    """The declarations of compat.toml (file stem -> expand/contract); none when the file is absent."""
    path = migrations_dir / COMPAT_FILE
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("compat", {})
    except tomllib.TOMLDecodeError as exc:
        raise MigrationError(f"{path.name}: not valid TOML: {exc}") from exc
    if not isinstance(table, dict):
        raise MigrationError(f'{path.name}: [compat] must be a table of NNNN_name = "expand" | "contract"')
    bad = [f"{key} = {value!r}" for key, value in table.items() if value not in COMPAT_VALUES]
    if bad:
        raise MigrationError(f'{path.name}: each migration is "expand" or "contract", not {", ".join(bad)}')
    return cast(dict[str, Compat], table)


def roles_script(directory: Path | None = None) -> str:
    return ((directory or schema_dir()) / "roles.sql").read_text(encoding="utf-8")


def plan(migrations: list[Migration], applied: list[store.AppliedMigration]) -> Plan:
    """What to apply, and what the database has beyond this code; raises if this code must not touch it.

    Refused: a file edited after it was applied; a database that ran a migration this code does not know
    unless every such migration is newer than the code and recorded ``expand``; a database both ahead and
    behind (histories that diverged).
    """
    known = {m.version: m for m in migrations}
    newest = max(known, default=0)
    ahead: list[store.AppliedMigration] = []
    for row in applied:
        migration = known.get(row.version)
        if migration is None:
            label = f"{row.version:04d}_{row.name}"
            if row.version < newest:
                raise SchemaMismatch(
                    f"the database has migration {label}, which this code does not know although it knows "
                    f"newer ones (up to {newest:04d}): the histories diverged; refusing to continue."
                )
            if row.compat != "expand":
                why = f"recorded as {row.compat}" if row.compat else "recorded without a compatibility declaration"
                raise SchemaMismatch(
                    f"the database has migration {label}, which this code does not know (its newest is "
                    f"{newest:04d}): the database is newer than the code, and {label} is {why}, so code this "
                    "old cannot run on it; refusing to continue. Deploy the newer worker, or restore a matching "
                    "database."
                )
            ahead.append(row)
            continue
        if migration.checksum != row.checksum:
            raise MigrationError(
                f"migration {migration.label} was edited after it was applied (checksum "
                f"{row.checksum[:12]} in the database, {migration.checksum[:12]} on disk). Applied migrations "
                "are immutable: restore the file and put the change in a new migration."
            )
    done = {row.version for row in applied}
    pending = [m for m in migrations if m.version not in done]
    if pending and ahead:
        raise SchemaMismatch(
            f"the database is ahead of this code ({ahead[0].version:04d}_{ahead[0].name}) but lacks "
            f"{pending[0].label}, which this code has: the histories diverged; refusing to continue."
        )
    return Plan(pending, ahead)


async def migrate(dsn: str, *, directory: Path | None = None) -> MigrationReport:
    migrations = load_migrations(directory)
    conn = await store.connect(dsn)
    try:
        # Polled, not waited for in a statement: a waiting statement is an open transaction, which the other
        # migrate's online steps (CREATE INDEX CONCURRENTLY) would wait for in turn.
        while not await store.migration_try_lock(conn):  # noqa: ASYNC110 - the lock is in PostgreSQL, not here
            await asyncio.sleep(LOCK_POLL_INTERVAL)
        try:
            return await _migrate_locked(conn, migrations, directory)
        finally:
            await store.migration_unlock(conn)
    finally:
        await conn.close()


async def _migrate_locked(
    conn: asyncpg.Connection, migrations: list[Migration], directory: Path | None
) -> MigrationReport:
    report = MigrationReport()
    # Check before touching anything: a database from the future is refused as it is (unless it is ahead by
    # expand migrations only: then there is nothing to do, and the older roles script is not run either).
    first = plan(migrations, await store.applied_migrations(conn, create=False))
    if first.ahead:
        report.ahead = [f"{row.version:04d}_{row.name}" for row in first.ahead]
        report.already_applied = len(migrations)
        return report
    try:
        await store.run_script(conn, roles_script(directory))
    except Exception as exc:
        raise MigrationError(
            f"could not set up the roles cost_worker_owner/writer/reader ({exc}). Run migrate as a role with "
            "CREATEROLE once, or have a DBA create the three roles (see schema/roles.sql)."
        ) from exc
    report.as_owner = await store.become_owner(conn)
    applied = await store.applied_migrations(conn, create=True)
    pending = plan(migrations, applied).pending
    report.already_applied = len(applied)
    for migration in pending:
        for number, step in enumerate(migration.online_steps, start=1):
            try:
                statements = await store.generated_statements(conn, step.sql) if step.generated else [step.sql]
                for statement in statements:
                    await store.run_script(conn, statement)
            except Exception as exc:
                raise MigrationError(
                    f"migration {migration.label}: online step {number} failed ({exc}); nothing of its "
                    "transaction was applied, run migrate again"
                ) from exc
        try:
            await store.apply_migration(
                conn,
                migration.version,
                migration.name,
                migration.transactional_sql,
                migration.checksum,
                compat=migration.compat or UNDECLARED,
            )
        except Exception as exc:
            raise MigrationError(f"migration {migration.label} failed and was rolled back: {exc}") from exc
        report.applied.append(migration.label)
    return report


async def check_current(conn: asyncpg.Connection, *, directory: Path | None = None) -> list[str]:
    """Refuse to run the worker against a database that is behind this code, or ahead of it by anything but
    expand migrations. Returns the expand migrations the database is ahead by (empty when it matches)."""
    migrations = load_migrations(directory)
    applied = await store.applied_migrations(conn, create=False)
    found = plan(migrations, applied)
    pending = found.pending
    if pending:
        raise SchemaMismatch(
            f"the database is missing {len(pending)} migration(s) (first: {pending[0].label}); "
            "run `cost-worker migrate`"
        )
    return [f"{row.version:04d}_{row.name}" for row in found.ahead]
