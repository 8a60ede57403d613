"""The expected end state of a stream, computed in plain Python with Decimal from the generator's truths.

Nothing here calls worker code: the rules are restated from the contract (README, schema comments):
- an API event (key: organization, occurred_at, event_id) is stored by its first delivery (partition order),
  wherever batches are cut; a later delivery with the same content is a duplicate, one with other content is
  quarantined as ``conflicting_duplicate``;
- a ledger key keeps its newest revision (``collected_at``); an older or equal one changes nothing;
- rollups sum the stored events per hour; budgets follow the spend rule of ``0006_spend_rules.sql`` (the
  independent model of ``tests/spend_model.py``);
- alerts: one per (budget, period, threshold) whose level the final spend reaches, raised against the budget's
  amount and currency, first crossing; none resolved (the generated streams never lower spend: see generator),
  except after ``generator.lowered`` revisions (``harness.verify(earlier=...)``).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tests.faults.generator import MODEL, BudgetSpec, EventTruth, LedgerKey, LineTruth, Message, Stream
from tests.spend_model import Estimate, Row, SpendModel

# The provider the price catalogue gives the generator's event model (its estimates are replaced by OpenAI data).
MODEL_PROVIDERS = {MODEL: "openai"}

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
    api_usage: dict[tuple[uuid.UUID, datetime, str], tuple[EventTruth, int, int]] = field(default_factory=dict)
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
            key = (event.organization_id, event.occurred_at, event.event_id)
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
    """The spend rule of ``0006_spend_rules.sql`` over an expected end state, through the independent model in
    ``tests/spend_model.py`` (the generator's lines are closed daily buckets whose revisions keep every line, so
    the stored rows are the current snapshot; its events all use ``MODEL``, an OpenAI model)."""

    def __init__(self, stream: Stream, expected: Expected) -> None:
        self.lines = [line for line, _, _, _ in expected.cost_data.values()]
        rows = [
            Row(
                organization_id=line.organization_id,
                project_id=line.project_id,
                provider=line.provider,
                ai_organization_id=line.ai_organization_id,
                report=f"{line.provider}.{line.api_version}",
                kind="cost" if line.api_version == "costs_v1" else "usage",
                start=line.bucket_start,
                end=line.bucket_end,
                line_item=line.line_item,
                amount=line.amount,
                collected_at=collected,
                currency=line.currency,
                quantity=line.quantity,
            )
            for line, collected, _, _ in expected.cost_data.values()
        ]
        estimates = [
            Estimate(
                event.organization_id,
                event.project_id,
                event.user_id,
                event.occurred_at,
                MODEL_PROVIDERS[event.model],
                event.cost_usd,
            )
            for event, _, _ in expected.api_usage.values()
        ]
        account_of_project: dict[uuid.UUID, tuple[str, str]] = {
            project: (org.provider, org.ai_org) for org in stream.orgs for project in org.projects.values()
        }
        self.model = SpendModel(rows, estimates, account_of_project)

    def __call__(
        self,
        scope: str,
        org: uuid.UUID,
        project: uuid.UUID | None,
        user: uuid.UUID | None,
        start: datetime,
        end: datetime,
    ) -> Decimal:
        return self.model.spend(scope, org, project, user, start, end)


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
    moments = {line.bucket_start + (line.bucket_end - line.bucket_start) / 2 for line in spend.lines} | {
        hour for (_, _, hour) in expected.project_metrics
    }
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
