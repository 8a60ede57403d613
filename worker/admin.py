"""Operator commands: ``quarantine list``, ``quarantine replay`` and ``budgets status``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from worker.alerts import percent as percent_of
from worker.alerts import zone
from worker.batch import decode_batch
from worker.budgets import BudgetEngine, Candidate
from worker.config import Settings
from worker.errors import CostWorkerError, UsageError
from worker.pipeline import Pipeline
from worker.quarantine import Reason
from worker.store import Database, Spend


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table a person can read (and a terminal can't mangle)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, Decimal):
        return format(value, "f")
    return printable(str(value))


def printable(text: str) -> str:
    """Text from outside (a receiver's response body, a model name from a producer, a name) as the terminal should
    show it: a control character (an escape sequence, a line break that would forge a row) escaped, as ``\x1b``."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


async def _open(settings: Settings) -> Database:
    return await Database.open(settings.dsn(), role=settings.database_role, max_size=2)


# ================================================================================================ quarantine


async def quarantine_list(settings: Settings, *, reason: str | None, status: str, limit: int) -> int:
    _check_reason(reason)
    db = await _open(settings)
    try:
        rows = await db.quarantine_list(reason, None if status == "all" else status, limit)
    finally:
        await db.close()
    print(
        table(
            ["id", "reason", "topic", "partition", "offset", "bytes", "status", "replays", "quarantined_at", "detail"],
            [
                (
                    r["id"],
                    r["reason"],
                    r["source_topic"],
                    r["source_partition"],
                    r["source_offset"],
                    r["size"],
                    r["status"],
                    r["replay_count"],
                    r["quarantined_at"],
                    (r["detail"] or "")[:80],
                )
                for r in rows
            ],
        )
    )
    print(f"{len(rows)} row(s)")
    return 0


@dataclass(frozen=True)
class _Replayed:
    """A quarantined message as the pipeline sees a Kafka record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


async def quarantine_replay(settings: Settings, *, reason: str | None, limit: int) -> int:
    """Reprocess pending quarantined messages in one transaction: those that pass now are applied exactly
    as if consumed (same dedupe, same revision rule, same budgets); the others keep their row, with the reason
    they fail for now. Offsets are not touched: these messages were already consumed."""
    _check_reason(reason)
    db = await _open(settings)
    try:
        pipeline = Pipeline(db, settings, budgets=BudgetEngine(settings))
        # A message's kind is its topic's (``decode_batch``): one of a topic this configuration does not consume
        # (a renamed input topic) would be decoded as the wrong kind and lose its reason. Those are left as they are.
        topics = list(settings.input_topics)
        async with db.transaction() as tx:
            elsewhere = await tx.quarantine_pending_elsewhere(reason, topics)
            for row in elsewhere:
                print(
                    f"left {row['messages']} pending message(s) of {row['source_topic']}: not an input topic of this "
                    f"configuration ({', '.join(topics)})"
                )
            rows = await tx.quarantine_pending(reason, limit, topics)
            if not rows:
                print("nothing to replay")
                return 0
            records = [
                _Replayed(
                    r["source_topic"],
                    r["source_partition"],
                    r["source_offset"],
                    r["message_key"],
                    bytes(r["payload"]),
                    tuple((k, str(v).encode()) for k, v in json.loads(r["headers"]).items()),
                )
                for r in rows
            ]
            batch = decode_batch(records, settings)
            batch.last_offsets.clear()  # replay never moves offsets
            outcome = await pipeline.write(tx, batch)
            still_bad = {(q.source.topic, q.source.partition, q.source.offset): q for q in outcome.quarantine}
            replayed, failed = [], []
            for row in rows:
                bad = still_bad.get((row["source_topic"], row["source_partition"], row["source_offset"]))
                if bad is None:
                    replayed.append(row["id"])
                else:
                    failed.append((row["id"], bad.reason.value, bad.detail))
            if replayed:
                await tx.quarantine_mark_replayed(replayed)
            if failed:
                await tx.quarantine_requarantine(failed)
    finally:
        await db.close()
    print(f"replayed {len(replayed)} message(s); {len(failed)} still quarantined")
    for (topic, result), count in sorted(outcome.messages.items()):
        if result != "quarantined" and count:
            print(f"  {topic}: {count} {result}")
    for (topic, why), count in sorted(outcome.quarantined.items()):
        print(f"  {topic}: {count} still {why}")
    if outcome.alerts:
        print(f"  {len(outcome.alerts)} budget alert(s) raised")
    return 0


def _check_reason(reason: str | None) -> None:
    if reason is not None and reason not in {r.value for r in Reason}:
        raise UsageError([f"--reason: unknown reason {reason!r}; known: {', '.join(r.value for r in Reason)}"])


# ================================================================================================ budgets


async def budgets_status(settings: Settings, *, organization: str | None) -> int:
    org_id: UUID | None = None
    if organization is not None:
        try:
            org_id = UUID(organization)
        except ValueError:
            raise UsageError([f"--organization: not a uuid: {organization!r}"]) from None
    db = await _open(settings)
    try:
        organizations = [org_id] if org_id else await db.budget_sweep_organizations()
        now = datetime.now(UTC)
        rows: list[tuple[Any, ...]] = []
        if organizations:
            async with db.transaction() as tx:
                await tx.set_tenants(set(organizations))
                if org_id is not None and not await tx.organization_exists(org_id):
                    raise CostWorkerError(f"no organization {org_id}")
                candidates = [Candidate.from_row(r) for r in await tx.budget_active(set(organizations), now)]
                spends = await tx.budget_spend(candidates) if candidates else []
                unpriced = await tx.budget_unpriced(candidates) if candidates else []
            for candidate, spend, missing in zip(candidates, spends, unpriced, strict=True):
                rows.append(_status_row(candidate, spend, missing))
    finally:
        await db.close()
    if not rows:
        print("no active budgets")
        return 0
    print(
        table(
            [
                *("scope", "budget", "period", "current period", "spend / amount"),
                *("used", "alerted", "thresholds", "rates", "unpriced"),
            ],
            rows,
        )
    )
    return 0


async def budgets_rebuild_spend(settings: Settings, *, organization: str | None) -> int:
    """Rebuild the spend aggregate of one organization, or of every organization with an active budget or queued
    for a rebuild by a migration (0044), each in its own transaction (it holds the organization's spend lock for
    its length, as a provider batch does), and take each off the rebuild queue."""
    org_id: UUID | None = None
    if organization is not None:
        try:
            org_id = UUID(organization)
        except ValueError:
            raise UsageError([f"--organization: not a uuid: {organization!r}"]) from None
    db = await _open(settings)
    try:
        if org_id is not None:
            organizations = [org_id]
        else:
            active, queued = await db.budget_sweep_organizations(), await db.spend_rebuilds_queued()
            organizations = sorted({*active, *queued})
        for org in organizations:
            async with db.transaction() as tx:
                await tx.set_tenants({org})
                if org_id is not None and not await tx.organization_exists(org):
                    # A mistyped id would be "rebuilt" (nothing, exit 0), and the organization meant never was.
                    raise CostWorkerError(f"no organization {org}")
                await tx.spend_rebuild_dequeue(org)
                await tx.spend_rebuild(org)
            print(f"rebuilt {org}")
    finally:
        await db.close()
    print(f"spend aggregate rebuilt for {len(organizations)} organization(s)")
    return 0


DISPLAY_QUANTUM = Decimal("0.01")  # spend is exact; `budgets status` shows it rounded half-even to cents


def _zone_label(name: str, local: tzinfo) -> str:
    """The budget's zone name, or ``UTC (PST)`` where ``zone`` shows it in UTC (no IANA zone of that name)."""
    return name if isinstance(local, ZoneInfo) else f"UTC ({name})"


def _status_row(candidate: Candidate, spend: Spend, unpriced: int) -> tuple[str, ...]:
    local = zone(candidate.timezone)
    if spend.amount is None:
        shown, percent = "unconvertible", "?"
        rates = "missing " + "; ".join(
            f"{currency}->{candidate.currency} {m.get('first')}..{m.get('last')} ({m.get('rows')} rows)"
            for currency, m in sorted(spend.missing_rates.items())
        )
    else:
        shown = format(spend.amount.quantize(DISPLAY_QUANTUM, rounding=ROUND_HALF_EVEN), "f")
        percent = f"{percent_of(spend.amount, candidate.amount, Decimal('0.1'))}%"
        rates = (
            "converted " + ", ".join(f"{c} ({n} rows)" for c, n in sorted(spend.converted.items()))
            if spend.converted
            else "-"
        )
    return (
        candidate.scope,
        candidate.name or str(candidate.budget_id)[:8],
        candidate.period,
        f"{candidate.period_start.astimezone(local):%Y-%m-%d %H:%M} .. "
        f"{candidate.period_end.astimezone(local):%Y-%m-%d %H:%M} {_zone_label(candidate.timezone, local)}",
        f"{shown} / {format(candidate.amount, 'f')} {candidate.currency}",
        percent,
        ",".join(format(t.normalize(), "f") for t in sorted(candidate.alerted)) or "-",
        ",".join(format(t.normalize(), "f") for t in candidate.thresholds),
        rates,
        str(unpriced) if unpriced else "-",
    )
