"""Budget evaluation: which thresholds a change in spend crossed, raised once per (budget, period).

What counts as spend is defined once, in SQL (``schema/migrations/0006_spend_rules.sql``:
``cost_worker_spend_rows``, summed by ``cost_worker_spend``); this module decides *when* to evaluate and turns
crossings into alerts:
- after every batch, inside its transaction, for the budgets whose scope the batch touched, in the periods
  the touched data belongs to (late data re-evaluates its own period; a provider row, the period of its
  window's midpoint and every other period its window overlaps);
- periodically (the sweep), for every active budget in its current period, so a budget created, lowered or
  re-activated while spend is already over a threshold alerts without waiting for new events.
Cost of one evaluation: one candidate query (index lookups per touched scope), then one spend computation per
candidate (budget, period) that still has thresholds to cross, each reading only the rows of its period.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import structlog

from worker import metrics
from worker.alerts import Alert
from worker.config import Settings
from worker.errors import TransientError
from worker.pipeline import Touch
from worker.store import Database, Tx

log = structlog.get_logger("worker.budgets")

SWEEP_CHUNK = 200  # organizations evaluated per sweep transaction


@dataclass(frozen=True, slots=True)
class Candidate:
    """A budget in one period, with the thresholds it has not alerted yet."""

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
    alerted: frozenset[Decimal]
    period_start: datetime
    period_end: datetime

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
            thresholds=tuple(sorted(set(row["thresholds"]))),
            alerted=frozenset(row["alerted"]),
            period_start=row["period_start"],
            period_end=row["period_end"],
        )

    def crossed(self, spend: Decimal) -> list[Decimal]:
        """Thresholds not alerted yet whose level the spend has reached (each of them, if several)."""
        return [t for t in self.thresholds if t not in self.alerted and spend * 100 >= self.amount * t]


class BudgetEngine:
    """Implements ``pipeline.BudgetEvaluator``; also runs the sweep."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def evaluate(self, tx: Tx, touched: Iterable[Touch], *, trigger: str = "batch") -> list[Alert]:
        touches = list(set(touched))
        if not touches:
            return []
        started = time.perf_counter()
        rows = await tx.budget_candidates(touches)
        alerts = await self._evaluate(tx, [Candidate.from_row(row) for row in rows], trigger)
        metrics.BUDGET_EVALUATION_DURATION.labels(trigger=trigger).observe(time.perf_counter() - started)
        return alerts

    async def _evaluate(self, tx: Tx, candidates: list[Candidate], trigger: str) -> list[Alert]:
        if not candidates:
            return []
        # Concurrent workers touching the same organization evaluate one after the other (until commit).
        await tx.lock_organizations({c.organization_id for c in candidates})
        spends = await tx.budget_spend(candidates)
        metrics.BUDGET_EVALUATIONS.labels(trigger=trigger).inc(len(candidates))
        raised_at = datetime.now(UTC)
        alerts = []
        for candidate, (spend, foreign) in zip(candidates, spends, strict=True):
            for currency, rows in (foreign or {}).items():
                metrics.FOREIGN_CURRENCY_ROWS.labels(budget_currency=candidate.currency, row_currency=currency).inc(
                    rows
                )
                log.warning(
                    "budget_foreign_currency_rows",
                    budget_id=str(candidate.budget_id),
                    budget_currency=candidate.currency,
                    row_currency=currency,
                    rows=rows,
                    period_start=candidate.period_start.isoformat(),
                )
            for threshold in candidate.crossed(spend):
                alerts.append(
                    Alert(
                        scope=candidate.scope,
                        budget_id=candidate.budget_id,
                        budget_name=candidate.name,
                        organization_id=candidate.organization_id,
                        project_id=candidate.project_id,
                        user_id=candidate.user_id,
                        period=candidate.period,
                        timezone=candidate.timezone,
                        period_start=candidate.period_start,
                        period_end=candidate.period_end,
                        threshold=threshold,
                        spend=spend,
                        amount=candidate.amount,
                        currency=candidate.currency,
                        raised_at=raised_at,
                    )
                )
        if not alerts:
            return []
        inserted = await tx.insert_alerts(alerts, topic=self.settings.topic_budget_alerts, raised_at=raised_at)
        raised = [a for a in alerts if str(a.id) in inserted]
        for alert in raised:
            metrics.ALERTS_RAISED.labels(scope=alert.scope, threshold=format(alert.threshold.normalize(), "f")).inc()
            log.info(
                "budget_alert",
                alert_id=str(alert.id),
                scope=alert.scope,
                budget_id=str(alert.budget_id),
                organization_id=str(alert.organization_id),
                project_id=str(alert.project_id) if alert.project_id else None,
                user_id=str(alert.user_id) if alert.user_id else None,
                period_start=alert.period_start.isoformat(),
                threshold=str(alert.threshold),
                spend=str(alert.spend),
                amount=str(alert.amount),
                currency=alert.currency,
                trigger=trigger,
            )
        return raised

    # --- the sweep -----------------------------------------------------------------------------------

    async def sweep(self, db: Database, *, at: datetime | None = None) -> list[Alert]:
        """Evaluate every active budget in the period containing ``at`` (now), a chunk of orgs at a time."""
        at = at or datetime.now(UTC)
        started = time.perf_counter()
        raised: list[Alert] = []
        organizations = await db.budget_sweep_organizations()
        for offset in range(0, len(organizations), SWEEP_CHUNK):
            chunk = set(organizations[offset : offset + SWEEP_CHUNK])
            async with db.transaction() as tx:
                await tx.set_tenants(chunk)
                rows = await tx.budget_active(chunk, at)
                candidates = [c for c in map(Candidate.from_row, rows) if set(c.thresholds) - c.alerted]
                raised.extend(await self._evaluate(tx, candidates, "sweep"))
        metrics.BUDGET_EVALUATION_DURATION.labels(trigger="sweep").observe(time.perf_counter() - started)
        return raised

    async def run_sweeps(self, db: Database, stop: asyncio.Event, *, on_alerts: Any = None) -> None:
        """Sweep every ``budget_sweep_interval`` seconds (one replica at a time; the others skip)."""
        while not stop.is_set():
            try:
                async with db.sweep_lock() as mine:
                    if mine:
                        alerts = await self.sweep(db)
                        if alerts and on_alerts is not None:
                            await on_alerts(alerts)
            except TransientError as exc:
                log.warning("budget_sweep_failed", error=str(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.budget_sweep_interval)
