"""End to end through the real broker: exactly-once effect whatever is redelivered, replayed or killed."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tests.factories import (
    Org,
    anthropic_cost_bucket,
    api_event,
    dumps,
    envelope,
    make_org,
    openai_cost_bucket,
)
from tests.kafka_helpers import consume_all, create_topics, kill, produce, run_worker, spawn_worker
from worker.config import Settings


async def snapshot(db: asyncpg.Connection) -> dict[str, Any]:
    """Everything the worker writes that must be identical between runs (no timestamps of writing)."""
    return {
        "cost_data": [
            tuple(r)
            for r in await db.fetch(
                "SELECT organization_id, project_id, api_version::text, bucket_start_time, line_item, currency, "
                "amount, "
                "quantity, collected_at FROM cost_data ORDER BY 1, 2 NULLS FIRST, 3, 4, 5"
            )
        ],
        "api_usage": [
            tuple(r)
            for r in await db.fetch(
                "SELECT organization_id, event_id, project_id, cost_usd, occurred_at FROM api_usage ORDER BY 1, 2"
            )
        ],
        "project_metrics": [
            tuple(r)
            for r in await db.fetch(
                "SELECT organization_id, project_id, hour, request_count, error_count, total_tokens, "
                "estimated_cost_usd, "
                "latency_sum_ms, latency_max_ms FROM project_metrics ORDER BY 1, 2 NULLS FIRST, 3"
            )
        ],
        "user_metrics": [
            tuple(r)
            for r in await db.fetch(
                "SELECT user_id, hour, project_id, request_count, estimated_cost_usd FROM user_metrics ORDER BY 1, 2, 3"
            )
        ],
        "quarantine": [
            tuple(r)
            for r in await db.fetch(
                "SELECT source_topic, source_partition, source_offset, reason FROM quarantine ORDER BY 1, 2, 3"
            )
        ],
    }


def stream(orgs: list[Org], n_events: int, seed: int = 7) -> tuple[list[bytes], list[bytes], Decimal]:
    """API events (with duplicates) and provider pages (with revisions); returns the expected event cost."""
    rng = random.Random(seed)
    events = []
    expected = Decimal(0)
    for i in range(n_events):
        org = orgs[i % len(orgs)]
        cost = Decimal(rng.randint(1, 10_000)) / Decimal(100_000)
        payload = api_event(
            org,
            event_id=f"ev-{i}",
            project=org.projects["proj_a"],
            user=org.users[0],
            cost=str(cost),
            occurred_at=f"2026-11-{1 + i % 20:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
        )
        events.append(dumps(payload))
        expected += cost
    events += rng.sample(events, n_events // 10)  # producer retries: duplicates
    buckets = []
    for org in orgs:
        for day in range(1, 4):
            for revision in (1, 2):
                buckets.append(
                    dumps(
                        envelope(
                            "openai",
                            org.ai_org,
                            "costs_v1",
                            [
                                openai_cost_bucket(
                                    f"2026-11-{day:02d}",
                                    f"2026-11-{day + 1:02d}",
                                    [
                                        ("proj_a", "GPT-4o", f"{day}.{revision}5"),
                                        (None, "support", "0.1"),
                                    ],
                                )
                            ],
                            collected_at=f"2026-11-{day + 1:02d}T0{revision}:00:00Z",
                        )
                    )
                )
    rng.shuffle(buckets)  # revisions out of order: the newest must still win
    return events, buckets, expected


@pytest.fixture
async def orgs(db: asyncpg.Connection) -> list[Org]:
    return [await make_org(db) for _ in range(3)]


def _stage_count(stage: str) -> float:
    """How many batches the worker timed at ``stage`` so far (its histogram's count, this process)."""
    return REGISTRY.get_sample_value("cost_worker_batch_duration_seconds_count", {"stage": stage}) or 0.0


async def test_stream_lands_once_and_a_full_replay_changes_nothing(
    db: asyncpg.Connection, settings: Settings, orgs: list[Org]
) -> None:
    await create_topics(settings)
    events, buckets, expected = stream(orgs, 400)
    bad = [b"{not json", dumps({"event_id": "x"})]
    await produce(settings, settings.topic_api_usage, events[:200] + bad + events[200:])
    await produce(settings, settings.topic_provider_buckets, buckets)
    started = time.perf_counter()
    assert await run_worker(settings) == 0
    elapsed = time.perf_counter() - started

    assert await db.fetchval("SELECT count(*) FROM api_usage") == 400
    assert await db.fetchval("SELECT sum(cost_usd) FROM api_usage") == expected
    assert await db.fetchval("SELECT sum(estimated_cost_usd) FROM project_metrics") == expected
    assert await db.fetchval("SELECT sum(request_count) FROM project_metrics") == 400
    # The newest revision of each day won: x.25 per day for the project, 0.1 for the organization.
    per_org = await db.fetchval("SELECT sum(amount) FROM cost_data WHERE organization_id = $1", orgs[0].id)
    assert per_org == Decimal("1.25") + Decimal("2.25") + Decimal("3.25") + Decimal("0.3")
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 2
    dead = await consume_all(settings, settings.topic_dead_letter, expect=2)
    assert len(dead) == 2
    headers = dict(dead[0].headers)
    assert headers["reason"] in (b"not_json", b"schema_violation")
    assert headers["source_topic"] == settings.topic_api_usage.encode()
    # Stored offsets equal the end of each partition.
    stored = await db.fetchval("SELECT sum(next_offset) FROM consumer_offsets")
    assert stored == len(events) + len(bad) + len(buckets)
    print(f"\nend-to-end: {len(events) + len(buckets) + 2} messages in {elapsed:.2f}s")

    before = await snapshot(db)
    await db.execute("DELETE FROM consumer_offsets")  # full replay from offset zero
    assert await run_worker(settings) == 0
    assert await snapshot(db) == before
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0  # nothing new to publish


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_events_from_a_producer_that_compresses_are_counted(
    db: asyncpg.Connection, settings: Settings, orgs: list[Org], codec: str
) -> None:
    """Producers compress (Java and librdkafka clients are often set to lz4, zstd or snappy). The worker must read
    every codec Kafka has: without its library a fetched batch is an error the worker retries for ever, and the
    partition's spend never arrives."""
    await create_topics(settings)
    events, _, expected = stream(orgs, 60)
    await produce(settings, settings.topic_api_usage, events, compression=codec)
    assert await run_worker(settings) == 0
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 60
    assert await db.fetchval("SELECT sum(cost_usd) FROM api_usage") == expected


async def test_a_restart_at_stored_positions_reports_nothing_lost_to_retention(
    db: asyncpg.Connection, settings: Settings, orgs: list[Org]
) -> None:
    """At assignment the worker compares its stored positions with each partition's first offset (the broker's
    ListOffsets): after an ordinary restart nothing was deleted before it was consumed, so nothing is reported."""
    await create_topics(settings)
    events, _, _ = stream(orgs, 40)
    await produce(settings, settings.topic_api_usage, events)

    def lost() -> float:
        labels = {"topic": settings.topic_api_usage}
        return REGISTRY.get_sample_value("cost_worker_input_lost_to_retention_messages_total", labels) or 0.0

    assert await run_worker(settings) == 0
    assert await db.fetchval("SELECT sum(next_offset) FROM consumer_offsets") == len(events)
    await produce(settings, settings.topic_api_usage, events[:5])  # redeliveries after the restart
    assert await run_worker(settings) == 0  # starts from the stored positions, all of them above 0
    assert await db.fetchval("SELECT sum(next_offset) FROM consumer_offsets") == len(events) + 5
    assert lost() == 0.0  # this topic is this test's own


async def test_batches_are_timed_from_fetch_to_commit_with_the_wait_for_the_batch_before(
    db: asyncpg.Connection, settings: Settings, orgs: list[Org]
) -> None:
    """``cost_worker_batch_duration_seconds``: every batch has its fetch timed; a batch decoded while the one
    before it was still in the database has its wait timed (what says whether the database limits the rate)."""
    await create_topics(settings)
    events, _, _ = stream(orgs, 400)
    await produce(settings, settings.topic_api_usage, events)
    stages = ("fetch", "decode", "wait", "total")
    before = {stage: _stage_count(stage) for stage in stages}
    assert await run_worker(settings.model_copy(update={"batch_max_records": 50})) == 0
    batches = {stage: _stage_count(stage) - before[stage] for stage in stages}
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 400
    assert batches["fetch"] == batches["decode"] == batches["total"] >= 8, batches
    assert 1 <= batches["wait"] < batches["fetch"], batches


async def test_two_workers_split_partitions_and_agree_with_one(
    db: asyncpg.Connection, settings: Settings, orgs: list[Org]
) -> None:
    await create_topics(settings, partitions=4)
    events, buckets, expected = stream(orgs, 600, seed=11)
    # Round-robin over the partitions: keyless messages go to a random one, and 18 pages left one of the four
    # empty (so without an offset row) about once in 45 runs.
    for partition in range(4):
        await produce(settings, settings.topic_api_usage, events[partition::4], partition=partition)
        await produce(settings, settings.topic_provider_buckets, buckets[partition::4], partition=partition)
    codes = await asyncio.gather(run_worker(settings, idle=2.0), run_worker(settings, idle=2.0))
    assert list(codes) == [0, 0]
    assert await db.fetchval("SELECT sum(cost_usd) FROM api_usage") == expected
    assert await db.fetchval("SELECT sum(request_count) FROM project_metrics") == 600
    assert await db.fetchval("SELECT count(*) FROM consumer_offsets") == 8
    together = await snapshot(db)

    await db.execute(
        "TRUNCATE cost_data, api_usage, project_metrics, user_metrics, quarantine, outbox, consumer_offsets"
    )
    assert await run_worker(settings) == 0
    assert await snapshot(db) == together


async def test_sigkill_mid_stream_then_restart_matches_an_undisturbed_run(
    db: asyncpg.Connection, settings: Settings, orgs: list[Org], tmp_path: Path
) -> None:
    await create_topics(settings)
    events, buckets, expected = stream(orgs, 3000, seed=3)
    await produce(settings, settings.topic_api_usage, events)
    await produce(settings, settings.topic_provider_buckets, buckets)
    small_batches = settings.model_copy(update={"batch_max_records": 100})
    for attempt in range(3):
        process = spawn_worker(small_batches, "--exit-when-idle", "2", log=tmp_path / "worker.log")
        await asyncio.sleep(1.5 + attempt)
        kill(process, signal.SIGKILL)
    # Idle for longer than the session timeout: a killed member keeps its partitions until its session
    # expires, and "idle" only looks at the partitions assigned, so a shorter wait can exit with half the
    # stream unread (seen when the kills land while the killed workers are still joining the group).
    idle = str(settings.kafka_session_timeout + 2)
    process = spawn_worker(small_batches, "--exit-when-idle", idle, log=tmp_path / "worker.log")
    assert await asyncio.to_thread(process.wait, 120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    killed = await snapshot(db)
    assert await db.fetchval("SELECT sum(cost_usd) FROM api_usage") == expected
    assert await db.fetchval("SELECT sum(request_count) FROM project_metrics") == 3000

    await db.execute(
        "TRUNCATE cost_data, api_usage, project_metrics, user_metrics, quarantine, outbox, consumer_offsets"
    )
    assert await run_worker(settings) == 0
    assert await snapshot(db) == killed


async def test_anthropic_and_openai_side_by_side(db: asyncpg.Connection, settings: Settings) -> None:
    await create_topics(settings)
    org = await make_org(db, provider="anthropic", project_ids=("wrkspc_1",))
    page = envelope(
        "anthropic",
        org.ai_org,
        "costs_v1",
        [
            anthropic_cost_bucket(
                "2026-11-01T00:00:00Z",
                "2026-11-02T00:00:00Z",
                [{"amount": "250", "currency": "USD", "workspace_id": "wrkspc_1", "description": "tokens"}],
            )
        ],
    )
    await produce(settings, settings.topic_provider_buckets, [dumps(page)])
    assert await run_worker(settings) == 0
    assert await db.fetchval("SELECT amount FROM cost_data") == Decimal("2.50")
