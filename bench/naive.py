"""The naive reference worker: aiokafka + asyncpg, one upsert statement and one database commit per event.

It validates each event with the worker's own decoder (so the comparison isolates batching), then runs one
autocommitted ``INSERT ... ON CONFLICT DO NOTHING`` per event as the worker's role (row-level security, every
organization in the session's scope). No rollups, no offsets in the database: it is the floor to beat.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer

from bench import world as w
from bench.kafka_io import FETCH_BYTES
from worker.decode import ApiEvent, decode_api_event
from worker.quarantine import Source

INSERT_ONE = (
    f"INSERT INTO api_usage ({', '.join(w.API_USAGE_COLUMNS)}) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) ON CONFLICT DO NOTHING"
)


async def naive_worker(url: str, bootstrap: str, topic: str, count: int, world: w.World) -> dict[str, Any]:
    conn = await asyncpg.connect(url, server_settings={"role": "cost_worker_writer"})
    await conn.execute(
        "SELECT set_config('cost_worker.organization_ids', $1, false)",
        ",".join(str(o) for o in world.all_org_ids()),
    )
    insert = await conn.prepare(INSERT_ONE)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=FETCH_BYTES,
    )
    await consumer.start()
    done = 0
    invalid = 0
    started: float | None = None
    try:
        while done < count:
            fetched = await consumer.getmany(timeout_ms=500, max_records=500)
            if fetched and started is None:
                started = time.perf_counter()  # the clock starts with the first records, not the connection
            for records in fetched.values():
                for record in records:
                    if done >= count:
                        break
                    source = Source(record.topic, record.partition, record.offset, record.key, ())
                    event = decode_api_event(record.value or b"", source, max_bytes=1_048_576)
                    done += 1
                    if not isinstance(event, ApiEvent):
                        invalid += 1
                        continue
                    await insert.fetch(
                        event.organization_id,
                        event.event_id,
                        event.project_id,
                        event.user_id,
                        event.endpoint,
                        event.method,
                        event.status_code,
                        event.response_time_ms,
                        event.occurred_at,
                        event.prompt_tokens,
                        event.completion_tokens,
                        event.total_tokens,
                        event.model,
                        event.cost_usd,
                        record.partition,
                        record.offset,
                    )
        seconds = time.perf_counter() - (started or time.perf_counter())
        stored = await conn.fetchval("SELECT count(*) FROM api_usage")
    finally:
        await consumer.stop()
        await conn.close()
    return {
        "events": done,
        "invalid": invalid,
        "stored": stored,
        "seconds": round(seconds, 3),
        "per_second": round(done / seconds, 1) if seconds else None,
    }
