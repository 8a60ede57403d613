"""Budget evaluation: which thresholds a change in spend crossed (alerts) or fell back below (resolutions).

What counts as spend is defined once, in SQL (``schema/migrations/0006_spend_rules.sql``:
``cost_worker_spend_rows``), and converted into the budget's currency and summed by ``cost_worker_spend``
(``0007_currencies_and_alert_lifecycle.sql``); this module decides *when* to evaluate and turns crossings into
alerts. An alert belongs to the budget as it was when it was raised (amount, currency): changing either re-arms
every threshold for the running period; a period that has ended is judged by the amount, currency and thresholds
in force when it ended (``budget_terms``, migration 0033: late data of last month, after the budget was lowered this
month, is judged by last month's amount). Per (budget, period, threshold, amount, currency) at most one alert is
open; spend falling below its level resolves it (once), and reaching the level again raises the next crossing,
with a new id. A budget whose spend needs a missing exchange rate is *unconvertible*: nothing is raised or
resolved from a partial sum. Evaluations run:
- after every batch, inside its transaction, for the budgets whose scope the batch touched, in the periods
  the touched data belongs to (late data re-evaluates its own period; a provider row, the period of its
  window's midpoint and every other period its window overlaps);
- periodically (the sweep), for every active budget in its current period, so a budget created, lowered or
  re-activated while spend is already over a threshold alerts without waiting for new events.
Cost of one evaluation: one candidate query (index lookups per touched scope), then one spend computation per
candidate (budget, period) (each: a threshold to cross or an open alert to resolve), reading only its period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow
from fractions import Fraction
from typing import Any
from uuid import UUID

import structlog

from worker import metrics
from worker.alerts import Alert, Resolution
from worker.config import Settings
from worker.errors import TransientError
from worker.limits import DECIMAL_PRECISION
from worker.retry import sleep_or_stop
from worker.store import Database, Spend, Tx
from worker.touches import Touch

log = structlog.get_logger("worker.budgets")

# EXACT's precision, raising Inexact where a product would round (a level is then compared in fractions).
STRICT = Context(prec=DECIMAL_PRECISION, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])
SWEEP_CHUNK = 200  # organizations evaluated per sweep transaction
# User budgets' scopes newly registered in the spend aggregate per evaluation (0016): a registration sums the
# user's rollups (~10 ms for a month of hourly rows), so a bulk import of user budgets is spread over the next
# evaluations instead of one long transaction; the others are computed in full until then. The sweep evaluates
# SWEEP_CHUNK organizations per transaction, so it registers up to this many budgets of theirs at once.
REGISTRATIONS_PER_EVALUATION = 200


@dataclass(frozen=True, slots=True)
class Candidate:
    """A budget in one period, with the amount, currency and thresholds that judge it (today's; for a period that
    has ended, those in force at its end) and its alert history at that amount and currency."""

    scope: str
    budget_id: UUID
    name: str
    organization_id: UUID
    project_id: UUID | None
    user_id: UUID | None
    amount: Decimal
    currency: str
    period: str
    timezone: str
    thresholds: tuple[Decimal, ...]
    period_start: datetime
    period_end: datetime
    # threshold -> (its latest crossing number, the id of its open alert or None when resolved)
    history: dict[Decimal, tuple[int, UUID | None]]

    @property
    def alerted(self) -> frozenset[Decimal]:
        """Thresholds with an open alert at the current amount and currency."""
        return frozenset(t for t, (_, open_id) in self.history.items() if open_id is not None)

    @classmethod
    def from_row(cls, row: Any) -> Candidate:
        return cls(
            scope=row["scope"],
            budget_id=row["id"],
            name=row["name"],
            organization_id=row["organization_id"],
            project_id=row["project_id"],
            user_id=row["user_id"],
            amount=row["amount"],
            currency=row["currency"].strip(),
            period=row["period"],
            timezone=row["timezone"],
            thresholds=_thresholds(row["thresholds"]),
            period_start=row["period_start"],
            period_end=row["period_end"],
            history=_history(row),
        )

    def reached(self, spend: Decimal, threshold: Decimal) -> bool:
        # Exact, whatever the digits: a context rounds products (the default one to 28 digits, EXACT to 60), and a
        # spend just below the level would round up to it. Money has up to 46 significant digits, but a budget's
        # amount and thresholds as many as NUMERIC holds (1 + 1e-69 USD at 100 % rounded to 1 USD at 60 digits).
        # The 60-digit products are exact for every realistic amount (and ~8x cheaper than fractions on this path);
        # when one would round, the fractions decide.
        try:
            return STRICT.multiply(spend, 100) >= STRICT.multiply(self.amount, threshold)
        except Inexact:
            return Fraction(spend) * 100 >= Fraction(self.amount) * Fraction(threshold)

    def crossed(self, spend: Decimal) -> list[Decimal]:
        """Thresholds without an open alert whose level the spend has reached (each of them, if several)."""
        return [t for t in self.thresholds if t not in self.alerted and self.reached(spend, t)]

    def fallen(self, spend: Decimal) -> list[Decimal]:
        """Thresholds with an open alert whose level the spend is below now, also one the budget no longer has (its
        alert stays open until spend falls below its level, like any other; it is never raised again)."""
        return [t for t in sorted(self.alerted) if not self.reached(spend, t)]

    def alert(self, threshold: Decimal, spend: Decimal, raised_at: datetime, *, crossing: int) -> Alert:
        return Alert(
            scope=self.scope,
            budget_id=self.budget_id,
            budget_name=self.name,
            organization_id=self.organization_id,
            project_id=self.project_id,
            user_id=self.user_id,
            period=self.period,
            timezone=self.timezone,
            period_start=self.period_start,
            period_end=self.period_end,
            threshold=threshold,
            spend=spend,
            amount=self.amount,
            currency=self.currency,
            raised_at=raised_at,
            crossing=crossing,
        )


class BudgetEngine:
    """Implements ``pipeline.BudgetEvaluator``; also runs the sweep."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def evaluate(self, tx: Tx, touched: Iterable[Touch], *, trigger: str = "batch") -> list[Alert | Resolution]:
        touches = list(set(touched))
        if not touches:
            return []
        started = time.perf_counter()
        # Concurrent workers touching the same organization evaluate one after the other (until commit). The lock
        # comes first: the candidates' alert history is then read after whatever an evaluation that held the lock
        # committed, so it matches the spend read below (read before the lock, an alert raised meanwhile stayed
        # open below its level, and one resolved meanwhile was not raised again).
        await tx.lock_organizations({t.organization_id for t in touches})
        rows = await tx.budget_candidates(touches)
        alerts = await self._evaluate(tx, [Candidate.from_row(row) for row in rows], trigger)
        metrics.BUDGET_EVALUATION_DURATION.labels(trigger=trigger).observe(time.perf_counter() - started)
        return alerts

    async def _evaluate(self, tx: Tx, candidates: list[Candidate], trigger: str) -> list[Alert | Resolution]:
        """The callers hold the locks of the candidates' organizations, taken before the candidates were read."""
        if not candidates:
            return []
        # A user budget's scope is kept in the spend aggregate once it is registered (0016); the first evaluation
        # registers it and builds it from the user's rollups, in this transaction, so the read below uses it.
        await tx.track_spend(candidates, max_new=REGISTRATIONS_PER_EVALUATION)
        spends = await tx.budget_spend(candidates)
        metrics.BUDGET_EVALUATIONS.labels(trigger=trigger).inc(len(candidates))
        now = datetime.now(UTC)
        alerts: list[Alert] = []
        falling: list[tuple[Candidate, Decimal, Decimal, UUID]] = []  # (candidate, threshold, spend, open alert)
        # Periods of one start (a day and a week judged by 0033's terms in force then) share the alert id's key:
        # the crossings this evaluation numbers at a key follow each other, or the second insert would be dropped.
        numbered: dict[tuple[str, UUID, datetime, Decimal, Decimal, str], int] = {}
        for candidate, spend in zip(candidates, spends, strict=True):
            if spend.amount is None:
                self._unconvertible(candidate, spend, trigger)
                continue
            for currency, rows in spend.converted.items():
                metrics.CONVERTED_ROWS.labels(budget_currency=candidate.currency, row_currency=currency).inc(rows)
            for threshold in candidate.crossed(spend.amount):
                key = (
                    candidate.scope,
                    candidate.budget_id,
                    candidate.period_start,
                    threshold,
                    candidate.amount,
                    candidate.currency,
                )
                crossing = max(candidate.history.get(threshold, (0, None))[0], numbered.get(key, 0)) + 1
                numbered[key] = crossing
                alerts.append(candidate.alert(threshold, spend.amount, now, crossing=crossing))
            for threshold in candidate.fallen(spend.amount):
                open_id = candidate.history[threshold][1]
                assert open_id is not None
                falling.append((candidate, threshold, spend.amount, open_id))
        raised: list[Alert] = []
        if alerts:
            inserted = await tx.insert_alerts(alerts, topic=self.settings.topic_budget_alerts, raised_at=now)
            raised = [a for a in alerts if str(a.id) in inserted]
        resolved: list[Resolution] = []
        if falling:
            stored = await tx.resolve_alerts([(open_id, value) for _, _, value, open_id in falling], resolved_at=now)
            for candidate, threshold, value, open_id in falling:
                if open_id not in stored:
                    continue  # resolved by someone else already (exactly once: the UPDATE's guard)
                crossing, raised_at = stored[open_id]
                alert = candidate.alert(threshold, value, raised_at, crossing=crossing)
                resolved.append(Resolution(open_id, alert, value, now))
            if resolved:
                await tx.insert_alert_messages(
                    [(r.key, r.message(), r.delivery_id, str(r.alert_id), r.alert.scope) for r in resolved],
                    topic=self.settings.topic_budget_alerts,
                )
        for alert in raised:
            metrics.ALERTS_RAISED.labels(scope=alert.scope, threshold=format(alert.threshold.normalize(), "f")).inc()
            log.info("budget_alert", **_fields(alert), crossing=alert.crossing, trigger=trigger)
        for resolution in resolved:
            metrics.ALERTS_RESOLVED.labels(
                scope=resolution.alert.scope, threshold=format(resolution.alert.threshold.normalize(), "f")
            ).inc()
            log.info(
                "budget_alert_resolved",
                **(_fields(resolution.alert) | {"alert_id": str(resolution.alert_id), "spend": str(resolution.spend)}),
                crossing=resolution.alert.crossing,
                trigger=trigger,
            )
        return [*raised, *resolved]

    @staticmethod
    def _unconvertible(candidate: Candidate, spend: Spend, trigger: str) -> None:
        for currency, missing in spend.missing_rates.items():
            metrics.UNCONVERTIBLE.labels(budget_currency=candidate.currency, row_currency=currency).inc()
            log.warning(
                "budget_unconvertible",
                budget_id=str(candidate.budget_id),
                scope=candidate.scope,
                budget_currency=candidate.currency,
                row_currency=currency,
                rows=missing.get("rows"),
                first_day=missing.get("first"),
                last_day=missing.get("last"),
                period_start=candidate.period_start.isoformat(),
                trigger=trigger,
            )

    # --- the sweep -----------------------------------------------------------------------------------

    async def sweep(self, db: Database, *, at: datetime | None = None) -> list[Alert | Resolution]:
        """Evaluate every active budget in the period containing ``at`` (now), a chunk of orgs at a time."""
        at = at or datetime.now(UTC)
        started = time.perf_counter()
        raised: list[Alert | Resolution] = []
        organizations = await db.budget_sweep_organizations()
        for offset in range(0, len(organizations), SWEEP_CHUNK):
            chunk = set(organizations[offset : offset + SWEEP_CHUNK])
            async with db.transaction() as tx:
                await tx.set_tenants(chunk)
                await tx.lock_organizations(chunk)  # before reading the alert history (as in ``evaluate``)
                rows = await tx.budget_active(chunk, at)
                # Budgets with a threshold to cross (a new or changed budget, a rate import). Resolutions follow
                # the data that lowers spend (batches), so budgets whose thresholds are all open are skipped.
                candidates = [c for c in map(Candidate.from_row, rows) if set(c.thresholds) - c.alerted]
                raised.extend(await self._evaluate(tx, candidates, "sweep"))
        metrics.BUDGET_EVALUATION_DURATION.labels(trigger="sweep").observe(time.perf_counter() - started)
        return raised

    async def rebuild_queued(self, db: Database, stop: asyncio.Event | None = None) -> int:
        """Rebuild the spend aggregate of every organization a migration queued (0044), one transaction each, before
        the sweep evaluates their budgets from it; returns how many this call rebuilt. Stops between organizations
        when ``stop`` is set (the rest stay queued for the next sweep)."""
        queued = await db.spend_rebuilds_queued()
        metrics.SPEND_REBUILDS_QUEUED.set(len(queued))
        rebuilt = 0
        for left, organization in enumerate(queued, start=1):
            if stop is not None and stop.is_set():
                break
            started = time.perf_counter()
            async with db.transaction() as tx:
                await tx.set_tenants({organization})
                reason = await tx.spend_rebuild_dequeue(organization)
                if reason is not None:  # None: `budgets rebuild-spend` or a deleted organization took it first
                    await tx.spend_rebuild(organization)
            metrics.SPEND_REBUILDS_QUEUED.set(len(queued) - left)
            if reason is not None:
                rebuilt += 1
                log.info(
                    "spend_rebuilt",
                    organization_id=str(organization),
                    reason=reason,
                    seconds=round(time.perf_counter() - started, 3),
                )
        return rebuilt

    async def run_sweeps(self, db: Database, stop: asyncio.Event, *, on_alerts: Any = None) -> None:
        """Sweep every ``budget_sweep_interval`` seconds (one replica at a time; the others skip); queued spend
        rebuilds first, so the sweep right after them raises what the corrected spend crosses."""
        while not stop.is_set():
            try:
                async with db.sweep_lock() as mine:
                    if not mine:
                        metrics.SPEND_REBUILDS_QUEUED.set(0)  # the replica holding the lock reports the queue
                    else:
                        await self.rebuild_queued(db, stop)
                        alerts = await self.sweep(db)
                        if alerts and on_alerts is not None:
                            await on_alerts(alerts)
            except TransientError as exc:
                log.warning("budget_sweep_failed", error=str(exc))
            await sleep_or_stop(stop, self.settings.budget_sweep_interval)


