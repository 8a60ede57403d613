"""The fault suite: a known stream, one kind of fault per scenario, the exact end state asserted after each.

After every scenario (``harness.verify``): every source offset is accounted for exactly once (stored,
quarantined, or a duplicate/stale revision), the ledger and rollups equal the independently computed
expectation, ``budget_alerts`` holds one row per crossed (budget, period, threshold), exactly those alert ids
reached the alerts topic, and the stored offsets are the end of every partition.

Re-published alerts (the same alert id twice on the topic) are allowed only where at-least-once publishing
permits them: when a crash, a cut connection or an outage can fall between the broker's acknowledgement of
an outbox round and the commit of its DELETE. Scenarios whose faults never fall there assert none.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import asyncpg

from tests.faults.harness import finish, log_events, produce_all, scenario, verify, workers
from tests.faults.setup import prepared
from worker.config import Settings

SNAPSHOT_TABLES = {
    "cost_data": "organization_id, project_id, line_item, api_version, bucket_start_time",
    "api_usage": "organization_id, event_id",
    "project_metrics": "organization_id, project_id, hour",
    "user_metrics": "user_id, hour, project_id",
    "quarantine": "source_topic, source_partition, source_offset",
    "budget_alerts": "id",
}


async def snapshot(db: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the worker's tables with its xmin: any rewrite of a row changes it."""
    return {
        table: [tuple(r) for r in await db.fetch(f"SELECT xmin::text, * FROM {table} ORDER BY {order}")]
        for table, order in SNAPSHOT_TABLES.items()
    }


def small_batches(settings: Settings) -> Settings:
    return settings.model_copy(update={"batch_max_records": 100})


# --------------------------------------------------------------------------------------- 1. fault points


async def test_sigkill_at_named_points(db: asyncpg.Connection, settings: Settings, tmp_path: Path) -> None:
    """SIGKILL before the database commit, after it but before the Kafka commit, and between the alert
    insert and the outbox publish; each restart resumes from the offsets stored in PostgreSQL."""
    async with scenario("1. SIGKILL at named points", timeout=900) as record:
        stream = await prepared(db, settings, seed=101)
        delivered = await produce_all(settings, stream.messages)
        async with workers(small_batches(settings), tmp_path) as group:
            # Between the alert insert and the publish: repeat until a kill left alert rows unpublished.
            for _ in range(5):
                process = group.spawn("--exit-when-idle", "3", COST_WORKER_FAULT_POINTS="before_outbox_publish@1")
                assert await group.wait(process, 180) == -signal.SIGKILL, group.logs()
                record.faults += 1
                record.fault_kinds.append("before_outbox_publish")
                pending = await db.fetchval(
                    "SELECT count(*) FROM outbox WHERE topic = $1", settings.topic_budget_alerts
                )
                if pending:
                    break
            assert pending, "no kill ever left an alert in the outbox"
            for point in ("before_db_commit@2", "after_db_commit@2", "before_db_commit@3", "after_db_commit@4"):
                process = group.spawn("--exit-when-idle", "3", COST_WORKER_FAULT_POINTS=point)
                assert await group.wait(process, 180) == -signal.SIGKILL, group.logs()
                record.faults += 1
                record.fault_kinds.append(point.partition("@")[0])
            assert group.count("fault injection: SIGKILL at before_db_commit") == 2
            assert group.count("fault injection: SIGKILL at after_db_commit") == 2
            await finish(group)
        # A consumer task killed mid-round of the publisher task can leave a sent-but-not-deleted round.
        await verify(record, db, settings, stream, delivered, exactly_once_publish=False)


# --------------------------------------------------------------------------------------- 8. full replay


async def test_full_replay_changes_nothing(db: asyncpg.Connection, settings: Settings, tmp_path: Path) -> None:
    """Replaying every partition from offset zero into a database that has everything: no row is rewritten,
    no alert is raised or published again."""
    async with scenario("8. full replay from offset 0", timeout=600) as record:
        stream = await prepared(db, settings, seed=808)
        delivered = await produce_all(settings, stream.messages)
        async with workers(settings, tmp_path) as group:
            await finish(group, name="first")
            await verify(record, db, settings, stream, delivered, exactly_once_publish=True)
            before = await snapshot(db)
            await db.execute("DELETE FROM consumer_offsets WHERE group_id = $1", settings.kafka_group_id)
            record.faults += 1
            record.fault_kinds.append("replay from offset 0")
            await finish(group, name="replay")
        assert await snapshot(db) == before
        assert log_events(group.log("replay"), "budget_alert") == []
        await verify(record, db, settings, stream, delivered, exactly_once_publish=True)
