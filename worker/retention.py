"""Retention (issue 18): per-request detail goes by whole monthly partitions; rollups and the ledger stay.

One run: create the coming months' ``api_usage`` partitions, drop the partitions wholly older than the kept months
(never one an open budget period starts before the end of), and delete replayed quarantine rows and finished notify
deliveries past their age (never a pending one).
Dropping is two steps: first the first month kept moves forward (``cost_worker_retention_advance``: it waits for
the batches in flight, and later batches quarantine events before it), then each partition is detached and
dropped: ``DETACH PARTITION ... CONCURRENTLY`` when the login can act as the owner role, else through
``cost_worker_retention_drop`` (a plain DETACH: a moment of ACCESS EXCLUSIVE, bounded by lock_timeout). Never a
``DELETE`` of detail rows. Every run first finishes what an interrupted one left (``resume``, migration 0032): a
partition left detach pending before the first month kept is dropped, a table the owner's way
recorded and detached but did not drop is dropped; a table named like a partition that retention did not record
is never dropped, only reported. The outbox needs nothing here: the publisher deletes each row once the broker
acknowledged it.

``cost-worker retention`` shows the plan (dry run) unless ``--execute``; the worker runs it every
``COST_WORKER_RETENTION_INTERVAL`` seconds (one replica at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg
import structlog

from worker import metrics, store
from worker.config import MAX_RETENTION_DAYS, MAX_RETENTION_MONTHS, Settings, env_name, load_settings
from worker.errors import CostWorkerError, FatalError, UsageError
from worker.partitions import add_months, month_of
from worker.sql import query

log = structlog.get_logger("worker.retention")

MONTHS_AHEAD = 2  # partitions exist through this many months after the current one (decode accepts 2 days ahead)
AGED_CHUNK = 10_000  # aged rows (replayed quarantine rows, finished deliveries) deleted per statement
RETRY_AFTER_FAILURE = 60.0  # seconds before a failed periodic run is tried again (if the interval is longer)
_PARTITION_NAME = re.compile(r"^api_usage_[a-z0-9_]+$")  # what DDL may name (names come from the catalog)


def _utc(month: date) -> datetime:
    return datetime(month.year, month.month, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Partition:
    name: str
    from_at: datetime
    until_at: datetime
    detach_pending: bool
    estimated_rows: int
    size_bytes: int


FINISHED_BY_NEXT_RUN = ("detach pending", "detached, not dropped")  # leftover states a run finishes
FOREIGN_PENDING = "detach pending, not started by retention"
_LABELS = {"detach pending": "detach_pending", "detached, not dropped": "detached"}  # metric label of each state


@dataclass(frozen=True)
class Leftover:
    """What an interrupted run (or a human) left: a partition detach pending, or a standalone table named like one
    (states: ``cost_worker_retention_leftovers`` in schema/migrations/0032)."""

    name: str
    state: str


@dataclass
class Plan:
    """What a run would do at ``now``."""

    now: datetime
    months: int  # whole months kept before the current one (0: keep everything)
    kept_from: date | None  # the first month kept today (None: nothing was ever dropped)
    partitions: list[Partition]
    drop: list[Partition] = field(default_factory=list)
    kept_for_budgets: list[Partition] = field(default_factory=list)
    oldest_open_period: datetime | None = None
    quarantine_cutoff: datetime | None = None
    quarantine_rows: int = 0
    deliveries_cutoff: datetime | None = None
    deliveries_rows: int = 0
    leftovers: list[Leftover] = field(default_factory=list)

    @property
    def wanted_from(self) -> date | None:
        """The first month the retention period keeps (None: keep everything)."""
        return add_months(month_of(self.now), -self.months) if self.months else None

    @property
    def new_kept_from(self) -> date | None:
        """The first month kept after the run: the end of the newest partition it drops."""
        if not self.drop:
            return None
        return month_of(max(p.until_at for p in self.drop))


@dataclass
class Result:
    dropped: list[str] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (table, state) an earlier run left, now dropped
    created: list[str] = field(default_factory=list)
    quarantine_deleted: int = 0
    deliveries_deleted: int = 0
    kept_from: date | None = None
    seconds: float = 0.0
    advanced: bool = False  # the first month kept moved (retention_advance ran)

    def summary(self) -> str:
        """What this run changed so far, in a few words ("" when nothing)."""
        parts = [f"kept from {self.kept_from}"] if self.advanced else []
        if self.dropped:
            parts.insert(0, f"dropped {', '.join(self.dropped)}")
        if self.quarantine_deleted:
            parts.append(f"{self.quarantine_deleted} quarantine row(s) deleted")
        if self.deliveries_deleted:
            parts.append(f"{self.deliveries_deleted} notify deliveries deleted")
        if self.created:
            parts.append(f"created {', '.join(self.created)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Ages:
    """How long aged rows are kept, in days (0: kept for ever)."""

    quarantine_days: int
    deliveries_days: int


async def plan(conn: asyncpg.Connection, *, months: int, ages: Ages, now: datetime) -> Plan:
    """Read the partitions, the budgets' open periods, the quarantine and the deliveries; decide (changes nothing)."""
    cutoff = now - timedelta(days=ages.quarantine_days) if ages.quarantine_days else None
    deliveries_cutoff = now - timedelta(days=ages.deliveries_days) if ages.deliveries_days else None
    with store.translating():
        rows = await conn.fetch(query("api_usage_partitions"))
        leftovers = [Leftover(r["partition_name"], r["state"]) for r in await conn.fetch(query("retention_leftovers"))]
        kept_from = await conn.fetchval(query("retention_kept_from"))
        oldest_open = await conn.fetchval(query("retention_oldest_open_period"), now)
        due = int(await conn.fetchval(query("retention_quarantine_due"), cutoff)) if cutoff else 0
        deliveries_due = (
            int(await conn.fetchval(query("retention_deliveries_due"), deliveries_cutoff)) if deliveries_cutoff else 0
        )
    found = Plan(
        now=now,
        months=months,
        kept_from=kept_from,
        partitions=[
            Partition(
                r["partition_name"],
                r["from_at"],
                r["until_at"],
                r["detach_pending"],
                r["estimated_rows"],
                r["bytes"],
            )
            for r in rows
        ],
        oldest_open_period=oldest_open,
        quarantine_cutoff=cutoff,
        quarantine_rows=due,
        deliveries_cutoff=deliveries_cutoff,
        deliveries_rows=deliveries_due,
        leftovers=leftovers,
    )
    wanted = found.wanted_from
    if wanted is not None:
        # Budgets read rollups and the ledger only, never api_usage; the months of an open period stay anyway.
        guard = _utc(month_of(oldest_open)) if oldest_open is not None else None
        for partition in found.partitions:
            if partition.until_at > _utc(wanted):
                continue
            if guard is not None and partition.until_at > guard:
                found.kept_for_budgets.append(partition)
            else:
                found.drop.append(partition)
    return found


