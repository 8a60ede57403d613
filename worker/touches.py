"""What a batch hands to budget evaluation: the scopes whose spend changed, and when.

The ledger and API-usage steps produce ``Touch``es; ``worker.budgets`` consumes them. Neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID


@dataclass(frozen=True, slots=True)
class Touch:
    """A scope whose spend changed, and when: budgets evaluate the period that contains ``at`` (an estimate's
    hour; a provider row's window midpoint, the period the row counts in) and, for a provider row, every other
    period its window ``[span_start, span_end)`` overlaps (the hours it covers, or stops covering, may be there)."""

    organization_id: UUID
    project_id: UUID | None
    user_id: UUID | None
    at: datetime
    span_start: datetime | None = None
    span_end: datetime | None = None


def midpoint(start: datetime, end: datetime) -> datetime:
    """The instant that decides the budget period of a provider row (README "What counts as spend")."""
    return start + (end - start) / 2


def provider_touch(organization: UUID, project: UUID | None, start: datetime, end: datetime) -> Touch:
    """The scope a provider row's change touches: its own (and its organization's). A row without a project
    touches only the organization: project budgets see their projects' own rows. The span starts at the UTC hour
    the window starts in: a row covers the estimates of every hour its window overlaps (migration 0025), and a
    minute bucket at 18:40 UTC covers the estimate of 18:00, which counts in the Asia/Kolkata day before it."""
    hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return Touch(organization, project, None, midpoint(start, end), hour, end)
