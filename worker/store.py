"""The one module that executes SQL. Statements come from ``worker/sql/queries.sql``.

Driver errors are translated here, at the boundary: transient ones become ``DatabaseUnavailable`` (the
caller retries the batch), data the database refuses becomes ``DataRejected``, anything else is a bug or a
misconfiguration and becomes ``FatalError``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

import asyncpg

from worker.alerts import Alert
from worker.decode import ApiEvent
from worker.errors import DatabaseUnavailable, DataRejected, FatalError
from worker.pricing import Price
from worker.quarantine import Quarantined
from worker.rows import (
    BudgetPeriod,
    LedgerRow,
    ProjectLink,
    Rate,
    Retired,
    UsageRows,
    UsageStored,
    WindowKey,
    WindowRevision,
    WindowStates,
)
from worker.sql import query
from worker.touches import Touch

P = ParamSpec("P")
T = TypeVar("T")

APPLICATION_NAME = "cost-worker"
# SQLSTATE classes worth retrying: connection exception, transaction rollback (serialization failure,
# deadlock), insufficient resources, operator intervention (admin shutdown, statement timeout), system error.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
TRANSIENT_SQLSTATES = frozenset({"55P03"})  # lock_not_available
DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})  # data exception, integrity constraint violation
CLIENT_TIMEOUT_MARGIN = 5.0  # seconds the client waits beyond the server's statement_timeout


def translate(exc: BaseException) -> Exception:
    """Map a driver exception to the worker's error families (the caller raises it ``from exc``)."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        if sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES:
            return DatabaseUnavailable(f"database: {type(exc).__name__}: {exc}")
        if sqlstate[:2] in DATA_SQLSTATE_CLASSES:
            return DataRejected(f"database rejected data: {type(exc).__name__} ({sqlstate}): {exc}")
        return FatalError(f"database error {type(exc).__name__} ({sqlstate}): {exc}")
    if isinstance(exc, asyncpg.ClientConfigurationError) or (
        isinstance(exc, FileNotFoundError) and _raised_reading_settings(exc)
    ):
        # Not an outage: a setting names what does not exist (a CA file for sslmode=verify-full, ...).
        return FatalError(f"database connection settings: {exc}")
    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return DatabaseUnavailable(f"database unreachable: {type(exc).__name__}: {exc}")
    if isinstance(exc, Exception):
        return exc
    raise exc


# The asyncpg function that reads the connection settings' files (sslrootcert, sslcert, passfile). A missing
# file raised there is a configuration error; the same FileNotFoundError raised while connecting means the
# server's unix socket is gone (PostgreSQL stopped or restarting): an outage, retried like any other.
_SETTINGS_READER = "_parse_connect_dsn_and_args"


