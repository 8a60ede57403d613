"""Budget evaluation racing another evaluation of the same organization: the alert history it acts on is read
under the organization's lock, so it is never older than the spend it compares with it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from tests.factories import make_org
from tests.feeding import Feeder
from tests.test_budgets import add_budget, spend_event
from worker.alerts import Alert, Resolution
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.store import Database
from worker.touches import Touch


async def _waiting_for_advisory_lock(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))


async def test_a_lowering_batch_resolves_an_alert_raised_while_it_waited_for_the_lock(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """Batch A lowers the spend (6 -> 0) while evaluation B holds the organization's lock and raises the 50 %
    alert (spend 6 of 10, committed before A's change). A evaluates after B: spend 0 is below the level of B's
    open alert, which A must resolve. Reading the alert history before waiting for the lock, A saw no alert and
    left B's open with spend 0 (until some later batch touched the budget)."""
    org = await make_org(db)
    project = org.projects["proj_a"]
    await feeder.events(spend_event(org, "6", at="2026-11-10T10:00:00Z"))  # before the budget: nothing alerts
    budget = await add_budget(db, "organization", org, "10", thresholds=(50,))
    touch = Touch(org.id, project, None, datetime(2026, 11, 10, 10, tzinfo=UTC))
    engine = BudgetEngine(settings)
    pools = [await Database.open(settings.dsn(), role=settings.database_role) for _ in range(2)]
    try:
        lowered = asyncio.Event()
        b_holds_lock = asyncio.Event()

        async def batch_a() -> list[Alert | Resolution]:
            async with pools[0].transaction() as tx:
                await tx.set_tenants({org.id})
                await b_holds_lock.wait()
                await tx.conn.execute(
                    "UPDATE project_metrics SET estimated_cost_usd = 0 WHERE organization_id = $1", org.id
                )
                lowered.set()
                return await engine.evaluate(tx, [touch])

        async def evaluation_b() -> list[Alert | Resolution]:
            async with pools[1].transaction() as tx:
                await tx.set_tenants({org.id})
                await tx.lock_organizations({org.id})
                b_holds_lock.set()
                await lowered.wait()
                for _ in range(200):  # until A waits for the organization's lock
                    if await _waiting_for_advisory_lock(db):
                        break
                    await asyncio.sleep(0.02)
                return await engine.evaluate(tx, [touch])

        a, b = await asyncio.gather(batch_a(), evaluation_b())
    finally:
        for pool in pools:
            await pool.close()
    assert [(type(x).__name__, x.threshold) for x in b] == [("Alert", Decimal(50))]
    assert [(type(x).__name__, x.threshold, x.spend) for x in a] == [("Resolution", Decimal(50), Decimal(0))]
    rows = await db.fetch("SELECT resolved_at IS NOT NULL AS resolved, resolved_spend FROM budget_alerts")
    assert [(r["resolved"], r["resolved_spend"]) for r in rows] == [(True, Decimal(0))], budget
