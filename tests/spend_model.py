"""An independent model of what counts as spend, in plain Python with Decimal (tests only).

Restated from README "What counts as spend" and the rules in ``schema/migrations/0006_spend_rules.sql``; it calls
no worker code and no SQL:
- a bucket is a snapshot of one report: the newest ``collected_at`` of (provider, account, report, window) is the
  whole truth of that window; older lines stop counting; the same revision adds only lines not yet there;
- a row covers, for the estimates, the UTC hours [start, min(end, collected_at)) overlaps (0025); unpriced usage and
  usage of zero quantity cover nothing;
- per scope: cost rows count; priced usage counts unless a cost row of its account in the scope covers one of the
  hours its window overlaps, up to its collection (0023), for the same project (or either has no project), except
  usage the cost report omits; and (0031) unless an unpriced usage line of nonzero quantity of its account (same
  project, or either has none) overlaps one of its hours that no such cost row covers; an estimate counts
  unless a counted covering row of its provider covers its hour for its project (or, organization scope, an
  ungrouped row of the account its project is mapped to); unknown providers are never replaced;
- a provider row counts in the period containing its window's midpoint; an estimate in the period of its hour;
- every row counts in the organization it names: a project's or a user's scope is its rows that name the
  organization (0037, 0045), wherever the project or the user belongs now.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal, Inexact, InvalidOperation, localcontext
from zoneinfo import ZoneInfo

HOUR = timedelta(hours=1)
# Sums are exact, as NUMERIC's are: Python's default context keeps 28 significant digits, and a 30-digit amount (a
# JSON number as a provider may send it) summed in it lost its last digits. A sum that would round raises instead.
EXACT = Context(prec=1000, traps=[Inexact, InvalidOperation])
Account = tuple[str, str]  # (provider, provider organization id)


@dataclass(frozen=True)
class Row:
    """A provider ledger line, attributed and priced."""

    organization_id: uuid.UUID
    project_id: uuid.UUID | None
    provider: str
    ai_organization_id: str
    report: str
    kind: str  # "cost" | "usage"
    start: datetime
    end: datetime
    line_item: str
    amount: Decimal | None
    collected_at: datetime
    currency: str = "USD"
    quantity: Decimal | None = None
    outside_cost_report: bool = False

    @property
    def account(self) -> Account:
        return (self.provider, self.ai_organization_id)

    @property
    def window(self) -> tuple[str, str, str, datetime, datetime]:
        return (self.provider, self.ai_organization_id, self.report, self.start, self.end)

    @property
    def key(self) -> tuple[object, ...]:
        return (self.organization_id, self.project_id, *self.window, self.line_item)

    @property
    def midpoint(self) -> datetime:
        return self.start + (self.end - self.start) / 2

    def hours(self) -> set[datetime]:
        """The whole UTC hours whose start lies in [start, min(end, collected_at))."""
        until = min(self.end, self.collected_at)
        hour = self.start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        if hour < self.start:
            hour += HOUR
        found = set()
        while hour < until:
            found.add(hour)
            hour += HOUR
        return found

    def overlapped_hours(self) -> set[datetime]:
        """The UTC hours [start, min(end, collected_at)) overlaps: what a cost row must cover to replace usage, and
        what a counted row covers for the estimates (0025)."""
        until = min(self.end, self.collected_at)
        hour = self.start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        found = set()
        while hour < until:
            found.add(hour)
            hour += HOUR
        return found


@dataclass(frozen=True)
class Estimate:
    """One API-usage event's cost (the platform's estimate), with its model's provider (None: unknown)."""

    organization_id: uuid.UUID
    project_id: uuid.UUID | None
    user_id: uuid.UUID | None
    occurred_at: datetime
    provider: str | None
    amount: Decimal

    @property
    def hour(self) -> datetime:
        return self.occurred_at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass
