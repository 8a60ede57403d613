"""The expected end state of a stream, computed in plain Python with Decimal from the generator's truths.

Nothing here calls worker code: the rules are restated from the contract (README, schema comments):
- an API event is stored by its first delivery (partition order); a later delivery with the same content is
  a duplicate, one with other content is quarantined as ``conflicting_duplicate``;
- a ledger key keeps its newest revision (``collected_at``); an older or equal one changes nothing;
- rollups sum the stored events per hour; budgets follow the spend rule of ``0005_spend.sql``;
- alerts: one per (budget, period, threshold) whose level the final spend reaches, raised against the budget's
  amount and currency, first crossing; none resolved (the generated streams never lower spend: see generator).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tests.faults.generator import BudgetSpec, EventTruth, LedgerKey, LineTruth, Message, Stream

# The alert id contract (README "Alerts"): uuid5 of scope:budget:period start:threshold:amount:currency:crossing.
ALERT_NAMESPACE = uuid.UUID("6d1b6c3e-2f0a-4c55-9a1e-8b7f6c1d2e3f")
WINDOW_LOOKBACK = timedelta(days=31)

Coordinates = tuple[str, int, int]  # (kind, partition, offset)


@dataclass(frozen=True)
class Delivered:
    """A message as the broker holds it: its place in the log."""

    message: Message
    partition: int
    offset: int

    @property
    def coordinates(self) -> Coordinates:
        return (self.message.kind, self.partition, self.offset)


@dataclass
class Expected:
    cost_data: dict[LedgerKey, tuple[LineTruth, datetime, int, int]] = field(default_factory=dict)
    api_usage: dict[tuple[uuid.UUID, str], tuple[EventTruth, int, int]] = field(default_factory=dict)
    project_metrics: dict[tuple[uuid.UUID, uuid.UUID | None, datetime], list[Any]] = field(default_factory=dict)
    user_metrics: dict[tuple[uuid.UUID, datetime, uuid.UUID | None], list[Any]] = field(default_factory=dict)
    quarantine: dict[Coordinates, str] = field(default_factory=dict)
    skipped: set[Coordinates] = field(default_factory=set)  # duplicates and stale revisions
    ends: dict[tuple[str, int], int] = field(default_factory=dict)  # (kind, partition) -> next offset
    alerts: dict[uuid.UUID, tuple[str, uuid.UUID, datetime, Decimal]] = field(default_factory=dict)
    # alerts resolved (spend fell back below their level), as ``alerts``
    resolved: dict[uuid.UUID, tuple[str, uuid.UUID, datetime, Decimal]] = field(default_factory=dict)

    @property
    def stored(self) -> set[Coordinates]:
        found = {("bucket", p, o) for _, _, p, o in self.cost_data.values()}
        return found | {("event", p, o) for _, p, o in self.api_usage.values()}

    @property
    def delivered(self) -> int:
        return sum(self.ends.values())


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def expect(deliveries: Iterable[Delivered], *, applied_in_order: bool = False) -> Expected:
    """Tables, quarantine and offsets after every delivery was consumed once, in partition order (or, with
    ``applied_in_order``, in the order given: how a test that feeds batches itself applied them)."""
    result = Expected()
    deliveries = list(deliveries)
    ordered = deliveries if applied_in_order else sorted(deliveries, key=lambda d: d.coordinates)
    for delivered in ordered:
        message = delivered.message
        where = delivered.coordinates
        result.ends[(message.kind, delivered.partition)] = max(
            result.ends.get((message.kind, delivered.partition), 0), delivered.offset + 1
        )
        if message.bad is not None:
            result.quarantine[where] = message.bad
        elif message.event is not None:
            event = message.event
            key = (event.organization_id, event.event_id)
            first = result.api_usage.get(key)
            if first is None:
                result.api_usage[key] = (event, delivered.partition, delivered.offset)
            elif first[0] == event:
                result.skipped.add(where)
            else:
                result.quarantine[where] = "conflicting_duplicate"
        else:
            assert message.collected_at is not None
            for line in message.lines:
                current = result.cost_data.get(line.key)
                if current is None or message.collected_at > current[1]:
                    result.cost_data[line.key] = (line, message.collected_at, delivered.partition, delivered.offset)
    stored = result.stored
    for delivered in deliveries:
        where = delivered.coordinates
        if where not in stored and where not in result.quarantine:
            result.skipped.add(where)

    for event, _, _ in result.api_usage.values():
        hour = hour_of(event.occurred_at)
        error = 1 if event.status_code >= 400 else 0
        row = result.project_metrics.setdefault(
            (event.organization_id, event.project_id, hour), [0, 0, 0, 0, 0, Decimal(0), 0, 0]
        )
        for index, value in enumerate(
            (1, error, event.prompt_tokens, event.completion_tokens, event.total_tokens, event.cost_usd)
        ):
            row[index] += value
        row[6] += event.response_time_ms
        row[7] = max(row[7], event.response_time_ms)
        if event.user_id is not None:
            user = result.user_metrics.setdefault((event.user_id, hour, event.project_id), [0, 0, Decimal(0)])
            user[0] += 1
            user[1] += event.total_tokens
            user[2] += event.cost_usd
    return result


# ---------------------------------------------------------------------------------------------- spend


class Spend:
    """The spend rule of ``0005_spend.sql``, over an expected end state."""

    def __init__(self, stream: Stream, expected: Expected) -> None:
        self.lines = [line for line, _, _, _ in expected.cost_data.values()]
        self.metrics = expected.project_metrics
        self.users = expected.user_metrics
        self.account_of_project: dict[uuid.UUID, tuple[str, str]] = {
            project: (org.provider, org.ai_org) for org in stream.orgs for project in org.projects.values()
        }

    @staticmethod
    def _hours(start: datetime, end: datetime) -> Iterable[datetime]:
        hour = hour_of(start)
        if hour < start:
            hour += timedelta(hours=1)
        while hour < end:
            yield hour
            hour += timedelta(hours=1)

    def _windows(self, rows: list[LineTruth], start: datetime, end: datetime) -> list[LineTruth]:
        return [
            r
            for r in rows
            if r.bucket_start < end and r.bucket_start >= start - WINDOW_LOOKBACK and r.bucket_end > start
        ]

    def _counted(self, rows: list[LineTruth], start: datetime, end: datetime, group: Any) -> Decimal:
        in_period = [r for r in rows if start <= r.bucket_start < end]
        costed = {group(r) for r in in_period if r.api_version == "costs_v1"}
        return sum(
            (
                r.amount
                for r in in_period
                if r.currency == "USD" and (r.api_version == "costs_v1" or group(r) not in costed)
            ),
            Decimal(0),
        )

    def project(self, org: uuid.UUID, project: uuid.UUID, start: datetime, end: datetime) -> Decimal:
        rows = [r for r in self.lines if r.project_id == project]
        provider = self._counted(rows, start, end, lambda r: (r.bucket_start, r.bucket_end))
        covered = {h for w in self._windows(rows, start, end) for h in self._hours(w.bucket_start, w.bucket_end)}
        estimate = sum(
            (
                values[5]
                for (o, p, hour), values in self.metrics.items()
                if o == org and p == project and start <= hour < end and hour not in covered
            ),
            Decimal(0),
        )
        return provider + estimate

    def organization(self, org: uuid.UUID, start: datetime, end: datetime) -> Decimal:
        rows = [r for r in self.lines if r.organization_id == org]
        provider = self._counted(
            rows, start, end, lambda r: (r.project_id, r.provider, r.ai_organization_id, r.bucket_start, r.bucket_end)
        )
        windows = self._windows(rows, start, end)
        covered_projects = {
            (w.project_id, h)
            for w in windows
            if w.project_id is not None
            for h in self._hours(w.bucket_start, w.bucket_end)
        }
        covered_accounts = {
            (w.provider, w.ai_organization_id, h)
            for w in windows
            if w.project_id is None
            for h in self._hours(w.bucket_start, w.bucket_end)
        }
        estimate = Decimal(0)
        for (o, project, hour), values in self.metrics.items():
            if o != org or not start <= hour < end:
                continue
            if project is not None and (project, hour) in covered_projects:
                continue
            account = self.account_of_project.get(project) if project is not None else None
            if account is not None and (*account, hour) in covered_accounts:
                continue
            estimate += values[5]
        return provider + estimate

    def user(self, user: uuid.UUID, project: uuid.UUID | None, start: datetime, end: datetime) -> Decimal:
        return sum(
            (
                values[2]
                for (u, hour, p), values in self.users.items()
                if u == user and start <= hour < end and (project is None or p == project)
            ),
            Decimal(0),
        )

    def __call__(
        self,
        scope: str,
        org: uuid.UUID,
        project: uuid.UUID | None,
        user: uuid.UUID | None,
        start: datetime,
        end: datetime,
    ) -> Decimal:
        if scope == "organization":
            return self.organization(org, start, end)
        if scope == "project":
            assert project is not None
            return self.project(org, project, start, end)
        assert user is not None
        return self.user(user, project, start, end)


def period(kind: str, at: datetime) -> tuple[datetime, datetime]:
    """UTC calendar periods (the generator's budgets are all in UTC)."""
    at = at.astimezone(UTC)
    if kind == "daily":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    assert kind == "monthly"
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + timedelta(days=32)).replace(day=1)
    return start, following


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def alert_id(
    scope: str, budget: uuid.UUID, period_start: datetime, threshold: Decimal, amount: Decimal, crossing: int = 1
) -> uuid.UUID:
    name = f"{scope}:{budget}:{period_start.isoformat()}:{_plain(threshold)}:{_plain(amount)}:USD:{crossing}"
    return uuid.uuid5(ALERT_NAMESPACE, name)