async def resume(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Finish what an interrupted run left (a detach pending, a table detached and not dropped); returns
    (table, what was done). Tables retention did not detach are never dropped (see ``plan``'s leftovers)."""
    with store.translating():
        done = [(r["partition_name"], r["state"]) for r in await conn.fetch(query("retention_resume"))]
    for name, state in done:
        metrics.RETENTION_RESUMED.labels(state=_LABELS[state]).inc()
        log.warning("retention_interrupted_run_finished", partition=name, state=state, action="dropped")
    return done


async def execute(conn: asyncpg.Connection, found: Plan, *, as_owner: bool) -> Result:
    """Carry a plan out on a connection outside any transaction (DETACH CONCURRENTLY needs that)."""
    started = time.monotonic()
    result = Result(kept_from=found.kept_from)
    drop_names = {p.name for p in found.drop}
    foreign = [left.name for left in found.leftovers if left.state == FOREIGN_PENDING]
    if as_owner and any(name not in drop_names for name in foreign):
        # Any other DETACH ... CONCURRENTLY fails while a partition is detach pending: a plain one does not.
        log.warning("retention_detach_pending_not_ours", partitions=foreign)
        as_owner = False
    try:
        await _carry_out(conn, found, result, as_owner=as_owner)
    except CostWorkerError as exc:
        # Each step commits on its own: what was done before the failure stays done, and the error says so.
        done = result.summary()
        if done:
            exc.args = (f"{exc} (done before the failure: {done})",)
        raise
    result.seconds = time.monotonic() - started
    return result


async def _carry_out(conn: asyncpg.Connection, found: Plan, result: Result, *, as_owner: bool) -> None:
    with store.translating():
        # First what needs no partition dropped, so that a drop that fails (lock_timeout) holds none of it back.
        result.created = await ensure_ahead(conn, found.now)
        if found.quarantine_cutoff is not None and found.quarantine_rows:
            result.quarantine_deleted = await _delete_aged(conn, "retention_quarantine", found.quarantine_cutoff)
            metrics.RETENTION_QUARANTINE_DELETED.inc(result.quarantine_deleted)
        if found.deliveries_cutoff is not None and found.deliveries_rows:
            result.deliveries_deleted = await _delete_aged(conn, "retention_deliveries", found.deliveries_cutoff)
            metrics.RETENTION_DELIVERIES_DELETED.inc(result.deliveries_deleted)
        if found.new_kept_from is not None:
            result.kept_from = await conn.fetchval(query("retention_advance"), found.new_kept_from)
            result.advanced = True
        # A partition detach pending first: no other can be detached concurrently while it is there. (The
        # sort is stable: the others stay oldest first. from_at is no key: MINVALUE is read back naive.)
        for partition in sorted(found.drop, key=lambda p: not p.detach_pending):
            name = _checked(partition.name)
            if as_owner and not partition.detach_pending:
                # Recorded before the detach, so that a run interrupted before the drop is finished by the next.
                await conn.execute(query("retention_begin_drop"), partition.name)
                await conn.execute(query("retention_detach_concurrently").format(partition=name))
                await conn.execute(query("retention_finish_drop"), partition.name)
            else:  # plain DETACH and DROP in one transaction (a pending partition: DROP, not FINALIZE, see 0032)
                await conn.execute(query("retention_drop"), partition.name)
            result.dropped.append(partition.name)
            metrics.RETENTION_PARTITIONS_DROPPED.inc()
            log.info("retention_partition_dropped", partition=partition.name, estimated_rows=partition.estimated_rows)


async def _delete_aged(conn: asyncpg.Connection, statement: str, cutoff: datetime) -> int:
    """Delete in chunks of ``AGED_CHUNK`` (each its own short transaction) until none is left."""
    total = 0
    while True:
        deleted = int(await conn.fetchval(query(statement), cutoff, AGED_CHUNK))
        total += deleted
        if deleted < AGED_CHUNK:
            return total


async def ensure_ahead(conn: asyncpg.Connection, now: datetime) -> list[str]:
    """Partitions for the current month through ``MONTHS_AHEAD`` months after it."""
    current = month_of(now)
    made: list[str] = await conn.fetchval(query("api_usage_ensure"), current, add_months(current, MONTHS_AHEAD))
    metrics.RETENTION_PARTITIONS_CREATED.inc(len(made))
    return made


def _checked(name: str) -> str:
    if not _PARTITION_NAME.match(name):
        raise FatalError(f"refusing to name partition {name!r} in DDL")
    return f'"{name}"'


def _record(found: Plan, result: Result) -> None:
    remaining = len(found.partitions) - len(result.dropped) + len(result.created)
    metrics.API_USAGE_PARTITIONS.set(remaining)
    metrics.RETENTION_KEPT_BY_BUDGETS.set(len(found.kept_for_budgets))
    metrics.RETENTION_LEFT_ALONE.set(sum(left.state not in FINISHED_BY_NEXT_RUN for left in found.leftovers))
    kept = result.kept_from
    metrics.API_USAGE_OLDEST_KEPT.set(_utc(kept).timestamp() if kept else 0)
    metrics.RETENTION_DURATION.observe(result.seconds)


# ---------------------------------------------------------------------------------------- one run


class Busy(CostWorkerError):
    """Another retention run holds the lock."""


async def run_once(
    settings: Settings, *, months: int, ages: Ages, execute_plan: bool, role: str | None, try_owner: bool
) -> tuple[Plan, Result | None]:
    """Plan (and carry out) one run under the cluster-wide retention lock. Returns (plan, None) for a dry run."""
    conn = await store.connect(settings.dsn(), role=role, timeout=settings.database_connect_timeout)
    try:
        as_owner = await store.become_owner(conn) if try_owner else False
        with store.translating():
            mine = bool(await conn.fetchval(query("retention_try_lock")))
        if not mine:
            raise Busy("another retention run holds the lock (a worker replica or the CLI); try again later")
        try:
            finished = await resume(conn) if execute_plan else []
            found = await plan(conn, months=months, ages=ages, now=datetime.now(UTC))
            for left in found.leftovers:
                if left.state not in FINISHED_BY_NEXT_RUN:
                    log.warning("retention_table_left_alone", table=left.name, state=left.state)
            if not execute_plan:
                return found, None
            result = await execute(conn, found, as_owner=as_owner)
            result.finished = finished
            _record(found, result)
            return found, result
        finally:
            with store.ignoring_driver_errors():
                await conn.fetchval(query("retention_unlock"))
    finally:
        with store.ignoring_driver_errors():
            await conn.close()


async def run_periodically(settings: Settings, stop: asyncio.Event) -> None:
    """The worker's background task: a run every ``retention_interval`` seconds until ``stop`` (never returns
    earlier, even when off: the worker treats a finished background task as a failure)."""
    if settings.retention_interval <= 0:
        await stop.wait()
        return
    while not stop.is_set():
        wait = settings.retention_interval
        try:
            found, result = await run_once(
                settings,
                months=settings.api_usage_retention_months,
                ages=Ages(settings.quarantine_retention_days, settings.notify_retention_days),
                execute_plan=True,
                role=settings.database_role,
                try_owner=False,
            )
            metrics.RETENTION_RUNS.labels(result="ok").inc()
            if result is not None and (
                result.dropped
                or result.finished
                or result.created
                or result.quarantine_deleted
                or result.deliveries_deleted
            ):
                log.info(
                    "retention_run",
                    dropped=result.dropped,
                    finished=result.finished,
                    created=result.created,
                    quarantine_deleted=result.quarantine_deleted,
                    deliveries_deleted=result.deliveries_deleted,
                    kept_from=result.kept_from.isoformat() if result.kept_from else None,
                    kept_for_budgets=[p.name for p in found.kept_for_budgets],
                    seconds=round(result.seconds, 3),
                )
        except Busy:
            metrics.RETENTION_RUNS.labels(result="skipped").inc()
        except CostWorkerError as exc:  # retention never stops ingestion; the next run tries again, sooner
            metrics.RETENTION_RUNS.labels(result="failed").inc()
            log.warning("retention_failed", error=str(exc))
            wait = min(wait, RETRY_AFTER_FAILURE)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)


# ---------------------------------------------------------------------------------------- command line


def command(months_flag: int | None, days_flag: int | None, deliveries_flag: int | None, *, execute_plan: bool) -> int:
    """``cost-worker retention [--months N] [--quarantine-days D] [--deliveries-days D] [--execute | --dry-run]``."""
    settings = load_settings(require=("database_url",))
    problems = []
    months = settings.api_usage_retention_months if months_flag is None else months_flag
    days = settings.quarantine_retention_days if days_flag is None else days_flag
    deliveries = settings.notify_retention_days if deliveries_flag is None else deliveries_flag
    if months < 0:
        problems.append(f"--months: must be 0 (keep everything) or more, not {months}")
    elif months > MAX_RETENTION_MONTHS:
        problems.append(f"--months: must be at most {MAX_RETENTION_MONTHS}, not {months}")
    for flag, value in (("--quarantine-days", days), ("--deliveries-days", deliveries)):
        if value < 0:
            problems.append(f"{flag}: must be 0 (keep them) or more, not {value}")
        elif value > MAX_RETENTION_DAYS:
            problems.append(f"{flag}: must be at most {MAX_RETENTION_DAYS}, not {value}")
    if problems:
        raise UsageError(problems)  # only the flags can be out of range: the settings are validated the same way
    found, result = asyncio.run(
        run_once(
            settings,
            months=months,
            ages=Ages(days, deliveries),
            execute_plan=execute_plan,
            role=None,
            try_owner=True,
        )
    )
    print(report(found, result))
    return 0


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)  # pragma: no cover