class Ledger:
    """Stored lines and window revisions after applying snapshots one after the other."""

    windows: dict[tuple[str, str, str, datetime, datetime], datetime] = field(default_factory=dict)
    lines: dict[tuple[object, ...], Row] = field(default_factory=dict)
    superseded: set[tuple[object, ...]] = field(default_factory=set)

    def apply(
        self, windows: Iterable[tuple[str, str, str, datetime, datetime]], rows: Iterable[Row], collected_at: datetime
    ) -> list[Row]:
        """One snapshot message (its windows, and its lines summed per key); returns the rows whose stored state
        changed (written, revived or retired), for the evaluation it triggers."""
        changed: list[Row] = []
        fresh: set[tuple[str, str, str, datetime, datetime]] = set()
        for window in windows:
            stored = self.windows.get(window)
            if stored is not None and stored > collected_at:
                continue
            fresh.add(window)
            if stored is None or stored < collected_at:
                self.windows[window] = collected_at
                for key, line in self.lines.items():
                    if line.window == window and line.collected_at < collected_at and key not in self.superseded:
                        self.superseded.add(key)
                        changed.append(line)
        for row in rows:
            if row.window not in fresh:
                continue
            current = self.lines.get(row.key)
            if current is None or current.collected_at < row.collected_at:
                self.lines[row.key] = row
                self.superseded.discard(row.key)
                changed.append(row)
        return changed

    def current(self) -> list[Row]:
        return [line for key, line in self.lines.items() if key not in self.superseded]

    def overlaps(self, window: tuple[str, str, str, datetime, datetime]) -> bool:
        """README rule 1: another window of the same report (provider, account, report) that overlaps this one is
        stored, so the pipeline quarantines the message bringing it (``overlapping_window``) and writes nothing of
        it. (The database's functions, fed directly, still take any windows: ``apply`` does not refuse.)"""
        provider, account, report, start, end = window
        return any(
            (p, a, r) == (provider, account, report) and (s, e) != (start, end) and s < end and e > start
            for p, a, r, s, e in self.windows
        )


def sum_lines(rows: Iterable[Row]) -> list[Row]:
    """Lines of one message that share a key are summed (an unpriced one makes the sum unpriced)."""
    summed: dict[tuple[object, ...], Row] = {}
    with localcontext(EXACT):
        for row in rows:
            earlier = summed.get(row.key)
            if earlier is None:
                summed[row.key] = row
            else:
                amount = None if earlier.amount is None or row.amount is None else earlier.amount + row.amount
                quantity = (earlier.quantity or Decimal(0)) + (row.quantity or Decimal(0))
                summed[row.key] = replace(earlier, amount=amount, quantity=quantity)
    return list(summed.values())


