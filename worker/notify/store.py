"""The notify service's SQL, executed here only (statements: ``queries.sql`` beside this module).

Every write runs inside the owning organization's row-level-security scope; driver errors come out
translated by ``worker.store`` (``DatabaseUnavailable`` is retried by the callers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cache
from importlib.resources import files
from typing import Any
from uuid import UUID

import asyncpg

from worker.sql import parse
from worker.store import Database, Tx, translated


@cache
def _queries() -> dict[str, str]:
    return parse(files(__package__).joinpath("queries.sql").read_text(encoding="utf-8"))


def q(name: str) -> str:
    return _queries()[name]


@dataclass(frozen=True, slots=True)
class NewDelivery:
    organization_id: UUID
    destination_id: UUID
    webhook_id: str
    event_type: str
    payload: str


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    organization_id: UUID
    destination_id: UUID
    webhook_id: str
    event_type: str
    payload: str
    attempts: int
    created_at: datetime
    kind: str
    url_sealed: bytes
    secret_sealed: bytes | None
    previous_secret_sealed: bytes | None  # signs too while a rotation's overlap lasts


# --- inside the consumer's batch transaction ------------------------------------------------------------


async def destinations_for(tx: Tx, organizations: Sequence[UUID]) -> list[asyncpg.Record]:
    return await tx.conn.fetch(q("notify_destinations_for"), list(organizations))


async def insert_deliveries(tx: Tx, rows: Sequence[NewDelivery]) -> int:
    result = await tx.conn.fetch(
        q("notify_deliveries_insert"),
        [r.organization_id for r in rows],
        [r.destination_id for r in rows],
        [r.webhook_id for r in rows],
        [r.event_type for r in rows],
        [r.payload for r in rows],
    )
    return len(result)


# --- the dispatcher and the operator commands --------------------------------------------------------------


class NotifyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def tenant(self, *organizations: UUID) -> AsyncIterator[Tx]:
        async with self.db.transaction() as tx:
            await tx.set_tenants(set(organizations))
            yield tx

    async def claim(self, busy: Sequence[UUID], per_destination: int, limit: int, lease: float) -> list[Claimed]:
        async with self.db.transaction() as tx:
            due = [r["organization_id"] for r in await tx.conn.fetch(q("notify_due_organizations"), list(busy), 1000)]
            if not due:
                return []
            await tx.set_tenants(set(due))
            rows = await tx.conn.fetch(q("notify_claim"), list(busy), per_destination, limit, lease)
        return [Claimed(**dict(row)) for row in rows]

    async def delivered(self, item: Claimed, status: int) -> bool:
        async with self.tenant(item.organization_id) as tx:
            return bool(await tx.conn.fetch(q("notify_record_delivered"), item.id, item.attempts, status))

    async def retry(
        self, item: Claimed, at: datetime, status: int | None, error: str, *, destination_backoff: bool
    ) -> bool:
        async with self.tenant(item.organization_id) as tx:
            done = bool(await tx.conn.fetch(q("notify_record_retry"), item.id, item.attempts, at, status, error))
            if destination_backoff:
                await tx.conn.execute(q("notify_destination_backoff"), item.destination_id, at)
            return done

    async def failed(self, item: Claimed, status: int | None, error: str) -> bool:
        async with self.tenant(item.organization_id) as tx:
            return bool(await tx.conn.fetch(q("notify_record_failed"), item.id, item.attempts, status, error))

    async def disable(self, item: Claimed, reason: str) -> None:
        async with self.tenant(item.organization_id) as tx:
            await tx.conn.execute(q("notify_destination_disable"), item.destination_id, reason)

    @translated
    async def stats(self) -> tuple[int, float]:
        async with self.db.pool.acquire() as conn:
            row = await conn.fetchrow(q("notify_stats"))
        assert row is not None
        return int(row["backlog"]), float(row["oldest_age"])

    # --- destinations (operator commands) ------------------------------------------------------------------

    async def add_destination(
        self,
        *,
        id: UUID,
        organization: UUID,
        name: str,
        kind: str,
        origin: str,
        url_sealed: bytes,
        secret_sealed: bytes | None,
        scopes: Sequence[str],
        min_threshold: Decimal,
        include_resolved: bool,
        before_commit: Callable[[], None] | None = None,
    ) -> bool:
        """Add a destination; ``before_commit`` runs once it is inserted, inside the transaction (what it raises
        rolls the insert back: the signing secret is shown before the destination that needs it is kept)."""
        async with self.tenant(organization) as tx:
            exists = await tx.conn.fetchval(q("notify_organization_exists"), organization)
            if not exists:
                raise LookupError(f"organization {organization} does not exist")
            row = await tx.conn.fetchval(
                q("notify_destination_insert"),
                id,
                organization,
                name,
                kind,
                origin,
                url_sealed,
                secret_sealed,
                list(scopes),
                min_threshold,
                include_resolved,
            )
            if row is not None and before_commit is not None:
                before_commit()
        return row is not None

    async def rotate_secret(
        self,
        organization: UUID,
        id: UUID,
        secret_sealed: bytes,
        overlap: float,
        before_commit: Callable[[datetime], None],
    ) -> datetime | None:
        """Replace a webhook's signing secret, the old one signing too for ``overlap`` seconds; ``before_commit``
        gets the overlap's end inside the transaction (the new secret is shown before it is kept). None: no such
        webhook destination."""
        async with self.tenant(organization) as tx:
            until: datetime | None = await tx.conn.fetchval(
                q("notify_destination_rotate_secret"), id, organization, secret_sealed, overlap
            )
            if until is not None:
                before_commit(until)
        return until

    async def list_destinations(self, organization: UUID) -> list[asyncpg.Record]:
        async with self.tenant(organization) as tx:
            return await tx.conn.fetch(q("notify_destination_list"), organization)

    async def get_destination(self, organization: UUID, id: UUID) -> asyncpg.Record | None:
        async with self.tenant(organization) as tx:
            return await tx.conn.fetchrow(q("notify_destination_get"), id, organization)

    async def remove_destination(self, organization: UUID, id: UUID) -> bool:
        async with self.tenant(organization) as tx:
            return await tx.conn.fetchval(q("notify_destination_delete"), id, organization) is not None

    async def organizations(self, after: UUID, limit: int) -> list[UUID]:
        async with self.db.transaction() as tx:
            return [r["id"] for r in await tx.conn.fetch(q("notify_organizations"), after, limit)]

    async def reseal(
        self,
        organizations: Sequence[UUID],
        change: Callable[[asyncpg.Record], tuple[bytes, bytes | None, bytes | None] | None],
    ) -> int:
        """Seal again, in one transaction, the destinations of ``organizations`` that ``change`` gives new sealed
        values (URL, secret, previous secret) for; the number changed."""
        changed = 0
        async with self.tenant(*organizations) as tx:
            for row in await tx.conn.fetch(q("notify_destinations_sealed")):
                sealed = change(row)
                if sealed is not None:
                    await tx.conn.execute(q("notify_destination_reseal"), row["id"], *sealed)
                    changed += 1
        return changed

    async def status(self, organization: UUID | None) -> list[dict[str, Any]]:
        async with self.db.transaction() as tx:
            orgs = {r["organization_id"] for r in await tx.conn.fetch(q("notify_status_organizations"))}
            if organization is not None:
                orgs = {organization}
            if not orgs:
                return []
            await tx.set_tenants(orgs)
            return [dict(r) for r in await tx.conn.fetch(q("notify_status"), organization)]
