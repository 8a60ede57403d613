"""The collector's SQL: every statement of ``worker/sql/collect.sql`` runs here, and driver errors come out
translated by the one PostgreSQL boundary (``worker.store.translated``).

Delivery guarantee, part one (enforced in ``PollerConnection.stage``): a window's messages and the state that
says it was collected are written in ONE transaction, on the connection that holds the poller lock. A poll that
dies before that commit leaves nothing staged and the state where it was; the next poll reads the window again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from worker.sql import query
from worker.store import close, connect, translated

log = structlog.get_logger("worker.collect")


@dataclass(frozen=True)
class Account:
    id: UUID
    team_id: UUID
    provider: str
    organization_id: str
    ciphertext: bytes | None
    wrapped_key: bytes | None
    kek_id: str | None
    secret_file: str | None
    fingerprint: str


@dataclass(frozen=True)
class StagedRow:
    id: int
    provider: str
    report: str
    topic: str
    key: bytes
    message: bytes


class PollerConnection:
    """The active poller's own connection: holds the lock, reads accounts and state, stages windows."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, dsn: str, *, role: str | None, timeout: float) -> PollerConnection:
        return cls(await connect(dsn, role=role, timeout=timeout))

    async def close(self) -> None:
        await close(self.conn)

    @translated
    async def try_lock(self) -> bool:
        return bool(await self.conn.fetchval(query("collect_try_lock")))

    @translated
    async def accounts(self) -> list[Account]:
        rows = await self.conn.fetch(query("collect_accounts"))
        return [
            Account(
                id=r["id"],
                team_id=r["team_id"],
                provider=r["provider"],
                organization_id=r["ai_organization_id"],
                ciphertext=r["key_ciphertext"],
                wrapped_key=r["wrapped_key"],
                kek_id=r["kek_id"],
                secret_file=r["secret_file"],
                fingerprint=r["fingerprint"],
            )
            for r in rows
        ]

    @translated
    async def state(self, account: UUID) -> dict[str, datetime]:
        """report -> collected_through."""
        rows = await self.conn.fetch(query("collect_state"), account)
        return {r["report"]: r["collected_through"] for r in rows}

    @translated
    async def newest_revision(self) -> datetime | None:
        """The latest ``collected_at`` any poll staged (None before the first)."""
        newest: datetime | None = await self.conn.fetchval(query("collect_newest_revision"))
        return newest

    @translated
    async def all_state(self) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(query("collect_state_all")))

    @translated
    async def stage(
        self,
        account: UUID,
        report: str,
        topic: str,
        messages: Sequence[tuple[bytes, bytes]],
        *,
        collected_through: datetime,
        collected_at: datetime,
    ) -> None:
        """The whole window of one endpoint, and its state, in one transaction (all or nothing)."""
        async with self.conn.transaction():
            if messages:
                await self.conn.execute(
                    query("collect_stage"),
                    account,
                    report,
                    topic,
                    [key for key, _ in messages],
                    [value for _, value in messages],
                )
            await self.conn.execute(
                query("collect_state_advance"), account, report, collected_through, collected_at, len(messages)
            )


class OutboxConnection:
    """The publisher's own connection to the staged messages.

    It holds no lock, so losing it (a restarted server, an idle-session timeout, a NAT or pooler dropping an
    idle connection) ends nothing: the call that finds it closed opens a new one, and a failure to open is
    ``DatabaseUnavailable``, retried by the caller with backoff."""

    def __init__(self, opener: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._opener = opener
        self.conn: asyncpg.Connection | None = None

    @translated
    async def connect(self) -> asyncpg.Connection:
        """The open connection: the current one, or a new one when there is none or it was lost."""
        if self.conn is not None and not self.conn.is_closed():
            return self.conn
        if self.conn is not None:
            log.warning("collect_outbox_reconnecting", reason="the publisher's database connection was lost")
            self.conn = None
        self.conn = await self._opener()
        return self.conn

    async def close(self) -> None:
        if self.conn is not None:
            await close(self.conn)

    @translated
    async def claim_and_send(self, limit: int, send: Any) -> int:
        """Claim up to ``limit`` staged rows, ``await send(rows)``, then delete them, all in one transaction."""
        conn = await self.connect()
        async with conn.transaction():
            rows = await conn.fetch(query("collect_outbox_claim"), limit)
            if not rows:
                return 0
            staged = [
                StagedRow(
                    id=r["id"],
                    provider=r["provider"] or "unknown",
                    report=r["report"],
                    topic=r["topic"],
                    key=r["key"],
                    message=r["message"],
                )
                for r in rows
            ]
            await send(staged)
            await conn.execute(query("collect_outbox_delete"), [row.id for row in staged])
            return len(staged)

    @translated
    async def backlog(self) -> int:
        conn = await self.connect()
        return int(await conn.fetchval(query("collect_outbox_count")))


# --- keys (the operator commands) ----------------------------------------------------------------------------


@translated
async def keys_insert(conn: asyncpg.Connection, *args: Any) -> UUID:
    result: UUID = await conn.fetchval(query("keys_insert"), *args)
    return result


@translated
async def keys_get(conn: asyncpg.Connection, key_id: UUID) -> asyncpg.Record | None:
    result: asyncpg.Record | None = await conn.fetchrow(query("keys_get"), key_id)
    return result


@translated
async def keys_rotate(conn: asyncpg.Connection, *args: Any) -> bool:
    return await conn.fetchval(query("keys_rotate"), *args) is not None


@translated
async def keys_sealed(conn: asyncpg.Connection, kek_id: str) -> list[asyncpg.Record]:
    return list(await conn.fetch(query("keys_sealed"), kek_id))


@translated
async def keys_rewrap(conn: asyncpg.Connection, key_id: UUID, wrapped_key: bytes, kek_id: str) -> None:
    await conn.execute(query("keys_rewrap"), key_id, wrapped_key, kek_id)


@translated
async def keys_deactivate(conn: asyncpg.Connection, key_id: UUID) -> bool:
    return await conn.fetchval(query("keys_deactivate"), key_id) is not None


@translated
async def keys_list(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(query("keys_list")))