def expected_alerts(stream: Stream, expected: Expected, budgets: list[BudgetSpec]) -> dict[uuid.UUID, Any]:
    """One alert per (budget, period with data, threshold) the final spend reaches."""
    spend = Spend(stream, expected)
    moments = {line.bucket_start for line in spend.lines} | {hour for (_, _, hour) in expected.project_metrics}
    alerts: dict[uuid.UUID, tuple[str, uuid.UUID, datetime, Decimal]] = {}
    for budget in budgets:
        periods = {period(budget.period, moment) for moment in moments}
        for start, end in sorted(periods):
            total = spend(budget.scope, budget.organization_id, budget.project_id, budget.user_id, start, end)
            for threshold in budget.thresholds:
                if total > 0 and total * 100 >= budget.amount * threshold:
                    alerts[alert_id(budget.scope, budget.id, start, threshold, budget.amount)] = (
                        budget.scope,
                        budget.id,
                        start,
                        threshold,
                    )
    return alerts


def planned(stream: Stream) -> list[Delivered]:
    """Offsets as a producer sending the stream in order to empty partitions would get them."""
    nxt: dict[tuple[str, int], int] = defaultdict(int)
    out = []
    for message in stream.messages:
        offset = nxt[(message.kind, message.partition)]
        nxt[(message.kind, message.partition)] += 1
        out.append(Delivered(message, message.partition, offset))
    return out


def prepare(stream: Stream) -> None:
    """Size the stream's budgets from its expected spend (content only: offsets do not matter here)."""
    from tests.faults.generator import choose_budgets  # noqa: PLC0415 - avoids a cycle at import

    stream.budgets = choose_budgets(stream, Spend(stream, expect(planned(stream))))


def full_expectation(stream: Stream, deliveries: list[Delivered]) -> Expected:
    expected = expect(deliveries)
    expected.alerts = expected_alerts(stream, expected, stream.budgets)
    return expected