@dataclass
class SpendModel:
    rows: list[Row]
    estimates: list[Estimate]
    account_of_project: dict[uuid.UUID, Account]

    def _scope_rows(self, scope: str, org: uuid.UUID, project: uuid.UUID | None) -> list[Row]:
        if scope == "project":
            return [r for r in self.rows if r.organization_id == org and r.project_id == project]
        return [r for r in self.rows if r.organization_id == org]

    @staticmethod
    def _counted(rows: list[Row]) -> list[Row]:
        costs = [r for r in rows if r.kind == "cost"]
        cost_hours = [(r, r.hours()) for r in costs]
        unpriced_hours = [
            (r, r.overlapped_hours())
            for r in rows
            if r.kind == "usage" and r.amount is None and (r.quantity is None or r.quantity != 0)
        ]

        def beside(k: Row, r: Row) -> bool:  # same account, and the same project or either without one
            return k.account == r.account and (
                k.project_id == r.project_id or k.project_id is None or r.project_id is None
            )

        counted = list(costs)
        for r in rows:
            if r.kind != "usage" or r.amount is None:
                continue
            mine = r.overlapped_hours()
            if not r.outside_cost_report and any(beside(k, r) and hours & mine for k, hours in cost_hours):
                continue
            # An unpriced line's hours: where no cost row of r's covers them, r neither counts nor covers.
            unpriced = {h for k, hours in unpriced_hours if beside(k, r) for h in hours & mine}
            if unpriced - {h for k, hours in cost_hours if beside(k, r) for h in hours}:
                continue
            counted.append(r)
        return counted

    def spend(
        self,
        scope: str,
        org: uuid.UUID,
        project: uuid.UUID | None,
        user: uuid.UUID | None,
        start: datetime,
        end: datetime,
        currency: str = "USD",
    ) -> Decimal:
        with localcontext(EXACT):
            return self._spend(scope, org, project, user, start, end, currency)

    def _spend(
        self,
        scope: str,
        org: uuid.UUID,
        project: uuid.UUID | None,
        user: uuid.UUID | None,
        start: datetime,
        end: datetime,
        currency: str,
    ) -> Decimal:
        total = Decimal(0)
        if scope == "user":  # the user's rollups that name the organization (0045), wherever the user is now
            for e in self.estimates:
                if (
                    e.organization_id == org
                    and e.user_id == user
                    and start <= e.hour < end
                    and (project is None or e.project_id == project)
                ):
                    total += e.amount if currency == "USD" else 0
            return total
        counted = self._counted(self._scope_rows(scope, org, project))
        for r in counted:
            if r.currency == currency and start <= r.midpoint < end:
                assert r.amount is not None
                total += r.amount
        covering = [
            (r, r.overlapped_hours()) for r in counted if r.kind == "cost" or r.quantity is None or r.quantity != 0
        ]
        for e in self.estimates:
            if e.organization_id != org or not start <= e.hour < end or currency != "USD":
                continue
            if scope == "project" and e.project_id != project:
                continue
            if e.provider is not None and any(
                r.provider == e.provider
                and e.hour in hours
                and (
                    (r.project_id is not None and r.project_id == e.project_id)
                    or (
                        r.project_id is None
                        and e.project_id is not None
                        and self.account_of_project.get(e.project_id) == r.account
                    )
                )
                for r, hours in covering
            ):
                continue
            total += e.amount
        return total

    def spend_rows(
        self,
        scope: str,
        org: uuid.UUID,
        project: uuid.UUID | None,
        user: uuid.UUID | None,
        start: datetime,
        end: datetime,
    ) -> list[tuple[str, datetime, Decimal]]:
        """The rows that count in the period, in their own currency: (currency, rate instant, amount). A provider
        row converts at its window start, an estimate at its hour (``tests/currency_model.py`` converts them).
        The same rules as ``spend`` (which sums the rows already in the budget's currency)."""
        with localcontext(EXACT):
            return self._spend_rows(scope, org, project, user, start, end)

    def _spend_rows(
        self,
        scope: str,
        org: uuid.UUID,
        project: uuid.UUID | None,
        user: uuid.UUID | None,
        start: datetime,
        end: datetime,
    ) -> list[tuple[str, datetime, Decimal]]:
        found: list[tuple[str, datetime, Decimal]] = []
        if scope == "user":
            hourly: dict[tuple[uuid.UUID | None, str | None, datetime], Decimal] = {}
            for e in self.estimates:
                if (
                    e.organization_id == org
                    and e.user_id == user
                    and start <= e.hour < end
                    and (project is None or e.project_id == project)
                ):
                    key = (e.project_id, e.provider, e.hour)
                    hourly[key] = hourly.get(key, Decimal(0)) + e.amount
            return [("USD", hour, amount) for (_, _, hour), amount in hourly.items()]
        counted = self._counted(self._scope_rows(scope, org, project))
        for r in counted:
            if start <= r.midpoint < end:
                assert r.amount is not None
                found.append((r.currency, r.start, r.amount))
        covering = [
            (r, r.overlapped_hours()) for r in counted if r.kind == "cost" or r.quantity is None or r.quantity != 0
        ]
        rollup: dict[tuple[uuid.UUID | None, str | None, datetime], Decimal] = {}
        for e in self.estimates:
            if e.organization_id != org or not start <= e.hour < end:
                continue
            if scope == "project" and e.project_id != project:
                continue
            if e.provider is not None and any(
                r.provider == e.provider
                and e.hour in hours
                and (
                    (r.project_id is not None and r.project_id == e.project_id)
                    or (
                        r.project_id is None
                        and e.project_id is not None
                        and self.account_of_project.get(e.project_id) == r.account
                    )
                )
                for r, hours in covering
            ):
                continue
            key = (e.project_id, e.provider, e.hour)
            rollup[key] = rollup.get(key, Decimal(0)) + e.amount
        # One row per hourly rollup row (project, provider, hour): the unit a conversion truncates.
        found += [("USD", hour, amount) for (_, _, hour), amount in rollup.items()]
        return found


# ------------------------------------------------------------------------------------------------- periods


def period(kind: str, tz: str, at: datetime) -> tuple[datetime, datetime]:
    """The calendar period containing ``at`` in the time zone (weeks start on Monday)."""
    zone = ZoneInfo(tz)
    local = at.astimezone(zone).date()
    if kind == "daily":
        first, after = local, local + timedelta(days=1)
    elif kind == "weekly":
        first = local - timedelta(days=local.weekday())
        after = first + timedelta(days=7)
    elif kind == "monthly":
        first = local.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    elif kind == "quarterly":
        first = local.replace(month=local.month - (local.month - 1) % 3, day=1)
        after = (first + timedelta(days=95)).replace(day=1)
    elif kind == "yearly":
        first = local.replace(month=1, day=1)
        after = first.replace(year=first.year + 1)
    else:
        raise ValueError(kind)
    return _midnight(first, zone), _midnight(after, zone)


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


def periods_overlapping(kind: str, tz: str, start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
    """The period containing ``start`` and every following one that starts before ``end``."""
    current = period(kind, tz, start)
    yield current
    while current[1] < end:
        current = period(kind, tz, current[1])
        yield current
