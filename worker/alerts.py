"""Budget alerts: the stable alert id and the message published to the alerts topic.

Message (JSON, key = budget id). Money is a decimal string, never a float:
    {"alert_id": "...", "scope": "project", "organization_id": "...", "project_id": "...", "user_id": null,
     "budget_id": "...", "budget_name": "...", "period": "monthly", "timezone": "Europe/Berlin",
     "period_start": "2026-11-01T00:00:00+01:00", "period_end": "...", "threshold_percent": "80",
     "spend": "812.50", "amount": "1000", "currency": "EUR", "percent_used": "81.25",
     "raised_at": "2026-11-21T10:00:00.123456+00:00"}
The alert id is derived from (scope, budget, period start, threshold), so every publication of the same
crossing carries the same id and consumers can dedupe on it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from zoneinfo import ZoneInfo

ALERT_NAMESPACE = uuid.UUID("6d1b6c3e-2f0a-4c55-9a1e-8b7f6c1d2e3f")
PERCENT_QUANTUM = Decimal("0.01")


def alert_id(scope: str, budget_id: uuid.UUID, period_start: datetime, threshold: Decimal) -> uuid.UUID:
    return uuid.uuid5(ALERT_NAMESPACE, f"{scope}:{budget_id}:{period_start.isoformat()}:{_plain(threshold)}")


def _plain(value: Decimal) -> str:
    """Decimal without exponent or trailing zeros: 80, 80.5, 0.000001 (thresholds)."""
    return format(value.normalize(), "f")


def _money(value: Decimal) -> str:
    """Decimal as computed, never in exponent notation: 8.00 stays 8.00."""
    return format(value, "f")


@dataclass(frozen=True, slots=True)
class Alert:
    scope: str
    budget_id: uuid.UUID
    budget_name: str
    organization_id: uuid.UUID
    project_id: uuid.UUID | None
    user_id: uuid.UUID | None
    period: str
    timezone: str
    period_start: datetime
    period_end: datetime
    threshold: Decimal
    spend: Decimal
    amount: Decimal
    currency: str
    raised_at: datetime

    @property
    def id(self) -> uuid.UUID:
        return alert_id(self.scope, self.budget_id, self.period_start, self.threshold)

    @property
    def percent_used(self) -> Decimal:
        return (self.spend * 100 / self.amount).quantize(PERCENT_QUANTUM, rounding=ROUND_HALF_EVEN)

    @property
    def key(self) -> bytes:
        return str(self.budget_id).encode()

    def message(self) -> bytes:
        zone = ZoneInfo(self.timezone)
        body = {
            "alert_id": str(self.id),
            "scope": self.scope,
            "organization_id": str(self.organization_id),
            "project_id": str(self.project_id) if self.project_id else None,
            "user_id": str(self.user_id) if self.user_id else None,
            "budget_id": str(self.budget_id),
            "budget_name": self.budget_name,
            "period": self.period,
            "timezone": self.timezone,
            "period_start": self.period_start.astimezone(zone).isoformat(),
            "period_end": self.period_end.astimezone(zone).isoformat(),
            "threshold_percent": _plain(self.threshold),
            "spend": _money(self.spend),
            "amount": _money(self.amount),
            "currency": self.currency,
            "percent_used": _money(self.percent_used),
            "raised_at": self.raised_at.isoformat(),
        }
        return json.dumps(body, separators=(",", ":")).encode()
