"""An independent model, in plain Python ``Decimal``, of currency conversion and the alert lifecycle.

Restated from the contract (README "Budgets in any currency" and "Alerts"), never from worker code:
- a rate (base, quote, date) says 1 base = rate quote, effective on its date and the 6 days after it;
- a row in currency C counts in a budget in currency B as: itself when C = B; else amount * num / den with
  (num, den) = (rate C->B, 1), else (1, rate B->C), else (rate EUR->B, rate EUR->C), each the newest effective
  rate on the UTC date of the row's rate_at; truncated toward zero at 20 decimal places;
- one row without a rate makes the budget unconvertible: no spend, nothing raised or resolved;
- per (budget, period, threshold, amount, currency) at most one alert is open: reaching the level with none
  open raises crossing n+1; falling below it with one open resolves it; ids are uuid5 of
  scope:budget:period start:threshold:amount:currency:crossing;
- a period is judged by the budget's terms (amount, currency, thresholds) as they are while it is open, and once it
  has ended by those in force when it ended: the newest change made before its end (a budget's first terms hold
  since ever);
- the periods touched data is judged in are those of the budget's kind and zone as they are (the period containing
  the data's instant, and for a provider row every period its window overlaps); where the terms in force at such a
  period's end, ended, had another kind or zone, that period was no period of the budget then: the data's periods
  under that kind and zone are judged instead, each by the terms in force at its end when those have that kind and
  zone (ended periods only); where none does, the budget as it is judges the period computed today;
- an alert is open for its period (start and end); the crossing number counts every alert at that start,
  threshold, amount and currency, whatever its end.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal, localcontext
from fractions import Fraction
from typing import NamedTuple

from tests.spend_model import EXACT, period, periods_overlapping

ALERT_NAMESPACE = uuid.UUID("6d1b6c3e-2f0a-4c55-9a1e-8b7f6c1d2e3f")
RATE_VALID = timedelta(days=7)  # a rate's date and the 6 days after it
QUANTUM = Decimal("1e-20")

Rates = dict[tuple[str, str, date], Decimal]


def _newest(rates: Rates, base: str, quote: str, day: date) -> Decimal | None:
    found = [(d, r) for (b, q, d), r in rates.items() if b == base and q == quote and day - RATE_VALID < d <= day]
    return max(found)[1] if found else None


def factor(rates: Rates, frm: str, to: str, day: date) -> tuple[Decimal, Decimal] | None:
    if frm == to:
        return Decimal(1), Decimal(1)
    direct = _newest(rates, frm, to, day)
    if direct is not None:
        return direct, Decimal(1)
    inverse = _newest(rates, to, frm, day)
    if inverse is not None:
        return Decimal(1), inverse
    if "EUR" in (frm, to):
        return None
    eur_to, eur_from = _newest(rates, "EUR", to, day), _newest(rates, "EUR", frm, day)
    if eur_to is None or eur_from is None:
        return None
    return eur_to, eur_from


def convert(amount: Decimal, num: Decimal, den: Decimal) -> Decimal:
    if num == 1 and den == 1:
        return amount
    with localcontext() as ctx:
        ctx.prec = 200
        return (amount * num / den).quantize(QUANTUM, rounding=ROUND_DOWN)


@dataclass(frozen=True)
class Row:
    currency: str
    rate_at: datetime
    amount: Decimal


def spend(rows: list[Row], currency: str, rates: Rates) -> Decimal | None:
    """The budget's spend in its currency, or None when a rate is missing (unconvertible)."""
    total = Decimal(0)
    for row in rows:
        found = factor(rates, row.currency, currency, row.rate_at.date())
        if found is None:
            return None
        converted = convert(row.amount, *found)
        with localcontext(EXACT):  # summed exactly, as NUMERIC does (not at the default context's 28 digits)
            total += converted
    return total


