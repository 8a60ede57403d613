"""The typed rows the batch steps hand to ``worker.store`` (and the typed answers it gives back).

The store turns each sequence of rows into the column arrays its statement takes, in the order the fields are
declared here: a field's position is its parameter's position, so adding a column is one edit in each place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple, Protocol
from uuid import UUID

from worker.providers import LedgerLine
from worker.quarantine import Source
from worker.touches import Touch


class UsageRow(NamedTuple):
    """One ``api_usage`` row: ``insert_api_usage``'s parameters, in order. (A NamedTuple: one per event.)"""

    organization_id: UUID
    event_id: str
    project_id: UUID | None
    user_id: UUID | None
    endpoint: str
    method: str
    status_code: int
    response_time_ms: int | None
    occurred_at: datetime
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    model: str | None
    cost_usd: Decimal | None
    source_partition: int
    source_offset: int
    provider: str | None  # of the model (None: unknown model)
    estimate: Decimal | None  # the catalogue's price when the platform sent no cost_usd
    estimate_source: str | None


@dataclass(frozen=True, slots=True)
class UsageStored:
    """What ``insert_api_usage`` did: events inserted, the scopes they touched, and (organization, event id) of
    the events stored before with different content."""

    inserted: int
    touched: list[Touch]
    conflicts: list[tuple[UUID, str]]


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
