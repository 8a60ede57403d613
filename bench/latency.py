"""Produce-to-committed latency at a steady offered load.

Each event carries its identity in its ``event_id`` (``lat`` + sequence); the benchmark notes the wall-clock
time just before handing it to the producer (``time.time()``). "Committed" is the commit of the database
transaction that stored the event (data and offsets together), measured two ways:

1. ``commit_timestamp`` (preferred): with ``track_commit_timestamp = on`` PostgreSQL records each
   transaction's commit time; ``pg_xact_commit_timestamp(xmin)`` of the event's ``api_usage`` row is the
   exact commit time of its batch. (``created_at`` would be wrong: ``now()`` is the transaction's *start*.)
   Same host, same clock as the producer's timestamps.
2. ``offset_polling`` (always, and the only one when the server does not track commit timestamps): the
   benchmark polls ``consumer_offsets`` every 10 ms; an event at (partition, offset) is committed once the
   stored next offset of its partition passed it. Upper bound, late by at most one poll period plus the
   query; both timestamps come from the benchmark's clock, so it also works against a remote server.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer

from bench import kafka_io
from bench import world as w
from bench.drain import Topics, WorkerProcess, worker_env
from bench.services import Servers
from worker import devstack
from worker.config import KAFKA_FETCH_MAX_WAIT

POLL = 0.01  # seconds between consumer_offsets polls
TICK = 0.005  # seconds between production rounds of the paced producer
WARMUP_EVENTS = 20


def summary(values_ms: list[float]) -> dict[str, Any]:
    if not values_ms:
        return {"count": 0}
    ordered = sorted(values_ms)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 1)

    return {
        "count": len(ordered),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": round(ordered[-1], 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
    }


class OffsetPoller:
    """Records when each partition's stored next offset moved, as seen from the benchmark's clock."""

    def __init__(self, url: str, group: str, topic: str) -> None:
        self.url, self.group, self.topic = url, group, topic
        self.moves: dict[int, list[tuple[float, int]]] = {}
        self.stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while not self.stop.is_set():
                rows = await conn.fetch(
                    "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
                    self.group,
                    self.topic,
                )
                seen = time.time()
                for row in rows:
                    moves = self.moves.setdefault(row["partition"], [])
                    if not moves or moves[-1][1] != row["next_offset"]:
                        moves.append((seen, row["next_offset"]))
                await asyncio.sleep(POLL)
        finally:
            await conn.close()

    def stored(self) -> int:
        return sum(moves[-1][1] for moves in self.moves.values() if moves)

    def committed_at(self, partition: int, offset: int) -> float | None:
        for seen, next_offset in self.moves.get(partition, []):
            if next_offset > offset:
                return seen
        return None


async def broker_floor(bootstrap: str, topic: str, world: w.World, *, rate: float, duration: float) -> dict[str, Any]:
    """The broker's share of the latency: produce -> delivered to a consumer with the worker's fetch settings
    (no database), at the same offered rate, on a topic of its own."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=kafka_io.FETCH_BYTES,
        fetch_max_wait_ms=int(KAFKA_FETCH_MAX_WAIT * 1000),  # the worker's default too
    )
    await consumer.start()
    producer = kafka_io.producer(bootstrap, linger_ms=5, batch_bytes=65_536)
    await producer.start()
    rng = random.Random(f"{world.seed}-floor")
    produced_at: dict[bytes, float] = {}
    seen: list[float] = []
    stop = asyncio.Event()

    async def receive() -> None:
        while not stop.is_set() or len(seen) < len(produced_at):
            fetched = await consumer.getmany(timeout_ms=200, max_records=5_000)
            now = time.time()
            for records in fetched.values():
                seen.extend((now - produced_at[r.key]) * 1000 for r in records if r.key in produced_at)
            if stop.is_set() and not fetched:
                break

    receiving = asyncio.create_task(receive())
    try:
        started = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - started) < duration:
            while sent < int(rate * elapsed):
                key = f"{sent}".encode()
                payload = w.render_event(w.event_row(world, rng, f"floor{sent}", datetime.now(UTC)))
                produced_at[key] = time.time()
                await producer.send(topic, value=payload, key=key)
                sent += 1
            await asyncio.sleep(TICK)
        await producer.flush()
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(receiving, 30)
    finally:
        receiving.cancel()
        await producer.stop()
        await consumer.stop()
    return summary(seen) | {"offered_per_second": round(rate, 1), "produced": len(produced_at)}