def _plain(value: Decimal) -> str:
    """Without exponent or trailing zeros, exactly (no context: ``normalize`` would round at 28 digits)."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def alert_id(
    scope: str,
    budget: uuid.UUID,
    period_start: datetime,
    threshold: Decimal,
    amount: Decimal,
    currency: str,
    crossing: int,
) -> uuid.UUID:
    name = f"{scope}:{budget}:{period_start.isoformat()}:{_plain(threshold)}:{_plain(amount)}:{currency}:{crossing}"
    return uuid.uuid5(ALERT_NAMESPACE, name)


class BudgetTerms(NamedTuple):
    amount: Decimal
    currency: str
    thresholds: tuple[Decimal, ...]
    period: str = "monthly"  # the period kind
    timezone: str = "UTC"


class Judged(NamedTuple):
    """A period of a budget, with the terms that judge it (the period's kind and zone: the terms', or today's)."""

    period: str
    timezone: str
    start: datetime
    end: datetime
    terms: BudgetTerms
    why: str  # "open", "ended" (the terms then), "moved" (the kind or zone then) or "as today" (neither)


class Touched(NamedTuple):
    """Data that changed: its instant (a provider row's window midpoint, an estimate's hour) and, for a provider row,
    its span (from the UTC hour its window starts in to its end)."""

    at: datetime
    span: tuple[datetime, datetime] | None = None

    def periods(self, kind: str, tz: str) -> set[tuple[datetime, datetime]]:
        found = {period(kind, tz, self.at)}
        if self.span is not None:
            found |= set(periods_overlapping(kind, tz, *self.span))
        return found

    def within(self, start: datetime, end: datetime) -> bool:
        inside = start <= self.at < end
        return inside or (self.span is not None and self.span[0] < end and self.span[1] > start)


@dataclass
class Terms:
    """A budget's terms through its changes: each version since when it holds, and today's (the last change made,
    whatever the moment it holds from)."""

    current: BudgetTerms
    versions: list[tuple[datetime, BudgetTerms]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.versions.append((datetime.min.replace(tzinfo=UTC), self.current))

    def change(self, at: datetime, terms: BudgetTerms) -> None:
        self.current = terms
        self.versions.append((at, terms))

    def at_end(self, period_end: datetime, now: datetime) -> BudgetTerms | None:
        """The terms in force when the period ending at ``period_end`` ended, or None while it is open."""
        if period_end > now:
            return None
        return max((v for v in self.versions if v[0] < period_end), key=lambda v: v[0])[1]

    def judging(self, period_end: datetime, now: datetime) -> BudgetTerms:
        """The amount, currency and thresholds that judge the period ending at ``period_end``."""
        return self.at_end(period_end, now) or self.current

    def judged(self, touched: list[Touched], now: datetime) -> set[Judged]:
        """The periods an evaluation of the touched data judges, each with its terms."""
        today = self.current
        found: set[Judged] = set()
        for start, end in set().union(*(t.periods(today.period, today.timezone) for t in touched)):
            then = self.at_end(end, now)
            if then is None:
                found.add(Judged(today.period, today.timezone, start, end, today, "open"))
                continue
            if (then.period, then.timezone) == (today.period, today.timezone):
                found.add(Judged(today.period, today.timezone, start, end, then, "ended"))
                continue
            # No period of the budget then: the data's periods under the kind and zone it had.
            instead = set()
            for data in (t for t in touched if t.within(start, end)):
                for q_start, q_end in data.periods(then.period, then.timezone):
                    there = self.at_end(q_end, now)
                    if there is not None and (there.period, there.timezone) == (then.period, then.timezone):
                        instead.add(Judged(then.period, then.timezone, q_start, q_end, there, "moved"))
            found |= instead or {Judged(today.period, today.timezone, start, end, today, "as today")}
        return found


@dataclass
class Lifecycle:
    """The alerts of one budget, in all its periods, through a sequence of evaluations."""

    scope: str
    budget: uuid.UUID
    # (period start, threshold, amount, currency) -> [(crossing id, period end), oldest first]
    crossings: dict[tuple[datetime, Decimal, Decimal, str], list[tuple[uuid.UUID, datetime]]] = field(
        default_factory=dict
    )
    open: set[uuid.UUID] = field(default_factory=set)
    raised: list[uuid.UUID] = field(default_factory=list)  # every alert, in order
    resolved: list[uuid.UUID] = field(default_factory=list)  # every resolution, in order
    resolved_spend: dict[uuid.UUID, Decimal] = field(default_factory=dict)  # the spend that resolved each alert
    # every alert: its period, threshold and the spend that raised it
    alerts: dict[uuid.UUID, tuple[Judged, Decimal, Decimal]] = field(default_factory=dict)

    def _open(self, key: tuple[datetime, Decimal, Decimal, str], end: datetime) -> uuid.UUID | None:
        return next((i for i, e in reversed(self.crossings.get(key, [])) if e == end and i in self.open), None)

    def evaluate(self, judged: Judged, total: Decimal | None) -> None:
        if total is None:
            return  # unconvertible: nothing raised, nothing resolved
        amount, currency, thresholds = judged.terms.amount, judged.terms.currency, judged.terms.thresholds
        for threshold in sorted(set(thresholds)):
            key = (judged.start, threshold, amount, currency)  # equal Decimals hash equal: 10 and 10.0 are one
            current = self._open(key, judged.end)
            reached = Fraction(total) * 100 >= Fraction(amount) * Fraction(threshold)  # exact, whatever the digits
            if reached and current is None:
                ids = self.crossings.setdefault(key, [])
                new = alert_id(self.scope, self.budget, judged.start, threshold, amount, currency, len(ids) + 1)
                ids.append((new, judged.end))
                self.open.add(new)
                self.raised.append(new)
                self.alerts[new] = (judged, threshold, total)
            elif not reached and current is not None:
                self.open.discard(current)
                self.resolved.append(current)
                self.resolved_spend[current] = total
        # A threshold the budget no longer has keeps its open alert at this amount and currency until spend falls
        # below its level (then it resolves, once); it is not raised again while it is not a threshold.
        for key in sorted(self.crossings):
            start, threshold, at_amount, at_currency = key
            if start != judged.start or at_amount != amount or at_currency != currency or threshold in thresholds:
                continue
            current = self._open(key, judged.end)
            if current is not None and Fraction(total) * 100 < Fraction(amount) * Fraction(threshold):
                self.open.discard(current)
                self.resolved.append(current)
                self.resolved_spend[current] = total
