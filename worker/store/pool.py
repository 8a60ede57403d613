"""The connection pool, single connections, and the statements the worker runs outside a batch transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from worker.sql import query
from worker.store.errors import DRIVER_ERRORS, translate, translated
from worker.store.tx import Tx

APPLICATION_NAME = "cost-worker"
CLIENT_TIMEOUT_MARGIN = 5.0  # seconds the client waits beyond the server's statement_timeout


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


async def close(conn: asyncpg.Connection, timeout: float = 5.0) -> None:
    """Close a connection from ``connect`` (if still open), or terminate it when closing fails."""
    if not conn.is_closed():
        try:
            await conn.close(timeout=timeout)
        except DRIVER_ERRORS:
            conn.terminate()


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
        except DRIVER_ERRORS:
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

    @translated
    async def spend_rebuilds_queued(self) -> list[UUID]:
        async with self.pool.acquire() as conn:
            return [row["organization_id"] for row in await conn.fetch(query("spend_rebuilds_queued"))]

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


@dataclass(frozen=True, slots=True)
class StoredOffset:
    topic: str
    partition: int
    next_offset: int