def _thresholds(value: Any) -> tuple[Decimal, ...]:
    """A budget's thresholds, ascending and distinct. The tables' CHECK (`0 < ALL (thresholds)`) is NULL, so it
    passes, for an array holding a NULL, and a two-dimensional array passes it too: a NULL is no threshold, and a
    nested array's numbers are its thresholds (sorting a NULL among numbers, or hashing a list, failed the batch)."""
    found: set[Decimal] = set()
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, (list, tuple)):
            pending.extend(item)
        elif item is not None:
            found.add(item)
    return tuple(sorted(found))


def _history(row: Any) -> dict[Decimal, tuple[int, UUID | None]]:
    """threshold -> (its latest crossing, the id of its open alert or None), from cost_worker_alert_history."""
    return {
        threshold: (crossing, open_id)
        for threshold, crossing, open_id in zip(
            row["alert_thresholds"] or (), row["alert_crossings"] or (), row["alert_open_ids"] or (), strict=True
        )
    }


def _fields(alert: Alert) -> dict[str, Any]:
    return {
        "alert_id": str(alert.id),
        "scope": alert.scope,
        "budget_id": str(alert.budget_id),
        "organization_id": str(alert.organization_id),
        "project_id": str(alert.project_id) if alert.project_id else None,
        "user_id": str(alert.user_id) if alert.user_id else None,
        "period_start": alert.period_start.isoformat(),
        "threshold": str(alert.threshold),
        "spend": str(alert.spend),
        "amount": str(alert.amount),
        "currency": alert.currency,
    }
