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
  since ever).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal, localcontext
from fractions import Fraction

from tests.spend_model import EXACT

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


@dataclass
class Lifecycle:
    """The alerts of one budget in one period, through a sequence of evaluations."""

    scope: str
    budget: uuid.UUID
    period_start: datetime
    # (threshold, amount, currency) -> [crossing ids, oldest first]; the last one open or not
    crossings: dict[tuple[Decimal, Decimal, str], list[uuid.UUID]] = field(default_factory=dict)
    open: set[uuid.UUID] = field(default_factory=set)
    raised: list[uuid.UUID] = field(default_factory=list)  # every alert, in order
    resolved: list[uuid.UUID] = field(default_factory=list)  # every resolution, in order

    def evaluate(self, total: Decimal | None, amount: Decimal, currency: str, thresholds: tuple[Decimal, ...]) -> None:
        if total is None:
            return  # unconvertible: nothing raised, nothing resolved
        for threshold in sorted(set(thresholds)):
            key = (threshold, amount, currency)  # equal Decimals hash equal: 10 and 10.0 are one amount
            ids = self.crossings.setdefault(key, [])
            current = ids[-1] if ids and ids[-1] in self.open else None
            reached = Fraction(total) * 100 >= Fraction(amount) * Fraction(threshold)  # exact, whatever the digits
            if reached and current is None:
                new = alert_id(self.scope, self.budget, self.period_start, threshold, amount, currency, len(ids) + 1)
                ids.append(new)
                self.open.add(new)
                self.raised.append(new)
            elif not reached and current is not None:
                self.open.discard(current)
                self.resolved.append(current)
        # A threshold the budget no longer has keeps its open alert at this amount and currency until spend falls
        # below its level (then it resolves, once); it is not raised again while it is not a threshold.
        for (threshold, at_amount, at_currency), ids in sorted(self.crossings.items()):
            if at_amount != amount or at_currency != currency or threshold in set(thresholds):
                continue
            if ids and ids[-1] in self.open and Fraction(total) * 100 < Fraction(amount) * Fraction(threshold):
                self.open.discard(ids[-1])
                self.resolved.append(ids[-1])


BudgetTerms = tuple[Decimal, str, tuple[Decimal, ...]]  # amount, currency, thresholds


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

    def judging(self, period_end: datetime, now: datetime) -> BudgetTerms:
        """The terms that judge the period ending at ``period_end``."""
        if period_end > now:
            return self.current
        return max((v for v in self.versions if v[0] < period_end), key=lambda v: v[0])[1]