def _raised_reading_settings(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == _SETTINGS_READER:
            return True
        tb = tb.tb_next
    return False


def translated(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorator: driver errors raised by ``fn`` come out translated."""

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise translate(exc) from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def server_settings(*, role: str | None, statement_timeout: float | None) -> dict[str, str]:
    settings = {"application_name": APPLICATION_NAME}
    if role:
        # A startup parameter, so it is the session default and survives the pool's RESET ALL.
        settings["role"] = role
    if statement_timeout:
        settings["statement_timeout"] = str(int(statement_timeout * 1000))
    return settings


@translated
async def recreate_database(admin_url: str, name: str) -> None:
    """Drop (forcing out connections) and create a database: the dev stack's fresh start."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@translated
async def connect(
    dsn: str, *, role: str | None = None, statement_timeout: float | None = None, timeout: float = 10.0
) -> asyncpg.Connection:
    """One connection, outside any pool (migrations, CLI commands)."""
    return await asyncpg.connect(
        dsn, timeout=timeout, server_settings=server_settings(role=role, statement_timeout=statement_timeout)
    )


class Database:
    """A connection pool and the statements the worker runs through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    @translated
    async def open(
        cls,
        dsn: str,
        *,
        role: str | None = None,
        min_size: int = 1,
        max_size: int = 4,
        statement_timeout: float | None = None,
        connect_timeout: float = 10.0,
    ) -> Database:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout,
            # Client-side bound too: a frozen server (SIGSTOP, a black-holed network) never answers at all.
            command_timeout=(statement_timeout + CLIENT_TIMEOUT_MARGIN) if statement_timeout else None,
            server_settings=server_settings(role=role, statement_timeout=statement_timeout),
        )
        return cls(pool)

    async def close(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.pool.terminate()

    @translated
    async def ping(self) -> None:
        async with self.pool.acquire(timeout=5.0) as conn:
            await conn.fetchval("SELECT 1", timeout=5.0)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One transaction: committed when the block ends normally, rolled back when it raises."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                yield Tx(conn)
        except DRIVER_ERRORS as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled (shutdown past its grace) and then the ROLLBACK failed too: stay cancelled. A
                # transient error here would be retried, and the cancellation would be lost.
                raise asyncio.CancelledError from exc
            raise translate(exc) from exc

    @translated
    async def load_offsets(self, group_id: str, partitions: list[tuple[str, int]]) -> list[StoredOffset]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                query("offsets_load"), group_id, [p[0] for p in partitions], [p[1] for p in partitions]
            )
        return [StoredOffset(row["topic"], row["partition"], row["next_offset"]) for row in rows]

    @translated
    async def budget_sweep_organizations(self) -> list[UUID]:
        async with self.pool.acquire() as conn:
            return [row["organization_id"] for row in await conn.fetch(query("budget_sweep_organizations"))]

    @asynccontextmanager
    async def sweep_lock(self) -> AsyncIterator[bool]:
        """Hold the cluster-wide sweep lock for the block, if no other replica holds it (yields False then)."""
        try:
            async with self.pool.acquire() as conn:
                mine = bool(await conn.fetchval(query("sweep_try_lock")))
                try:
                    yield mine
                finally:
                    if mine:
                        await conn.fetchval(query("sweep_unlock"))
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    @translated
    async def outbox_stats(self) -> tuple[int, float]:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(query("outbox_stats"))
        assert row is not None
        return int(row["backlog"]), float(row["oldest_age"])

    @translated
    async def quarantine_list(self, reason: str | None, status: str | None, limit: int) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(query("quarantine_list"), reason, status, limit)

    @translated
    async def exchange_rate_pairs(self, base: str | None, quote: str | None) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(query("exchange_rate_pairs"), base, quote)


# ============================================================================================ migrations


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


# ============================================================================================ batches

DRIVER_ERRORS = (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class Spend:
    """A budget's spend in its period, in its currency (``cost_worker_spend``). ``amount`` is None when the
    budget is unconvertible: rows need a rate that ``exchange_rates`` lacks (``missing_rates``:
    {row currency: {"rows": n, "first": day, "last": day}}). ``converted``: {row currency: rows converted}."""

    amount: Decimal | None
    converted: dict[str, int]
    missing_rates: dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class StoredOffset:
    topic: str
    partition: int
    next_offset: int


class Tx:
    """Statements that run inside one transaction (``Database.transaction``)."""

    def __init__(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        self.conn = conn

    async def advance_offsets(self, group_id: str, moves: list[tuple[str, int, int | None, int]]) -> bool:
        """Compare-and-set (topic, partition, expected, next). False when any partition did not move."""
        moves = sorted(moves)
        moved = await self.conn.fetchval(
            query("offsets_advance"),
            group_id,
            [m[0] for m in moves],
            [m[1] for m in moves],
            [m[2] for m in moves],
            [m[3] for m in moves],
        )
        return int(moved) == len(moves)

    async def set_tenants(self, organization_ids: set[UUID]) -> None:
        await self.conn.execute(query("set_tenants"), ",".join(sorted(str(o) for o in organization_ids)))

    async def api_usage_admit(self, months: list[date]) -> date | None:
        """Partitions for these UTC months (made if missing); the first month retention keeps (None: all)."""
        kept_from: date | None = await self.conn.fetchval(query("api_usage_admit"), months)
        return kept_from

    async def lookup_event_references(
        self, organizations: set[UUID], projects: set[UUID], users: set[UUID]
    ) -> dict[tuple[str, int], UUID]:
        """{(kind, id.int): organization} of the organizations, projects and users that exist."""
        rows = await self.conn.fetch(query("lookup_event_references"), list(organizations), list(projects), list(users))
        return {(row["kind"], row["id"].int): row["organization_id"] for row in rows}

    async def lookup_provider_projects(
        self, provider_orgs: set[tuple[str, str]], legacy_ids: set[str]
    ) -> list[ProjectLink]:
        pairs = sorted(provider_orgs)
        rows = await self.conn.fetch(
            query("lookup_provider_projects"), [p[0] for p in pairs], [p[1] for p in pairs], sorted(legacy_ids)
        )
        return [
            ProjectLink(
                row["organization_id"],
                row["id"],
                row["ai_provider"],
                row["ai_organization_id"],
                row["ai_project_id"],
                row["openai_project_id"],
            )
            for row in rows
        ]

    async def lookup_prices(self, keys: set[tuple[str, str]]) -> list[Price]:
        pairs = sorted(keys)
        rows = await self.conn.fetch(query("lookup_prices"), [p[0] for p in pairs], [p[1] for p in pairs])
        return [
            Price(
                r["provider"],
                r["model"],
                r["token_type"],
                r["price_per_million"],
                r["currency"],
                r["effective_from"],
                r["id"],
            )
            for r in rows
        ]

    async def upsert_cost_windows(self, revisions: Sequence[WindowRevision]) -> WindowStates:
        """Advance each window to its revision; per window 'advanced', 'same' or 'stale'."""
        rows = await self.conn.fetch(
            query("upsert_cost_windows"),
            *_window_columns(revisions),
            ["{" + ",".join(sorted(str(o) for o in r.organization_ids)) + "}" for r in revisions],
        )
        return WindowStates(
            {revisions[row["ord"] - 1].window: row["state"] for row in rows},
            {o.int: o for row in rows for o in row["organization_ids"]},
        )

    async def upsert_cost_data(self, rows: Sequence[LedgerRow]) -> list[tuple[str | None, datetime | None]]:
        """Per row, in order: what was written ('inserted', 'updated' or None) and the revision kept."""
        records = await self.conn.fetch(
            query("upsert_cost_data"), *([column(r) for r in rows] for column in _LEDGER_COLUMNS)
        )
        by_ord = {record["ord"]: (record["result"], record["kept_revision"]) for record in records}
        return [by_ord[i] for i in range(1, len(rows) + 1)]

    async def retire_cost_data(self, revisions: Sequence[WindowRevision]) -> list[Retired]:
        """Supersede the stored lines of older revisions of these windows; returns the lines retired."""
        records = await self.conn.fetch(query("retire_cost_data"), *_window_columns(revisions))
        return [
            Retired(
                r["organization_id"],
                r["project_id"],
                r["api_version"],
                WindowKey(
                    r["provider"], r["ai_organization_id"], r["report"], r["bucket_start_time"], r["bucket_end_time"]
                ),
            )
            for r in records
        ]

    async def insert_api_usage(self, rows: UsageRows) -> UsageStored:
        """Insert events (a redelivery is a no-op) with their hourly rollups."""
        fields = dict(zip(ApiEvent._fields, zip(*rows.events, strict=True), strict=True))  # one C-level transpose
        columns = [fields.get(name, ()) for name in UsageRows.EVENT_FIELDS]
        inserted = 0
        touched = []
        conflicts = []
        records = await self.conn.fetch(
            query("insert_api_usage"), *columns, rows.providers, rows.estimates, rows.estimate_sources
        )
        for row in records:
            if row["kind"] == "conflict":
                conflicts.append((row["organization_id"], row["event_id"]))
            else:
                inserted += row["requests"]
                touched.append(Touch(row["organization_id"], row["project_id"], row["user_id"], row["hour"]))
        return UsageStored(inserted, touched, conflicts)

    async def insert_quarantine(self, items: Sequence[Quarantined], *, dead_letter_topic: str, max_bytes: int) -> int:
        """Quarantine rows with their dead letters; returns how many rows are new."""
        ordered = sorted(items, key=lambda q: (q.source.topic, q.source.partition, q.source.offset))
        rows = await self.conn.fetch(
            query("insert_quarantine"),
            [q.reason.value for q in ordered],
            [q.detail for q in ordered],
            [q.source.topic for q in ordered],
            [q.source.partition for q in ordered],
            [q.source.offset for q in ordered],
            [q.source.key for q in ordered],
            [q.payload for q in ordered],
            [json.dumps({_text(k): _header_value(v) for k, v in q.source.headers}) for q in ordered],
            [q.organization_id for q in ordered],
            dead_letter_topic,
            max_bytes,
        )
        return len(rows)

    async def quarantine_pending(self, reason: str | None, limit: int) -> list[asyncpg.Record]:
        return await self.conn.fetch(query("quarantine_pending"), reason, limit)

    async def quarantine_mark_replayed(self, ids: list[int]) -> None:
        await self.conn.execute(query("quarantine_mark_replayed"), ids)

    async def quarantine_requarantine(self, rows: list[tuple[int, str, str]]) -> None:
        await self.conn.execute(
            query("quarantine_requarantine"), [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        )

    async def budget_candidates(self, touched: Sequence[Touch]) -> list[asyncpg.Record]:
        return await self.conn.fetch(
            query("budget_candidates"),
            [t.organization_id for t in touched],
            [t.project_id for t in touched],
            [t.user_id for t in touched],
            [t.at for t in touched],
            [t.span_start for t in touched],
            [t.span_end for t in touched],
        )

    async def budget_active(self, organizations: set[UUID], at: datetime) -> list[asyncpg.Record]:
        return await self.conn.fetch(query("budget_active"), sorted(organizations), at)

    async def lock_organizations(self, organizations: set[UUID]) -> None:
        await self.conn.fetchval(query("budget_lock_organizations"), sorted(organizations))

    async def budget_spend(self, candidates: Sequence[BudgetPeriod]) -> list[Spend]:
        rows = await self.conn.fetch(
            query("budget_spend"),
            [c.scope for c in candidates],
            [c.organization_id for c in candidates],
            [c.project_id for c in candidates],
            [c.user_id for c in candidates],
            [c.period_start for c in candidates],
            [c.period_end for c in candidates],
            [c.currency for c in candidates],
        )
        by_ord = {
            row["ord"]: Spend(row["spend"], json.loads(row["foreign_rows"]), json.loads(row["missing_rates"]))
            for row in rows
        }
        return [by_ord[i] for i in range(1, len(candidates) + 1)]

    async def resolve_alerts(
        self, alerts: Sequence[tuple[UUID, Decimal]], *, resolved_at: datetime
    ) -> dict[UUID, tuple[int, datetime]]:
        """Mark open alerts resolved (id, spend now); returns {id: (crossing, raised_at)} of those this call
        resolved. An alert already resolved is left alone, so each is resolved (and announced) once."""
        rows = await self.conn.fetch(
            query("resolve_alerts"), [a[0] for a in alerts], [a[1] for a in alerts], resolved_at
        )
        return {row["id"]: (row["crossing"], row["raised_at"]) for row in rows}

    async def insert_alert_messages(
        self, messages: Sequence[tuple[bytes, bytes, str, str, str]], *, topic: str
    ) -> None:
        """Outbox rows for alert messages: (key, value, delivery id, alert id, scope) each."""
        await self.conn.execute(
            query("insert_alert_messages"),
            topic,
            [m[0] for m in messages],
            [m[1] for m in messages],
            [m[2] for m in messages],
            [m[3] for m in messages],
            [m[4] for m in messages],
        )

    async def budget_unpriced(self, candidates: Sequence[BudgetPeriod]) -> list[int]:
        rows = await self.conn.fetch(
            query("budget_unpriced"),
            [c.scope for c in candidates],
            [c.organization_id for c in candidates],
            [c.project_id for c in candidates],
            [c.period_start for c in candidates],
            [c.period_end for c in candidates],
        )
        by_ord = {row["ord"]: int(row["n"]) for row in rows}
        return [by_ord[i] for i in range(1, len(candidates) + 1)]

    async def insert_alerts(self, alerts: Sequence[Alert], *, topic: str, raised_at: datetime) -> set[str]:
        """Insert alerts (ON CONFLICT DO NOTHING) with an outbox row each; returns the ids inserted."""
        rows = await self.conn.fetch(
            query("insert_alerts"),
            [a.id for a in alerts],
            [a.scope for a in alerts],
            [a.budget_id for a in alerts],
            [a.organization_id for a in alerts],
            [a.project_id for a in alerts],
            [a.user_id for a in alerts],
            [a.period_start for a in alerts],
            [a.period_end for a in alerts],
            [a.threshold for a in alerts],
            [a.spend for a in alerts],
            [a.amount for a in alerts],
            [a.currency for a in alerts],
            [a.percent_used for a in alerts],
            [a.message() for a in alerts],
            [a.key for a in alerts],
            topic,
            raised_at,
            [a.crossing for a in alerts],
        )
        return {row["alert_id"] for row in rows}

    async def prices_existing(self, keys: Sequence[tuple[str, str, str, Any]]) -> list[asyncpg.Record]:
        return await self.conn.fetch(query("prices_existing"), *(list(column) for column in zip(*keys, strict=True)))

    async def prices_import(self, columns: Sequence[Sequence[Any]]) -> list[asyncpg.Record]:
        return await self.conn.fetch(query("prices_import"), *columns)

    async def upsert_exchange_rates(self, rates: Sequence[Rate], *, source: str) -> dict[str, int]:
        """Load rates; returns how many were inserted, updated and unchanged."""
        rows = await self.conn.fetch(
            query("upsert_exchange_rates"),
            [r.base for r in rates],
            [r.quote for r in rates],
            [r.effective_date for r in rates],
            [r.rate for r in rates],
            source,
        )
        return {row["outcome"]: int(row["n"]) for row in rows}

    async def report(self, name: str, *args: Any) -> list[asyncpg.Record]:
        """One of the read-only ``report_*`` queries (dev summary, operator commands)."""
        assert name.startswith("report_"), name
        return await self.conn.fetch(query(name), *args)

    async def outbox_claim(self, limit: int) -> list[asyncpg.Record]:
        return await self.conn.fetch(query("outbox_claim"), limit)

    async def outbox_delete(self, ids: list[int]) -> None:
        await self.conn.execute(query("outbox_delete"), ids)

    async def outbox_failed(self, ids: list[int], error: str) -> None:
        await self.conn.execute(query("outbox_failed"), ids, error[:1000])


def _metadata(row: LedgerRow) -> str:
    return json.dumps(row.line.metadata, sort_keys=True, default=str)


# upsert_cost_data's parameters, in order: what each takes from a LedgerRow.
_LEDGER_COLUMNS: tuple[Callable[[LedgerRow], Any], ...] = (
    *map(
        attrgetter,
        (
            "key.organization_id",
            "key.project_id",
            "line.provider",
            "line.ai_organization_id",
            "line.ai_project_id",
            "line.api_version",
            "line.bucket_start",
            "line.bucket_end",
            "line.line_item",
            "line.currency",
            "line.amount",
            "line.quantity",
            "line.unit",
        ),
    ),
    _metadata,
    *map(attrgetter, ("collected_at", "source.partition", "source.offset", "line.report", "line.outside_cost_report")),
)


def _window_columns(revisions: Sequence[WindowRevision]) -> list[list[Any]]:
    """A window statement's first parameters: the windows, then each one's revision."""
    return [
        [r.window.provider for r in revisions],
        [r.window.ai_organization_id for r in revisions],
        [r.window.report for r in revisions],
        [r.window.start for r in revisions],
        [r.window.end for r in revisions],
        [r.collected_at for r in revisions],
    ]


def _text(value: str) -> str:
    """Header text as jsonb can hold it: jsonb refuses \\u0000, which a producer may well send."""
    return value.replace("\x00", "\ufffd")


def _header_value(value: bytes | None) -> str | None:
    """A Kafka header value for the quarantine row: any bytes, or null (Kafka allows a header without one)."""
    return None if value is None else _text(value.decode("utf-8", "replace"))
