"""API-usage events meet the monthly partitions of ``api_usage`` (issue 18), inside the batch's transaction.

Before the insert, every UTC month of the batch's events gets its partition if it has none (a worker that was
down for months, a backfill), created by ``cost_worker_api_usage_admit`` (schema/migrations/0011): standalone
and attached, one creator at a time, so concurrent workers never fail on it. Events of a month whose partition
retention dropped are not inserted again: the rollups already count them, and without their detail a replay
cannot be told from a new event. They are quarantined (``invalid_timestamp``, with the reason in the detail).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

from worker.decode import ApiEvent
from worker.quarantine import Quarantined, Reason
from worker.rows import UsageRows
from worker.store import Tx


def month_of(at: datetime) -> date:
    """The first day of the UTC month of an instant (the partition it belongs to)."""
    utc = at.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def add_months(month: date, n: int) -> date:
    """The first day of the month ``n`` months after (before, if negative) ``month``'s."""
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def months_of(events: Sequence[ApiEvent]) -> list[date]:
    """The UTC months of the events (one comparison pass when they all fall in one month, as they usually do)."""
    first = month_of(min(event.occurred_at for event in events))
    last = month_of(max(event.occurred_at for event in events))
    if first == last:
        return [first]
    return sorted({month_of(event.occurred_at) for event in events})


async def admit(tx: Tx, rows: UsageRows, quarantine: list[Quarantined]) -> UsageRows:
    """The rows to insert: each month has its partition; events before the first month kept are quarantined.

    Delivery guarantee, enforced here and in retention: the first month kept is read under a lock retention
    takes exclusively to move it, held until this batch commits, so no batch inserts into a month whose partition
    is being dropped, and no event of a dropped month is counted again in the rollups.
    """
    events = rows.events
    if not events:
        return rows
    kept_from = await tx.api_usage_admit(months_of(events))
    if kept_from is None:
        return rows
    cutoff = datetime(kept_from.year, kept_from.month, 1, tzinfo=UTC)
    admitted = []
    for index, event in enumerate(events):
        if event.occurred_at >= cutoff:
            admitted.append(index)
        else:
            quarantine.append(
                Quarantined(
                    event.source,
                    event.payload,
                    Reason.INVALID_TIMESTAMP,
                    f"occurred_at {event.occurred_at.isoformat()} is before {kept_from.isoformat()}: retention "
                    "dropped the per-request detail of that month, so the event cannot be told from a replay",
                    event.organization_id,
                )
            )
    return rows if len(admitted) == len(events) else rows.only(admitted)