async def _wait_stored(poller: OffsetPoller, end: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if poller.stored() >= end:
            return True
        await asyncio.sleep(0.05)
    return False


async def latency_run(
    servers: Servers,
    *,
    database: str,
    group: str,
    topics: Topics,
    world: w.World,
    rate: float,
    duration: float,
    idle: float,
    workdir: Path,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    db_url = servers.url(database)
    env = worker_env(servers, db_url, group, topics, metrics_port=devstack.free_port(), extra=extra_env)
    process = WorkerProcess(env, workdir / "worker-latency.log", idle=max(idle, 2.0))
    poller = OffsetPoller(db_url, group, topics.api_usage)
    polling = asyncio.create_task(poller.run())
    producer = kafka_io.producer(servers.bootstrap, linger_ms=5, batch_bytes=65_536)
    await producer.start()
    rng = random.Random(f"{world.seed}-latency")
    produced_at: dict[str, float] = {}
    futures: list[tuple[str, asyncio.Future[Any]]] = []

    async def send(prefix: str, seq: int) -> None:
        event_id = f"{prefix}{seq:09d}{rng.getrandbits(64):016x}"
        row = w.event_row(world, rng, event_id, datetime.now(UTC))
        payload = w.render_event(row)
        produced_at[event_id] = time.time()
        futures.append((event_id, await producer.send(topics.api_usage, value=payload)))

    process.start()
    try:
        # Warm up: the worker has joined the group and committed a first batch before the clock starts.
        for seq in range(WARMUP_EVENTS):
            await send("warm", seq)
        if not await _wait_stored(poller, WARMUP_EVENTS, 120):
            raise RuntimeError("the worker did not store the warm-up events within 120 s")
        futures.clear()
        produced_at.clear()
        started = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - started) < duration:
            due = int(rate * elapsed)
            while sent < due:
                await send("lat", sent)
                sent += 1
            await asyncio.sleep(TICK)
        offered_seconds = time.perf_counter() - started
        placed = {}
        for event_id, future in futures:
            meta = await future
            placed[event_id] = (meta.partition, meta.offset)
        complete = await _wait_stored(poller, WARMUP_EVENTS + sent, 120)
        await asyncio.sleep(POLL * 3)
        commit_ts: dict[str, float] = {}
        conn = await asyncpg.connect(db_url)
        try:
            tracking = await conn.fetchval("SHOW track_commit_timestamp") == "on"
            if tracking:
                for row in await conn.fetch(
                    "SELECT event_id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 AS committed "
                    "FROM api_usage WHERE event_id LIKE 'lat%'"
                ):
                    commit_ts[row["event_id"]] = row["committed"]
        finally:
            await conn.close()
        await process.wait(max(idle, 2.0) + 30)
    finally:
        process.terminate()
        poller.stop.set()
        await polling
        await producer.stop()
    polled = []
    for event_id, (partition, offset) in placed.items():
        seen = poller.committed_at(partition, offset)
        if seen is not None:
            polled.append((seen - produced_at[event_id]) * 1000)
    exact = [(commit_ts[e] - produced_at[e]) * 1000 for e in produced_at if e in commit_ts]
    methods = {"offset_polling": summary(polled)}
    if exact:
        methods["commit_timestamp"] = summary(exact)
    primary = "commit_timestamp" if exact else "offset_polling"
    return {
        "offered_per_second": round(rate, 1),
        "achieved_per_second": round(sent / offered_seconds, 1) if offered_seconds else None,
        "duration_seconds": round(offered_seconds, 2),
        "events": sent,
        "complete": complete,
        "method": primary,
        **methods[primary],
        "methods": methods,
        "histogram_ms": _histogram(exact or polled),
    }


def _histogram(values: list[float], buckets: int = 40) -> list[tuple[float, int]]:
    """(upper edge in ms, count) on a log scale, for the chart."""
    if not values:
        return []
    low, high = max(min(values), 0.5), max(values) * 1.0001
    ratio = (high / low) ** (1 / buckets) if high > low else 2.0
    edges = [low * ratio ** (i + 1) for i in range(buckets)]
    counts = [0] * buckets
    for value in values:
        counts[min(bisect.bisect_left(edges, value), buckets - 1)] += 1
    return [(round(edge, 2), count) for edge, count in zip(edges, counts, strict=True)]
