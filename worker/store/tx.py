"""The batch transaction's statements (``Tx``): typed rows in, typed answers out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from worker.alerts import Alert
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
from worker.store.columns import ledger_columns, quarantine_columns, usage_records, window_columns
from worker.touches import Touch


@dataclass(frozen=True, slots=True)
class Spend:
    """A budget's spend in its period, in its currency (``cost_worker_spend``). ``amount`` is None when the
    budget is unconvertible: rows need a rate that ``exchange_rates`` lacks (``missing_rates``:
    {row currency: {"rows": n, "first": day, "last": day}}). ``converted``: {row currency: rows converted}."""

    amount: Decimal | None
    converted: dict[str, int]
    missing_rates: dict[str, dict[str, Any]]


class Tx:
    """Statements that run inside one transaction (``Database.transaction``)."""

    def __init__(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        self.conn = conn
        self.tenants: frozenset[UUID] = frozenset()  # the row-level security scope set last (set_tenants)

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
        self.tenants = frozenset(organization_ids)

    async def stored_event_keys(self, events: Sequence[tuple[UUID, datetime, str]]) -> set[tuple[UUID, datetime, str]]:
        """Which of these (organization, occurred_at, event_id) keys ``api_usage`` holds. Widens the transaction's
        tenant scope to their organizations (never narrows it: a later round writes under the scope set before)."""
        if not events:
            return set()
        organizations = {event[0] for event in events}
        if not organizations <= self.tenants:
            await self.set_tenants(set(self.tenants | organizations))
        rows = await self.conn.fetch(
            query("stored_event_keys"), [e[0] for e in events], [e[1] for e in events], [e[2] for e in events]
        )
        return {(row["organization_id"], row["occurred_at"], row["event_id"]) for row in rows}

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

    async def overlapping_cost_windows(self, windows: Sequence[WindowKey]) -> dict[WindowKey, WindowKey]:
        """Per window, a stored window of its report that overlaps it without being it (none: not in the map)."""
        rows = await self.conn.fetch(
            query("overlapping_cost_windows"),
            [w.provider for w in windows],
            [w.ai_organization_id for w in windows],
            [w.report for w in windows],
            [w.start for w in windows],
            [w.end for w in windows],
        )
        found: dict[WindowKey, WindowKey] = {}
        for row in rows:
            window = windows[row["ord"] - 1]
            found.setdefault(window, window._replace(start=row["bucket_start_time"], end=row["bucket_end_time"]))
        return found

    async def upsert_cost_windows(self, revisions: Sequence[WindowRevision]) -> WindowStates:
        """Advance each window to its revision; per window 'advanced', 'same' or 'stale'."""
        rows = await self.conn.fetch(
            query("upsert_cost_windows"),
            *window_columns(revisions),
            ["{" + ",".join(sorted(str(o) for o in r.organization_ids)) + "}" for r in revisions],
        )
        return WindowStates(
            {revisions[row["ord"] - 1].window: row["state"] for row in rows},
            {o.int: o for row in rows for o in row["organization_ids"]},
        )

    async def organization_exists(self, organization: UUID) -> bool:
        """Whether the organization exists (call after ``set_tenants`` including it)."""
        return bool(await self.conn.fetchval(query("organization_exists"), organization))

    async def spend_rebuild(self, organization: UUID) -> None:
        """Rebuild the organization's spend aggregate from its ledger lines and rollups (0012)."""
        await self.conn.execute(query("spend_rebuild"), organization)

    async def spend_rebuild_dequeue(self, organization: UUID) -> str | None:
        """Take the organization off the rebuild queue; its queued reason, or None when it was not queued."""
        reason: str | None = await self.conn.fetchval(query("spend_rebuild_dequeue"), organization)
        return reason

    async def upsert_cost_data(self, rows: Sequence[LedgerRow]) -> list[tuple[str | None, datetime | None]]:
        """Per row, in order: what was written ('inserted', 'updated' or None) and the revision kept."""
        records = await self.conn.fetch(query("upsert_cost_data"), *ledger_columns(rows))
        by_ord = {record["ord"]: (record["result"], record["kept_revision"]) for record in records}
        return [by_ord[i] for i in range(1, len(rows) + 1)]

    async def retire_cost_data(self, revisions: Sequence[WindowRevision]) -> list[Retired]:
        """Supersede the stored lines of older revisions of these windows; returns the lines retired."""
        records = await self.conn.fetch(query("retire_cost_data"), *window_columns(revisions))
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

    async def usage_beside_costs(
        self, costs: Sequence[tuple[UUID, UUID | None, WindowKey]]
    ) -> list[tuple[UUID, UUID | None, datetime, datetime]]:
        """The counted usage lines whose windows overlap these changed cost lines' (organization, project, window):
        (organization, project, window start, window end) of each."""
        records = await self.conn.fetch(
            query("usage_beside_costs"),
            [org for org, _, _ in costs],
            [project for _, project, _ in costs],
            [w.provider for _, _, w in costs],
            [w.ai_organization_id for _, _, w in costs],
            [w.start for _, _, w in costs],
            [w.end for _, _, w in costs],
        )
        return [(r["organization_id"], r["project_id"], r["bucket_start_time"], r["bucket_end_time"]) for r in records]

    async def insert_api_usage(self, rows: UsageRows) -> UsageStored:
        """Insert events (a redelivery is a no-op) with their hourly rollups."""
        inserted = 0
        touched = []
        conflicts = []
        records = await self.conn.fetch(query("insert_api_usage"), usage_records(rows))
        for row in records:
            kind = row["kind"]
            if kind == "touched":
                touched.append(Touch(row["organization_id"], row["project_id"], row["user_id"], row["at"]))
            elif kind == "conflict":
                conflicts.append((row["organization_id"], row["at"], row["event_id"]))
            else:
                inserted = row["requests"]
        return UsageStored(inserted, touched, conflicts)

    async def insert_quarantine(self, items: Sequence[Quarantined], *, dead_letter_topic: str, max_bytes: int) -> int:
        """Quarantine rows with their dead letters; returns how many rows are new."""
        rows = await self.conn.fetch(
            query("insert_quarantine"), *quarantine_columns(items), dead_letter_topic, max_bytes
        )
        return len(rows)

    async def quarantine_pending(self, reason: str | None, limit: int, topics: list[str]) -> list[asyncpg.Record]:
        return await self.conn.fetch(query("quarantine_pending"), reason, limit, topics)

    async def quarantine_pending_elsewhere(self, reason: str | None, topics: list[str]) -> list[asyncpg.Record]:
        return await self.conn.fetch(query("quarantine_pending_elsewhere"), reason, topics)

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

    async def track_spend(self, budgets: Sequence[BudgetPeriod], *, max_new: int | None = None) -> int:
        """Have the spend aggregate keep the scopes of these user budgets (0016), registering at most ``max_new``
        new ones (None: all); how many were new."""
        kept = [b for b in budgets if b.scope == "user"]
        if not kept:
            return 0
        added = await self.conn.fetchval(
            query("spend_track"),
            [b.scope for b in kept],
            [b.organization_id for b in kept],
            [b.project_id for b in kept],
            [b.user_id for b in kept],
            max_new,
        )
        return int(added or 0)

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
