"""The outbox publishes the rows of one key in the order they were written, whatever failed before."""

from __future__ import annotations

import asyncpg

from tests.kafka_helpers import consume_all, create_topics
from worker.config import Settings
from worker.outbox import OutboxPublisher
from worker.store import Database


async def write(db: asyncpg.Connection, topic: str, key: str, value: str, *, attempts: int = 0) -> int:
    row_id: int = await db.fetchval(
        "INSERT INTO outbox (topic, key, value, attempts) VALUES ($1, $2, $3, $4) RETURNING id",
        topic,
        key.encode(),
        value.encode(),
        attempts,
    )
    return row_id


async def test_a_row_is_not_claimed_while_an_earlier_row_of_its_key_waits(
    db: asyncpg.Connection, database: Database, settings: Settings
) -> None:
    """The triggered alert failed once (attempts 1); its resolved alert, written later, must not go first, and a
    second replica must not take it while the first holds the triggered row."""
    topic = settings.topic_budget_alerts
    triggered = await write(db, topic, "budget-1", "triggered", attempts=1)
    resolved = await write(db, topic, "budget-1", "resolved")
    other = await write(db, topic, "budget-2", "other")
    elsewhere = await write(db, "another-topic", "budget-1", "same key, another topic")
    async with database.transaction() as tx:
        claimed = [r["id"] for r in await tx.outbox_claim(10)]
    assert claimed == [other, elsewhere, triggered]  # failed rows still go last; the resolved one waits
    async with db.transaction():
        await db.execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", triggered)  # replica 1 is publishing it
        async with database.transaction() as tx:
            claimed = [r["id"] for r in await tx.outbox_claim(10)]
        assert claimed == [other, elsewhere]
        await db.execute("DELETE FROM outbox WHERE id = $1", triggered)  # replica 1 published it
    async with database.transaction() as tx:
        claimed = [r["id"] for r in await tx.outbox_claim(10)]
    assert claimed == [resolved, other, elsewhere]


async def test_the_published_order_of_a_key_is_the_written_order(
    db: asyncpg.Connection, database: Database, settings: Settings
) -> None:
    await create_topics(settings)
    topic = settings.topic_budget_alerts
    await write(db, topic, "budget-1", "triggered", attempts=3)
    await write(db, topic, "budget-1", "resolved")
    await write(db, topic, "budget-1", "triggered again")
    publisher = OutboxPublisher(settings, database)
    try:
        while await publisher.publish_round():
            pass
    finally:
        await publisher.close()
    published = await consume_all(settings, topic, expect=3)
    assert [record.value for record in published] == [b"triggered", b"resolved", b"triggered again"]
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0
