"""The typed rows the batch steps hand to ``worker.store`` (and the typed answers it gives back).

The store turns each sequence of rows into the column arrays its statement takes, in the order the fields are
declared here: a field's position is its parameter's position, so adding a column is one edit in each place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import ClassVar, NamedTuple, Protocol
from uuid import UUID

from worker.decode import ApiEvent
from worker.providers import LedgerLine
from worker.quarantine import Source
from worker.touches import Touch

Scope = tuple[UUID, UUID | None, UUID | None]  # an event's (organization, project, user)
ScopeKey = tuple[int, int, int]  # the same as ints, -1 for none (hashing a UUID object runs Python code)


def scope_key(event: ApiEvent) -> ScopeKey:
    project, user = event.project_id, event.user_id
    return event.organization_id.int, -1 if project is None else project.int, -1 if user is None else user.int


@dataclass(slots=True)
class UsageRows:
    """A batch's ``api_usage`` rows, column-wise (no object per event on the hot path): the events, whose fields
    the store reads by name, and per event what pricing adds."""

    # The fields of insert_api_usage's row type (cost_worker_api_usage_input, 0015), in order: these fields of each
    # event (ApiEvent's leading fields, in the same order), then the three lists below.
    EVENT_FIELDS: ClassVar[tuple[str, ...]] = (
        "organization_id",
        "event_id",
        "project_id",
        "user_id",
        "endpoint",
        "method",
        "status_code",
        "response_time_ms",
        "occurred_at",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "model",
        "cost_usd",
        "source_partition",
        "source_offset",
    )

    events: list[ApiEvent]
    providers: list[str | None]  # of each event's model (None: unknown model)
    estimates: list[Decimal | None]  # the catalogue's price when the platform sent no cost_usd
    estimate_sources: list[str | None]
    # The events' distinct (organization, project, user), keyed by ``scope_key``: what the reference check reads,
    # built before the transaction (None: not built; ``worker.usage`` builds it then).
    scopes: dict[ScopeKey, Scope] | None = None

    def __len__(self) -> int:
        return len(self.events)

    def only(self, indexes: Iterable[int]) -> UsageRows:
        """The rows at these positions, in this order."""
        keep = list(indexes)
        return UsageRows(
            [self.events[i] for i in keep],
            [self.providers[i] for i in keep],
            [self.estimates[i] for i in keep],
            [self.estimate_sources[i] for i in keep],
        )


@dataclass(frozen=True, slots=True)
class UsageStored:
    """What ``insert_api_usage`` did: events inserted, the scopes they touched in organizations that have an active
    budget (no other scope has anything to evaluate), and (organization, occurred_at, event id) of the events stored
    before with different content."""

    inserted: int
    touched: list[Touch]
    conflicts: list[tuple[UUID, datetime, str]]


class WindowKey(NamedTuple):
    """One window of one provider report of one provider account: what a bucket is a snapshot of."""

    provider: str
    ai_organization_id: str
    report: str
    start: datetime
    end: datetime


class LedgerKey(NamedTuple):
    """The ledger's dedupe grain: a line item of a window, attributed to a project (or an organization)."""

    organization_id: UUID
    project_id: UUID | None
    provider: str
    ai_organization_id: str
    report: str
    bucket_start: datetime
    bucket_end: datetime
    line_item: str

    @property
    def window(self) -> WindowKey:
        return WindowKey(self.provider, self.ai_organization_id, self.report, self.bucket_start, self.bucket_end)

    def order(self) -> tuple[object, ...]:
        """The order rows are written (and locked) in, the same in every worker."""
        project = self.project_id.int if self.project_id else -1
        return (project, *self[2:], self.organization_id.int)


@dataclass(slots=True)
class LedgerRow:
    """A ``cost_data`` row: an attributed, priced line of the batch's newest revision of its window."""

    key: LedgerKey
    line: LedgerLine
    message: int  # index of the message in the batch
    collected_at: datetime
    source: Source


@dataclass(frozen=True, slots=True)
class WindowRevision:
    """A window, the newest revision of it in the batch, and the organizations whose lines it holds."""

    window: WindowKey
    collected_at: datetime
    organization_ids: frozenset[UUID]


@dataclass(frozen=True, slots=True)
class WindowStates:
    """``upsert_cost_windows``' answer: per window advanced, same or stale, and every organization that ever had
    lines in the windows."""

    states: dict[WindowKey, str]
    organizations: dict[int, UUID]


@dataclass(frozen=True, slots=True)
class Retired:
    """A stored line a newer snapshot of its window no longer has."""

    organization_id: UUID
    project_id: UUID | None
    api_version: str
    window: WindowKey


class ProjectLink(NamedTuple):
    """A project and the provider ids it is known by (``lookup_provider_projects``)."""

    organization_id: UUID
    project_id: UUID
    ai_provider: str | None
    ai_organization_id: str | None
    ai_project_id: str | None
    openai_project_id: str | None


@dataclass(frozen=True, slots=True)
class Rate:
    """An exchange rate (``exchange_rates``): one ``base`` is ``rate`` ``quote`` from ``effective_date`` on."""

    base: str
    quote: str
    effective_date: date
    rate: Decimal


class BudgetPeriod(Protocol):
    """A budget in one period, as the spend queries read it (``worker.budgets.Candidate``)."""

    @property
    def scope(self) -> str: ...
    @property
    def organization_id(self) -> UUID: ...
    @property
    def project_id(self) -> UUID | None: ...
    @property
    def user_id(self) -> UUID | None: ...
    @property
    def period_start(self) -> datetime: ...
    @property
    def period_end(self) -> datetime: ...
    @property
    def currency(self) -> str: ...