def _bound(at: datetime) -> str:
    return "(start)" if at.year <= 1 else at.astimezone(UTC).date().isoformat()


def report(found: Plan, result: Result | None) -> str:
    """The plan, or what was done, as text."""
    lines = []
    if found.months:
        lines.append(
            f"keeping {found.months} whole month(s) of API-usage detail before the current one: from "
            f"{found.wanted_from}; first month kept now: {found.kept_from or 'everything (nothing dropped yet)'}"
        )
    else:
        lines.append(f"keeping all API-usage detail ({env_name('api_usage_retention_months')}=0, no --months)")
    if found.oldest_open_period is not None:
        lines.append(f"oldest open budget period starts {found.oldest_open_period.isoformat()}")
    drop = {p.name for p in found.drop}
    budget = {p.name for p in found.kept_for_budgets}
    rows = [("partition", "from", "until", "rows (est.)", "size", "action")]
    for p in found.partitions:
        action = "drop" if p.name in drop else "keep: an open budget period" if p.name in budget else "keep"
        if result is not None and p.name in drop:
            action = "dropped"
        rows.append(
            (p.name, _bound(p.from_at), _bound(p.until_at), f"{p.estimated_rows:,}", _size(p.size_bytes), action)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if found.quarantine_cutoff is not None:
        lines.append(
            f"replayed quarantine rows replayed before {found.quarantine_cutoff.isoformat(timespec='seconds')}: "
            f"{found.quarantine_rows}"
        )
    if found.deliveries_cutoff is not None:
        lines.append(
            f"notify deliveries finished before {found.deliveries_cutoff.isoformat(timespec='seconds')}: "
            f"{found.deliveries_rows}"
        )
    if result is not None:
        lines += [f"{name}: left by an interrupted run, {state}: dropped" for name, state in result.finished]
    for left in found.leftovers:
        if left.state in FINISHED_BY_NEXT_RUN:
            lines.append(f"{left.name}: left by an interrupted run, {left.state}: finished by --execute")
        else:
            lines.append(f"{left.name}: {left.state} (drop it by hand if it is not needed)")
    if result is None:
        lines.append(
            f"dry run: nothing changed (--execute drops {len(found.drop)} partition(s) and deletes "
            f"{found.quarantine_rows} quarantine row(s) and {found.deliveries_rows} notify deliveries)"
        )
    else:
        lines.append(
            f"dropped {len(result.dropped)} partition(s), deleted {result.quarantine_deleted} quarantine row(s) "
            f"and {result.deliveries_deleted} notify deliveries, created {len(result.created)} partition(s) ahead "
            f"in {result.seconds:.2f} s; first month kept: {result.kept_from or 'everything'}"
        )
    return "\n".join(lines)
