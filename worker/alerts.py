"""Budget alerts: the stable alert id and the messages published to the alerts topic.

Two messages (JSON, key = budget id, money as decimal strings, never floats):
- ``budget.alert.triggered``: spend reached a threshold of the budget as it is (amount, currency):
    {"type": "budget.alert.triggered", "alert_id": "...", "crossing": 1, "scope": "project",
     "organization_id": "...", "project_id": "...", "user_id": null, "budget_id": "...", "budget_name": "...",
     "period": "monthly", "timezone": "Europe/Berlin", "period_start": "2026-11-01T00:00:00+01:00",
     "period_end": "...", "threshold_percent": "80", "spend": "812.5", "amount": "1000", "currency": "EUR",
     "percent_used": "81.25", "raised_at": "2026-11-21T10:00:00.123456+00:00"}
- ``budget.alert.resolved``: spend fell back below the level of a triggered alert in the same period (a
  revision lowered it). The same fields, with the ``alert_id``, ``crossing``, ``amount``, ``currency`` and
  ``raised_at`` of the alert it resolves, the spend now, and ``resolved_at``.
The alert id is derived from (scope, budget, period start, threshold, amount, currency, crossing): every
publication of one crossing carries the same id, an alert at 80 % of 100 differs from one at 80 % of 200, and
a threshold crossed again after it was resolved gets a new id (the next crossing). A resolved message's
delivery id is ``<alert_id>:resolved``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

ALERT_NAMESPACE = uuid.UUID("6d1b6c3e-2f0a-4c55-9a1e-8b7f6c1d2e3f")
PERCENT_QUANTUM = Decimal("0.01")


TRIGGERED = "budget.alert.triggered"
RESOLVED = "budget.alert.resolved"


def alert_id(
    scope: str,
    budget_id: uuid.UUID,
    period_start: datetime,
    threshold: Decimal,
    *,
    amount: Decimal,
    currency: str,
    crossing: int,
) -> uuid.UUID:
    return uuid.uuid5(
        ALERT_NAMESPACE,
        f"{scope}:{budget_id}:{period_start.isoformat()}:{_plain(threshold)}:{_plain(amount)}:{currency}:{crossing}",
    )


# IANA zones that PostgreSQL's Default abbreviation set also names, with another meaning: it reads them as these fixed
# offsets (`SELECT abbrev, utc_offset FROM pg_timezone_abbrevs`), in any case. The others both know (EST, MST, HST,
# GMT, UTC, UCT, Zulu) are fixed offsets in both.
ABBREVIATION_ZONES: dict[str, tzinfo] = {
    "cet": timezone(timedelta(hours=1)),
    "eet": timezone(timedelta(hours=2)),
    "met": timezone(timedelta(hours=1)),
    "wet": timezone(timedelta(hours=0)),
}


@lru_cache(maxsize=1)
def _zone_names() -> dict[str, str]:
    return {name.lower(): name for name in available_timezones()}


@lru_cache(maxsize=256)
def zone(name: str) -> tzinfo:
    """The budget's time zone for showing its period. The budgets' CHECK accepts every name PostgreSQL knows, which
    computes the periods: its zone names in any case (``europe/berlin`` is Europe/Berlin there, and here), and also
    abbreviations (``PST``) and POSIX specs (``UTC+3``) that are no IANA zone. Those are shown in UTC: the instants
    stay PostgreSQL's (right), only their offset is not the local one. Never raises (a batch must not fail on it).
    A name that is an IANA zone and also an abbreviation of PostgreSQL's Default set (``timezone_abbreviations``)
    means the abbreviation's fixed offset there, so it is shown at that offset (``CET``: +01:00 all year, as its
    periods are computed; ZoneInfo('CET') showed a summer day as starting at 01:00+02:00)."""
    fixed = ABBREVIATION_ZONES.get(name.lower())
    if fixed is not None:
        return fixed
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    canonical = _zone_names().get(name.lower())
    if canonical is not None:
        try:
            return ZoneInfo(canonical)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    return UTC


def percent(spend: Decimal, amount: Decimal, quantum: Decimal = PERCENT_QUANTUM) -> Decimal:
    """spend * 100 / amount rounded half-even to ``quantum``, once, from the exact quotient. Decimal division rounds
    to its context's precision first (28 digits by default), and a quotient just below a half-way point (80.01499...
    past the 28th digit) would become the half-way point and then round up (80.02). The result is built from its
    digits, never through a context: a tiny budget (the CHECK is `amount > 0`: 1e-60 USD) has a percentage of more
    digits than any context holds (1 USD of it: 1e62 %, 65 digits at cents), and quantize raised InvalidOperation."""
    places = -int(quantum.as_tuple().exponent)
    exact = Fraction(spend) * 100 / Fraction(amount)
    scaled = round(exact * 10**places)  # half-even, on the exact fraction: an int
    return Decimal(f"{scaled}E{-places}")  # exact, whatever its length


def _plain(value: Decimal) -> str:
    """Decimal without exponent or trailing zeros, exactly: 80, 80.5, 0.000001 (thresholds, amounts in the id).
    No context: normalize rounds (the default context at 28 digits, EXACT at 60), and 1 and 1 + 1e-69 USD gave one
    alert id, so the alert at the second amount was dropped as a conflict with the first's."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


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
    crossing: int = 1

    @property
    def id(self) -> uuid.UUID:
        return alert_id(
            self.scope,
            self.budget_id,
            self.period_start,
            self.threshold,
            amount=self.amount,
            currency=self.currency,
            crossing=self.crossing,
        )

    @property
    def percent_used(self) -> Decimal:
        return percent(self.spend, self.amount)

    @property
    def key(self) -> bytes:
        return str(self.budget_id).encode()

    def message(self) -> bytes:
        return _dumps(self.body())

    def body(self) -> dict[str, object]:
        local = zone(self.timezone)
        return {
            "type": TRIGGERED,
            "alert_id": str(self.id),
            "crossing": self.crossing,
            "scope": self.scope,
            "organization_id": str(self.organization_id),
            "project_id": str(self.project_id) if self.project_id else None,
            "user_id": str(self.user_id) if self.user_id else None,
            "budget_id": str(self.budget_id),
            "budget_name": self.budget_name,
            "period": self.period,
            "timezone": self.timezone,
            "period_start": self.period_start.astimezone(local).isoformat(),
            "period_end": self.period_end.astimezone(local).isoformat(),
            "threshold_percent": _plain(self.threshold),
            "spend": _money(self.spend),
            "amount": _money(self.amount),
            "currency": self.currency,
            "percent_used": _money(self.percent_used),
            "raised_at": self.raised_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Resolution:
    """An alert whose level spend fell back below: ``alert`` as it was raised (its stored id, crossing and
    raised_at), ``spend`` now."""

    alert_id: uuid.UUID
    alert: Alert
    spend: Decimal
    resolved_at: datetime

    @property
    def key(self) -> bytes:
        return self.alert.key

    @property
    def scope(self) -> str:
        return self.alert.scope

    @property
    def budget_id(self) -> uuid.UUID:
        return self.alert.budget_id

    @property
    def threshold(self) -> Decimal:
        return self.alert.threshold

    @property
    def delivery_id(self) -> str:
        return f"{self.alert_id}:resolved"

    @property
    def percent_used(self) -> Decimal:
        return percent(self.spend, self.alert.amount)

    def message(self) -> bytes:
        body = self.alert.body() | {
            "type": RESOLVED,
            "alert_id": str(self.alert_id),
            "spend": _money(self.spend),
            "percent_used": _money(self.percent_used),
            "resolved_at": self.resolved_at.isoformat(),
        }
        return _dumps(body)


def _dumps(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
